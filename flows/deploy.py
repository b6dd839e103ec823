"""Scheduled rebuilds: a Prefect deployment that builds (or extends) a corpus from a config file on a
cron schedule, then rebuilds its catalog.

    mmearth deploy --config corpus.toml     # work pool, Earth Engine concurrency limit, deployment
    prefect worker start --pool mmearth     # on every machine that builds

The config file (TOML) holds the options of ``mmearth build`` under ``[build]`` (names as the flags,
``tile-size`` or ``tile_size`` alike), Earth Engine's under ``[earthengine]``, and the rest under
``[catalog]`` (``out``, ``quicklooks``), ``[schedule]`` (``cron``, ``timezone``) and ``[deployment]``
(``name``, ``pool``). ``extend-by = N`` under ``[build]`` makes each run grow the store by N tiles
(``mmearth build --extend``) once it is complete; without it each run resumes or rebuilds the store to
``tiles`` (a complete store: statistics and catalog refreshed, nothing re-exported).

Every build of every machine shares Earth Engine's request quota through the Prefect global concurrency
limit ``earthengine-requests`` (created here, its size the config's ``max-in-flight``): each request
holds one of its slots, besides the build's own in-process cap.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from mmearth_data.build import BuildInputError

EE_LIMIT = "earthengine-requests"
ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"build", "earthengine", "catalog", "schedule", "deployment"}


class DeployError(BuildInputError):
    """A deployment config that cannot be used as written; the message names the fix."""


def load_config(path: str | Path) -> dict[str, Any]:
    """The config file as a dict of sections; raises :class:`DeployError` naming what is wrong."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise DeployError(
            f"--config {path}: no such file; write one as README's 'Scaling out' shows"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise DeployError(f"--config {path}: not valid TOML ({err})") from None
    unknown = set(doc) - SECTIONS
    if unknown:
        raise DeployError(f"--config {path}: unknown sections {sorted(unknown)}; use {sorted(SECTIONS)}")
    if "store" not in doc.get("build", {}) or "tiles" not in doc.get("build", {}):
        raise DeployError(f"--config {path}: [build] needs store and tiles, as `mmearth build` does")
    return doc


def _flags(table: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out


def build_arguments(doc: dict[str, Any], path: str | Path = "config") -> tuple[argparse.Namespace, int]:
    """(``mmearth build``'s parsed arguments from the config's ``[build]`` and ``[earthengine]``,
    ``extend-by``); the build command's own parser checks every option."""
    from flows.options import add_build_arguments

    table = dict(doc.get("build", {}))
    extend_by = int(table.pop("extend-by", table.pop("extend_by", 0)) or 0)
    ee = dict(doc.get("earthengine", {}))
    if table.get("source") == "earthengine":
        ee.setdefault("concurrency-limit", EE_LIMIT)

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # argparse would exit; a config file says where the problem is
            raise DeployError(f"{path}: {message} (the option names are those of `mmearth build`)")

    parser = Parser(prog=str(path))
    add_build_arguments(parser)
    return parser.parse_args([*_flags(table), *_flags(ee)]), extend_by


@task(cache_policy=NO_CACHE, task_run_name="catalog")
def catalog_task(store: str, out: str, quicklooks: str) -> dict[str, Any]:
    from catalog.build import build_catalog

    return build_catalog(store, out, quicklooks=quicklooks)


@flow(name="scheduled-build", log_prints=True)
def scheduled_build(config: str) -> dict[str, Any]:
    """One scheduled run: build, resume or extend the store the config describes, then its catalog."""
    from dataclasses import replace

    from flows.build_corpus import build_corpus, task_runner_for
    from flows.options import build_config
    from mmearth_data.build import check_request
    from mmearth_data.store import _exists

    doc = load_config(config)
    args, extend_by = build_arguments(doc, config)
    cfg = build_config(args)
    if extend_by and _exists(cfg.store)[1]:
        from mmearth_data.store import CorpusReader

        reader = CorpusReader(cfg.store)
        have = reader.n_tiles
        if bool(reader.read(["complete"], 0, have)["complete"].all()):  # else this run finishes the last one
            cfg = replace(cfg, n_tiles=have + extend_by, extend=True)
        else:
            cfg = replace(cfg, n_tiles=have, extend=True)
    check_request(cfg)
    runner = task_runner_for(cfg, args.workers, args.dask_address, args.dask_workers)
    summary = build_corpus.with_options(task_runner=runner)(cfg, show_progress=False)
    cat = doc.get("catalog", {})
    if cat.get("out"):
        summary["catalog"] = catalog_task(cfg.store, cat["out"], cat.get("quicklooks", "auto"))
    print(f"store {cfg.store}: {summary['complete']}/{summary['n_tiles']} tiles complete")
    return summary


def ensure_concurrency_limit(client: Any, name: str, limit: int) -> None:
    """Create the global concurrency limit ``name`` with ``limit`` slots, or set an existing one's."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
    else:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))


def ensure_work_pool(client: Any, name: str) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        return
    if pool.type != "process":
        raise DeployError(f"work pool {name} is of type {pool.type}; give --pool a process pool's name")


def deploy(config: str | Path, pool: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Create (or update) the work pool, the Earth Engine concurrency limit and the deployment of
    :func:`scheduled_build` for ``config`` on the Prefect server of ``PREFECT_API_URL``."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.options import build_config
    from mmearth_data.build import check_config

    path = Path(config).resolve()
    doc = load_config(path)
    args, _ = build_arguments(doc, path)
    check_config(build_config(args))  # the options as the build checks them; no store is touched
    if not PREFECT_API_URL.value():
        raise DeployError(
            "no Prefect server: a deployment lives on one. Start it with `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (README: Scaling out)"
        )
    dep = doc.get("deployment", {})
    pool = pool or dep.get("pool", "mmearth")
    name = name or dep.get("name", path.stem)
    sched = doc.get("schedule", {})
    slots = args.max_in_flight  # the build's own cap per process, and the shared limit's size
    with get_client(sync_client=True) as client:
        ensure_work_pool(client, pool)
        ensure_concurrency_limit(client, EE_LIMIT, slots)
    from prefect.client.schemas.schedules import CronSchedule

    schedules = []
    if "cron" in sched:
        schedules.append(CronSchedule(cron=sched["cron"], timezone=sched.get("timezone", "UTC")))
    flow_ = scheduled_build.from_source(source=str(ROOT), entrypoint="flows/deploy.py:scheduled_build")
    dep_id = flow_.deploy(
        name=name,
        work_pool_name=pool,
        schedules=schedules,
        parameters={"config": str(path)},
        description=f"build {args.store} from {path}, then its catalog",
        tags=["mmearth"],
        print_next_steps=False,
    )
    return {
        "deployment": f"scheduled-build/{name}",
        "id": str(dep_id),
        "pool": pool,
        "cron": sched.get("cron"),
        "concurrency_limit": f"{EE_LIMIT} ({slots} slots)",
        "config": str(path),
    }
