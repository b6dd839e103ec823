"""A build killed with SIGKILL mid-way and re-run ends with the same store as an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import zarr

from mmearth_data.build import BuildConfig, build_in_process
from mmearth_data.registry import stored_modalities

OPTS = dict(n_tiles=320, tile_size=64, shard_tiles=8, chunk_tiles=4, seed=11, years=(2018, 2020))
ARGS = ["--tiles", "320", "--tile-size", "64", "--shard-tiles", "8", "--seed", "11", "--years", "2018,2020"]


def _complete(path):
    try:
        return int(np.asarray(zarr.open_group(path, mode="r")["complete"][:]).sum())
    except Exception:
        return 0


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    killed = str(tmp_path / "killed.zarr")
    cmd = [
        sys.executable,
        "-m",
        "flows.build_corpus",
        "--store",
        killed,
        "--workers",
        "1",
        "--no-progress",
        *ARGS,
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while _complete(killed) < 40 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _complete(killed)
    assert 0 < done < 320, f"kill landed outside the build ({done} tiles complete)"
    g = zarr.open_group(killed, mode="r")
    flags = np.asarray(g["complete"][:])
    s2 = np.asarray(g["sentinel2"][:])
    assert np.all(s2[flags].reshape(flags.sum(), -1).max(axis=1) > 0), "a tile marked complete holds no data"

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]

    fresh = str(tmp_path / "fresh.zarr")
    build_in_process(BuildConfig(store=fresh, **OPTS))
    a, b = zarr.open_group(killed, mode="r"), zarr.open_group(fresh, mode="r")
    names = [m.name for m in stored_modalities()] + [f"{m.name}_present" for m in stored_modalities()]
    names += ["tile_id", "lat", "lon", "epsg", "transform", "s2_date", "s2_product", "split", "complete"]
    for name in names:
        assert np.array_equal(np.asarray(a[name][:]), np.asarray(b[name][:]), equal_nan=True), name
    assert a.attrs["statistics"] == b.attrs["statistics"]
