"""Scheduled deployments on a real Prefect server (127.0.0.1, started and stopped here): ``mmearth
deploy`` creates the work pool, the Earth Engine concurrency limit and the scheduled deployment; a run
triggered through the API is picked up by a process worker and ends with a valid store and catalog;
the global concurrency limit caps Earth Engine requests across separate sources."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mmearth_data.validate import validate_store

from conftest import free_port

PREFECT = str(Path(sys.executable).with_name("prefect"))
pytestmark = pytest.mark.slow  # a Prefect server of their own and a worker's flow run: minutes on 2 cores


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server of its own (its own home and database) on 127.0.0.1; yields its environment."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_ENABLED": "false",
    }
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "the Prefect server exited while starting"
            time.sleep(0.5)
        else:
            pytest.fail("the Prefect server did not start within 180 s")
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def api(server, monkeypatch):
    """This process talks to the test server (threads read the environment, the main thread its
    settings)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", server["PREFECT_API_URL"])
    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
        yield server


def test_deploy_then_a_worker_runs_the_scheduled_build(api, tmp_path):
    from prefect.client.orchestration import get_client

    cfg = tmp_path / "corpus.toml"
    store, catalog = tmp_path / "sched.zarr", tmp_path / "catalog"
    cfg.write_text(
        f'[build]\nstore = "{store}"\ntiles = 16\ntile-size = 32\nshard-tiles = 8\nyears = "2019-2020"\n'
        f'workers = 2\nextend-by = 8\n\n[catalog]\nout = "{catalog}"\n\n'
        '[schedule]\ncron = "0 3 * * *"\ntimezone = "UTC"\n\n[deployment]\npool = "test-pool"\n'
    )
    dep = subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy", "--config", str(cfg)],
        env=api, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert dep.returncode == 0, dep.stdout[-2000:] + dep.stderr[-2000:]
    assert "scheduled-build/corpus" in dep.stdout and "prefect worker start --pool test-pool" in dep.stdout

    with get_client(sync_client=True) as client:
        d = client.read_deployment_by_name("scheduled-build/corpus")
        assert d.work_pool_name == "test-pool" and d.parameters == {"config": str(cfg)}
        assert [s.schedule.cron for s in d.schedules] == ["0 3 * * *"]
        assert client.read_work_pool("test-pool").type == "process"
        assert client.read_global_concurrency_limit_by_name("earthengine-requests").limit == 40
        run = client.create_flow_run_from_deployment(d.id)

    worker = subprocess.run(
        [PREFECT, "worker", "start", "--pool", "test-pool", "--run-once"],
        env=api, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state is not None and state.is_completed(), worker.stdout[-3000:] + worker.stderr[-3000:]
    report = validate_store(str(store))
    assert report["valid"], report["problems"]
    assert report["summary"]["complete"] == 16
    assert (catalog / "collection.json").exists() and (catalog / "items.parquet").exists()


GCL_SCRIPT = """
import json, threading
from mmearth_data.registry import stored_modalities
from mmearth_data.sampling import SampleConfig, sample_plan
from mmearth_data.sources.base import SourceError, TileRequest, TileResult
from mmearth_data.sources.earthengine import EarthEngineSource, EEConfig, register_transport
from mmearth_data.testing.ee_fake import SimulatedTransport

mods = stored_modalities()
plan = sample_plan(SampleConfig(8, (2019,), 0, 64, 0))
reqs = [TileRequest.from_row(row, 64) for _, row in plan.iterrows()]
register_transport("gcl-test", sim := SimulatedTransport(latency_s=0.05))
sources = [EarthEngineSource(EEConfig(transport="gcl-test", max_in_flight=6, concurrency_limit="ee-test"))
           for _ in range(2)]
for s in sources:
    s.check(64, mods)  # the limit exists: no error
got = []
threads = [threading.Thread(target=lambda s=s, r=r: got.extend(s.fetch(r, mods)))
           for s, r in zip(sources, (reqs[:4], reqs[4:]))]
for t in threads:
    t.start()
for t in threads:
    t.join()
try:
    EarthEngineSource(EEConfig(transport="gcl-test", concurrency_limit="no-such-limit")).check(64, mods)
    missing = ""
except SourceError as err:
    missing = str(err)
print(json.dumps({"ok": sum(isinstance(r, TileResult) for r in got), "peak": sim.peak, "missing": missing}))
"""


def test_global_concurrency_limit_caps_requests_across_sources(api):
    """Two sources, each with its own in-process cap of 6, share a 2-slot global limit: never more than
    2 requests in flight together (run in a process of its own, as a flow run is, its API from the
    environment)."""
    import json

    from prefect.client.orchestration import get_client

    from flows.deploy import ensure_concurrency_limit

    with get_client(sync_client=True) as client:
        ensure_concurrency_limit(client, "ee-test", 2)
    run = subprocess.run(
        [sys.executable, "-c", GCL_SCRIPT], env=api, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["ok"] == 8
    assert 1 <= res["peak"] <= 2, res
    assert "no such global concurrency limit" in res["missing"] and "prefect gcl create" in res["missing"]
