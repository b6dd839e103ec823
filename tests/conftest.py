"""Shared fixtures: an isolated Prefect home, one Prefect test harness, and small stores built through
the plain build functions (the same code the flow runs)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

_PREFECT_HOME = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402

from mmearth_data.build import BuildConfig, build_in_process  # noqa: E402

SMALL = dict(n_tiles=56, tile_size=64, shard_tiles=16, chunk_tiles=4, seed=7)


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> str:
    """56 tiles (one per biome x year) of 64 px in 4 shards, statistics written."""
    path = str(tmp_path_factory.mktemp("stores") / "small.zarr")
    build_in_process(BuildConfig(store=path, **SMALL))
    return path


TINY_STORE = Path(__file__).resolve().parent / "data" / "store"


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> str:
    """The committed 16-tile, 32 px store (``tests/data/store/make_store.py``), copied with its build
    folder so that no test can change the committed files."""
    import shutil

    root = tmp_path_factory.mktemp("tiny")
    shutil.copytree(TINY_STORE / "tiny.zarr", root / "tiny.zarr")
    shutil.copytree(TINY_STORE / "tiny.build", root / "tiny.build")
    return str(root / "tiny.zarr")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """The ASGI ``app`` served by uvicorn on a free port of 127.0.0.1 for the block; yields its URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def chromium():
    """Headless Chromium (Debian's chromium and chromedriver) for the browse-page tests; skips the test
    when they or the page's map library are not installed."""
    import shutil

    from catalog.vendor import installed

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
    if not installed():
        pytest.skip("the map library is not installed (make install fetches it with npm)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1000"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def store_files(path: str) -> dict[str, bytes]:
    """relative path -> bytes of every file of a store; the root ``zarr.json`` with the times of its
    history (when each build started and finished) blanked, the one thing two builds differ in."""
    import json

    out = {}
    for d, _, fs in os.walk(path):
        for f in fs:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    root = json.loads(out["zarr.json"])
    for h in root["attributes"].get("history", []):
        h["started"] = h["finished"] = "(time)"
    out["zarr.json"] = json.dumps(root, sort_keys=True).encode()
    return out


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
