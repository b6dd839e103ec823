"""Ctrl-C, SIGTERM and SIGKILL of a real build: it stops in seconds, leaves no process behind, and the
next run resumes (flows/guard.py)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import zarr

from mmearth_data.build import BuildConfig, build_in_process
from mmearth_data.validate import validate_store

N = 320
ARGS = ["--tiles", str(N), "--tile-size", "32", "--shard-tiles", "8", "--seed", "5", "--years", "2018,2020"]


def _complete(path):
    try:
        return int(np.asarray(zarr.open_group(path, mode="r")["complete"][:]).sum())
    except Exception:
        return 0


def _start(store, workers=2):
    cmd = [sys.executable, "-m", "flows.cli", "build", "--store", store, "--workers", str(workers),
           "--no-progress", *ARGS]  # fmt: skip
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while _complete(store) < 16 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the build ended before it could be interrupted: " + proc.stdout.read()[-2000:]
    )
    kids = psutil.Process(proc.pid).children(recursive=True)
    assert len(kids) >= 3, f"expected the server and two workers, found {[k.cmdline()[:4] for k in kids]}"
    return proc, kids


def _alive(procs):
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _finish_and_check(store):
    assert 0 < _complete(store) < N
    build_in_process(
        BuildConfig(store=store, n_tiles=N, tile_size=32, shard_tiles=8, seed=5, years=(2018, 2020))
    )
    assert _complete(store) == N
    rep = validate_store(store, deep=True)
    assert rep["valid"], rep["problems"]


@pytest.mark.parametrize(
    "sig, to_group, code",
    [(signal.SIGINT, True, 130), pytest.param(signal.SIGTERM, False, 143, marks=pytest.mark.slow)],
    ids=["ctrl-c-to-process-group", "sigterm-to-main"],
)
def test_signal_stops_build_quickly_and_cleanly(tmp_path, sig, to_group, code):
    store = str(tmp_path / "s.zarr")
    proc, kids = _start(store)
    t0 = time.time()
    if to_group:  # what a terminal does on Ctrl-C
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for k in _alive(kids):
            k.kill()
        pytest.fail("the build did not stop within 30 s")
    took = time.time() - t0
    assert proc.returncode == code, out[-2000:]
    assert took < 10, f"stopped after {took:.1f} s"
    assert "re-run the same command to resume" in out
    assert "Traceback" not in out, out[-3000:]
    time.sleep(1.0)
    left = _alive(kids)
    for k in left:
        k.kill()
    assert not left, f"left behind: {[k.cmdline()[:4] for k in left]}"
    group = [
        p
        for p in psutil.process_iter(["pid", "cmdline", "status", "ppid", "name"])
        if _pgid(p.pid) == proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE
    ]
    assert not group, f"process group not empty: {[p.info for p in group]} main {proc.pid}"
    _finish_and_check(store)


def test_sigkill_of_main_alone_leaves_no_writer(tmp_path):
    store = str(tmp_path / "s.zarr")
    proc, kids = _start(store)
    os.kill(proc.pid, signal.SIGKILL)  # the OOM killer: the main process only
    proc.wait()
    time.sleep(5.0)
    left = _alive(kids)
    for k in left:
        k.kill()
    assert not left, f"still running 5 s after the main process died: {[k.cmdline()[:4] for k in left]}"

    def snapshot():
        return {
            os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(store)
            for f in fs
        }

    before = snapshot()
    time.sleep(1.0)
    assert snapshot() == before, "files of the store changed after its build was killed"
    _finish_and_check(store)
