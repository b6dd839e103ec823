"""Regenerate the tiny committed corpus store: ``python tests/data/store/make_store.py``.

``tiny.zarr`` (and ``tiny.build/``, its plan and the copy of its metadata) is a complete store of
:data:`CONFIG`: 16 tiles of 32 px from the offline world, in two shards, every modality, statistics
written. Tests that only need a valid store (the catalog's) read it instead of building one, so they
do not depend on the whole build. Run this script again after a change to the store's layout or to the
offline generator; ``tests/test_layout.py`` says when the committed store no longer matches what the
script writes (the arrays are compared, not the build's timestamps).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CONFIG = dict(n_tiles=16, tile_size=32, shard_tiles=8, chunk_tiles=4, seed=11, years=(2018, 2020))


def make(out: Path) -> Path:
    """Build the tiny store at ``out`` (``<out>.zarr`` and ``<out>.build``); returns the store path."""
    sys.path.insert(0, str(ROOT))
    from mmearth_data.artifacts import build_dir
    from mmearth_data.build import BuildConfig, build_in_process

    store = out.with_suffix(".zarr")
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(build_dir(str(store)), ignore_errors=True)
    build_in_process(BuildConfig(store=str(store), **CONFIG))
    # the plots are for people; the tests read the plan and the metadata copy
    for name in ("sample_map.png", "strata.png", "failures.json", "lock"):
        (Path(build_dir(str(store))) / name).unlink(missing_ok=True)
    return store


if __name__ == "__main__":
    print(make(HERE / "tiny"))
