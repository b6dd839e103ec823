"""A build killed with SIGKILL and re-run ends with exactly the store an uninterrupted build writes.

The kills land at named crash points (mmearth_data/crash.py), the N-th passage drawn with a seeded
generator, in a real build process; one more lands at a moment of a Prefect run chosen from outside.
"""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from mmearth_data.build import BuildConfig, build_in_process
from mmearth_data.crash import ENV
from mmearth_data.registry import stored_modalities
from mmearth_data.store import TILE_VARS

from conftest import store_files

SMALL = dict(n_tiles=96, tile_size=32, shard_tiles=8, chunk_tiles=4, seed=11, years=(2018, 2020))
N_SHARDS = 12
N_ARRAYS = 2 * len(stored_modalities()) + len(TILE_VARS) + 1  # arrays per shard write
RNG = random.Random(20261123)
POINTS = [
    ("created", 1),
    ("plan", 1),
    ("shard-array", RNG.randrange(2, N_SHARDS * N_ARRAYS // 2)),  # inside a shard: some arrays written
    ("shard-array", RNG.randrange(N_SHARDS * N_ARRAYS // 2, N_SHARDS * N_ARRAYS)),
    ("shard-done", RNG.randrange(1, N_SHARDS)),  # between two shards
    ("statistics", 1),  # every shard written, statistics computed but not stored
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fresh") / "fresh.zarr")
    build_in_process(BuildConfig(store=path, **SMALL))
    return store_files(path)


def _build_script(store):
    return (
        "from mmearth_data.build import BuildConfig, build_in_process; "
        f"build_in_process(BuildConfig(store={store!r}, **{SMALL!r}))"
    )


@pytest.mark.parametrize("point, nth", POINTS, ids=[f"{p}-{n}" for p, n in POINTS])
def test_sigkill_at_crash_point_then_resume_is_identical(tmp_path, uninterrupted, point, nth):
    store = str(tmp_path / "s.zarr")
    env = os.environ | {ENV: f"{point}:{nth}"}
    killed = subprocess.run(
        [sys.executable, "-c", _build_script(store)], env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, (
        f"the build was not killed at {point}:{nth}: {killed.stderr[-2000:]}"
    )
    if point == "statistics":
        assert np.asarray(zarr.open_group(store, mode="r")["complete"][:]).all()
        assert "statistics" not in zarr.open_group(store, mode="r").attrs
    rerun = subprocess.run([sys.executable, "-c", _build_script(store)], capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    got = store_files(store)
    assert sorted(got) == sorted(uninterrupted), set(got) ^ set(uninterrupted)
    differ = [k for k in got if got[k] != uninterrupted[k]]
    assert not differ, f"files differ from the uninterrupted build: {differ}"
    assert not [p for p in os.listdir(tmp_path) if ".creating-" in p], "a staging folder was left behind"


def _complete(path):
    try:
        return int(np.asarray(zarr.open_group(path, mode="r")["complete"][:]).sum())
    except Exception:
        return 0


def test_sigkill_of_a_prefect_build_at_a_seeded_moment_then_resume(tmp_path):
    """The flow as users run it (Prefect, process pool), killed with its whole process group once a
    seeded number of tiles is complete."""
    opts = dict(n_tiles=320, tile_size=64, shard_tiles=8, seed=11, years=(2018, 2020))
    args = [
        "--tiles",
        "320",
        "--tile-size",
        "64",
        "--shard-tiles",
        "8",
        "--seed",
        "11",
        "--years",
        "2018,2020",
    ]
    killed = str(tmp_path / "killed.zarr")
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "build",
        "--store",
        killed,
        "--workers",
        "2",
        "--no-progress",
        *args,
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    at = random.Random(7).randrange(24, 200)
    deadline = time.time() + 180
    while _complete(killed) < at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
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
    build_in_process(BuildConfig(store=fresh, **opts))
    a, b = store_files(killed), store_files(fresh)
    assert sorted(a) == sorted(b)
    assert not [k for k in a if a[k] != b[k]]
