"""Prefect flow: sample -> plan shards -> export shards (one task per shard) -> statistics.

Thin by design: every step is a plain function of :mod:`mmearth_data.build`, tested without Prefect.
Runs with no Prefect server configured (Prefect starts a temporary local one). Shards run on a process
pool for the CPU-bound offline source and on threads for network-bound sources; each shard task retries
twice. Re-running the same command resumes: only shards with an incomplete tile are exported again.

    mmearth build --source offline --tiles 256 --store data/demo.zarr   # or: python -m flows.cli build ...
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from flows.guard import guard_worker, spare, stop_on_signal
from mmearth_data.build import BuildConfig, ShardReport, export_shard, finish, prepare
from mmearth_data.stats import write_statistics
from mmearth_data.store import StoreWriter

SHARD_RETRIES = 2


@task(
    retries=SHARD_RETRIES, retry_delay_seconds=2, cache_policy=NO_CACHE, task_run_name="export-shard-{shard}"
)
def export_shard_task(cfg: BuildConfig, shard: int, candidates: list[list[dict[str, Any]]]) -> ShardReport:
    return export_shard(cfg, shard, candidates)


@task(cache_policy=NO_CACHE, task_run_name="statistics")
def statistics_task(store: str, on_dask: bool) -> None:
    """The statistics pass; on a Dask task runner its dask graph runs on the same cluster."""
    if on_dask:
        from prefect_dask import get_dask_client

        with get_dask_client():  # the cluster's client as dask's default, inside this task
            write_statistics(store)
    else:
        write_statistics(store)


@flow(name="build-corpus", log_prints=False)
def build_corpus(cfg: BuildConfig, show_progress: bool = True) -> dict[str, Any]:
    """Build (or resume) the corpus described by ``cfg``; returns the build summary."""
    t0 = time.perf_counter()
    prep = prepare(cfg)
    cfg = prep.config  # an extension keeps the store's shard and chunk sizes
    reports: list[ShardReport] = []
    writer = StoreWriter(cfg.store)
    n_tiles = sum(b - a for a, b in map(writer.shard_range, prep.shards))
    # shards in flight at once: the workers stay busy while the candidates of the shards not yet
    # submitted stay unbuilt (a 1.2M-tile plan has 3.6M of them)
    window = max(16, 4 * (os.cpu_count() or 1))
    queue = iter(prep.shards)
    live = [export_shard_task.submit(cfg, k, prep.candidates[k]) for k in itertools.islice(queue, window)]
    with Progress(
        TextColumn("[bold]export"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tiles  {task.fields[rate]} tiles/s"),
        TimeRemainingColumn(),
        disable=not show_progress,
        transient=False,
    ) as progress:
        bar = progress.add_task("export", total=n_tiles, rate="-")
        done = 0
        while live:
            fut = next(as_completed(live))
            live.remove(fut)
            k = next(queue, None)
            if k is not None:
                live.append(export_shard_task.submit(cfg, k, prep.candidates[k]))
            rep = fut.result()
            reports.append(rep)
            done += rep.slots
            rate = done / max(time.perf_counter() - t0, 1e-9)
            progress.update(bar, advance=rep.slots, rate=f"{rate:.1f}")
    from prefect.context import get_run_context

    on_dask = type(get_run_context().task_runner).__name__ == "DaskTaskRunner"
    statistics_task.submit(cfg.store, on_dask).result()
    summary = finish(cfg, reports, time.perf_counter() - t0, statistics=False)
    summary["resumed"] = prep.resumed
    summary["plan"] = prep.plan_path
    return summary


def _temporary_server():
    """Prefect's temporary local server, started in a session of its own (a terminal's Ctrl-C does not
    reach it: the main process stops it in order) and watching this process (it exits when this process
    is killed outright)."""
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class GuardedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            app_dir = str(prefect.__module_path__.parent)
            proc = subprocess.Popen(
                [sys.executable, "-m", "flows.guard", str(os.getpid()), "uvicorn", "--app-dir", app_dir,
                 "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ, "PREFECT_UI_ENABLED": "0",
                     "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
                     **get_current_settings().to_environment_variables(exclude_unset=True)},
                start_new_session=True,
            )  # fmt: skip
            spare(proc.pid)
            return proc

    return GuardedServer()


@contextmanager
def prefect_api() -> Iterator[None]:
    """Use the configured Prefect API, or one temporary local server shared with worker processes
    (without it every worker process would start a server of its own). Stops on SIGINT/SIGTERM as
    :mod:`flows.guard` describes."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        with stop_on_signal():
            yield
        return
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = _temporary_server()
    # a first start on a fresh Prefect home creates its database, which takes longer than Prefect's
    # default wait on a busy small machine
    server.start(timeout=max(120, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    drain = 10.0
    try:
        with stop_on_signal(on_timeout=server.stop), temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    except KeyboardInterrupt:
        drain = 1.0  # stopping: do not wait long for queued logs
        raise
    finally:
        # flush queued logs and events while the server still listens
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=drain)
        EventsWorker.drain_all(timeout=drain)
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old
        server.stop()


def dask_runner(address: str | None = None, workers: int | None = None) -> Any:
    """prefect-dask's ``DaskTaskRunner`` on the scheduler at ``address`` (``tcp://host:8786``), or on a
    ``LocalCluster`` of ``workers`` single-threaded worker processes started for the run."""
    from prefect_dask import DaskTaskRunner

    logging.getLogger("distributed").setLevel(logging.WARNING)  # its scheduler's chatter in this process
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": workers or (os.cpu_count() or 1), "threads_per_worker": 1,
                        "processes": True, "dashboard_address": None, "silence_logs": logging.WARNING},
    )  # fmt: skip


def task_runner_for(
    cfg: BuildConfig,
    workers: int | None = None,
    dask_address: str | None = None,
    dask_workers: int | None = None,
) -> Any:
    """The task runner of a build: prefect-dask's on a Dask scheduler or local cluster when asked;
    else processes for the CPU-bound offline source, threads otherwise (network-bound: several shards
    in flight, each fetching its tiles concurrently under the source's own cap on requests)."""
    if dask_address or dask_workers:
        return dask_runner(dask_address, dask_workers)
    if workers is None:
        workers = (os.cpu_count() or 1) if cfg.source == "offline" else 4
    if cfg.source == "offline" and workers > 1:
        # a worker killed on Ctrl-C leaves its semaphores to multiprocessing's resource tracker, which
        # frees them and would warn about it in the terminal
        filt = "ignore::UserWarning:multiprocessing.resource_tracker"
        if filt not in os.environ.get("PYTHONWARNINGS", ""):
            os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), filt]))
        return ProcessPoolTaskRunner(max_workers=workers, initializer=guard_worker, initargs=(os.getpid(),))
    return ThreadPoolTaskRunner(max_workers=max(workers, 1))


def run_build(
    cfg: BuildConfig,
    workers: int | None = None,
    show_progress: bool = True,
    dask_address: str | None = None,
    dask_workers: int | None = None,
) -> dict[str, Any]:
    """Run the flow on :func:`task_runner_for`'s task runner (with ``dask_address`` or
    ``dask_workers`` the shard tasks and the statistics run on that Dask cluster). SIGINT/SIGTERM stop
    it within seconds with :class:`flows.guard.BuildInterrupted` (completed shards are kept; re-running
    resumes)."""
    with prefect_api():
        runner = task_runner_for(cfg, workers, dask_address, dask_workers)
        return build_corpus.with_options(task_runner=runner)(cfg, show_progress=show_progress)
