"""Prefect flow: sample -> plan shards -> export shards (one task per shard) -> statistics.

Thin by design: every step is a plain function of :mod:`mmearth_data.build`, tested without Prefect.
Runs with no Prefect server configured (Prefect starts a temporary local one). Shards run on a process
pool for the CPU-bound offline source and on threads for network-bound sources; each shard task retries
twice. Re-running the same command resumes: only shards with an incomplete tile are exported again.

    python -m flows.build_corpus --source offline --tiles 256 --store data/demo.zarr
"""

from __future__ import annotations

import os
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

from mmearth_data.build import BuildConfig, ShardReport, export_shard, finish, prepare

SHARD_RETRIES = 2


@task(
    retries=SHARD_RETRIES, retry_delay_seconds=2, cache_policy=NO_CACHE, task_run_name="export-shard-{shard}"
)
def export_shard_task(cfg: BuildConfig, shard: int, candidates: list[list[dict[str, Any]]]) -> ShardReport:
    return export_shard(cfg, shard, candidates)


@flow(name="build-corpus", log_prints=False)
def build_corpus(cfg: BuildConfig, show_progress: bool = True) -> dict[str, Any]:
    """Build (or resume) the corpus described by ``cfg``; returns the build summary."""
    t0 = time.perf_counter()
    prep = prepare(cfg)
    reports: list[ShardReport] = []
    futures = [export_shard_task.submit(cfg, k, prep.candidates[k]) for k in prep.shards]
    n_tiles = sum(len(prep.candidates[k]) for k in prep.shards)
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
        for fut in as_completed(futures):
            rep = fut.result()
            reports.append(rep)
            done += rep.slots
            rate = done / max(time.perf_counter() - t0, 1e-9)
            progress.update(bar, advance=rep.slots, rate=f"{rate:.1f}")
    summary = finish(cfg, reports, time.perf_counter() - t0)
    summary["resumed"] = prep.resumed
    summary["plan"] = prep.plan_path
    return summary


@contextmanager
def prefect_api() -> Iterator[None]:
    """Use the configured Prefect API, or one temporary local server shared with worker processes
    (without it every worker process would start a server of its own)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        # flush queued logs and events while the server still listens
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old
        server.stop()


def run_build(cfg: BuildConfig, workers: int | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Run the flow with a task runner suited to the source: processes for the CPU-bound offline
    source, threads otherwise (network-bound: several shards in flight, each fetching its tiles
    concurrently under the source's own cap on requests)."""
    if workers is None:
        workers = (os.cpu_count() or 1) if cfg.source == "offline" else 4
    if cfg.source == "offline" and workers > 1:
        runner = ProcessPoolTaskRunner(max_workers=workers)
    else:
        runner = ThreadPoolTaskRunner(max_workers=max(workers, 1))
    with prefect_api():
        return build_corpus.with_options(task_runner=runner)(cfg, show_progress=show_progress)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["build", *sys.argv[1:]]))
