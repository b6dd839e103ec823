"""The ``mmearth`` command line: ``build``, ``ee-check``, ``validate``, ``repair``, ``tasks build`` and
``catalog build|search|serve`` (defined in :mod:`catalog.cli`).

Exit codes: 0 success, 1 the build or the store is not valid (reasons printed), 2 bad input (the
message names the problem and the fix; nothing already written is touched).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from rich.console import Console

from catalog import cli as catalog_cli
from flows.options import add_build_arguments, add_ee_arguments, build_config, ee_options
from mmearth_data.argtypes import cli_terms
from mmearth_data.build import BuildInputError
from mmearth_data.derive import DeriveError
from mmearth_data.mmearth_h5 import ExportError
from mmearth_data.store import StoreError

# bad input of any command: the message names the problem and the fix, exit 2
USER_ERRORS = (BuildInputError, StoreError, DeriveError, ExportError)

console = Console(stderr=False)
err_console = Console(stderr=True, soft_wrap=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmearth", description="Build and check MMEarth-style corpora.")
    sub = ap.add_subparsers(dest="command", required=True)

    add_build_arguments(sub.add_parser("build", help="build or resume a corpus store"))

    dp = sub.add_parser(
        "deploy",
        help="deploy the scheduled build of a config file to the Prefect server (README: Scaling out)",
    )
    dp.add_argument("--config", required=True, help="TOML file: [build], [catalog], [schedule], ...")
    dp.add_argument("--pool", help="process work pool (default: the config's, else mmearth)")
    dp.add_argument("--name", help="deployment name (default: the config's, else the file's name)")

    k = sub.add_parser(
        "ee-check",
        help="build 4 fixed tiles from Earth Engine into a temporary store and check their physics",
        description="The first thing to run after setting up Earth Engine (README: Building from Earth "
        "Engine). Exit 0: every check passed; 1: a check failed; 2: cannot run (network, credentials).",
    )
    add_ee_arguments(k)
    k.add_argument("--simulate", action="store_true", help="run against the offline world (no account)")
    k.add_argument("--keep", help="keep the 4-tile store in this folder (default: deleted)")

    tk = sub.add_parser("tasks", help="downstream evaluation tasks from held-out grid blocks")
    tsub = tk.add_subparsers(dest="tasks_command", required=True)
    tb = tsub.add_parser("build", help="build the task store (fields, objects, boundaries)")
    tb.add_argument("--out", required=True, help="task store path, e.g. data/tasks.zarr")
    tb.add_argument("--tiles", type=int, default=1200)
    tb.add_argument("--tile-size", type=int, default=64)
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument(
        "--balance", action=argparse.BooleanOptionalAction, default=True,
        help="draw held-out tiles until each fields class holds a quarter of them (default)",
    )  # fmt: skip
    tb.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1,
        help="processes generating candidate tiles (default: one per CPU; the store is the same for any)",
    )  # fmt: skip

    v = sub.add_parser("validate", help="check a store against the contract and summarise it")
    v.add_argument("--store", required=True)
    v.add_argument("--json", action="store_true")
    v.add_argument(
        "--deep", action="store_true",
        help="also re-read every chunk and compare each tile with the checksums written with it",
    )  # fmt: skip

    x = sub.add_parser(
        "export-h5", help="write MMEarth's HDF5 layout of a store (MMEarth-train and torchgeo read it)"
    )
    x.add_argument("--store", required=True)
    x.add_argument("--out", required=True, help="folder; the export goes into OUT/NAME/")
    x.add_argument(
        "--name", default="data_100k_v001",
        help="MMEarth's file stem: data_100k_v001 (128 px), data_1M_v001_64 (64 px) or data_1M_v001",
    )  # fmt: skip
    x.add_argument(
        "--dem-dtype", choices=["float32", "int16"], default="float32",
        help="float32 keeps our DEM exactly; int16 rounds it as MMEarth's release stores it (lossy)",
    )  # fmt: skip
    dv = sub.add_parser(
        "derive", help="a variant of a store: centre crop, stratified subset, new split, fewer modalities"
    )
    dv.add_argument("--store", required=True, help="the source store")
    dv.add_argument("--out", required=True, help="the derived store (a new path)")
    dv.add_argument("--crop", type=int, help="centre crop in pixels (64: MMEarth64 from 128 px tiles)")
    dv.add_argument("--subset", type=int, help="N tiles balanced over biome x year (MMEarth100k)")
    dv.add_argument("--split", help="new spatially blocked split, e.g. train=0.9,val=0.05,test=0.05")
    dv.add_argument("--modalities", help="modalities to keep, comma separated (sentinel2 required)")
    dv.add_argument("--seed", type=int, default=0)
    rp = sub.add_parser("repair", help="re-export the tiles that `validate --deep` finds damaged")
    rp.add_argument("--store", required=True)

    catalog_cli.add_parser(sub)
    return ap


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy

    res = deploy(args.config, args.pool, args.name)
    console.print(
        f"deployment [bold]{res['deployment']}[/] on work pool {res['pool']} (schedule: "
        f"{res['cron'] or 'none, runs on demand'}); Earth Engine requests share {res['concurrency_limit']}.\n"
        f"  start a worker:  prefect worker start --pool {res['pool']}\n"
        f"  run it now:      prefect deployment run '{res['deployment']}'"
    )
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    from mmearth_data.build import acquire_build_lock, check_request

    check_request(cfg)  # fail fast, before Prefect starts; reads only
    acquire_build_lock(cfg.store)  # and stop here if another build writes this store
    from flows.build_corpus import run_build

    summary = run_build(
        cfg, workers=args.workers, show_progress=not args.no_progress, dask_address=args.dask_address,
        dask_workers=args.dask_workers,
    )  # fmt: skip
    if args.json:
        console.print_json(json.dumps(summary, default=str))
    else:
        print_summary(summary)
    return 0 if summary["complete"] == cfg.n_tiles else 1


def print_summary(s: dict) -> None:
    from rich.table import Table

    t = Table(title="build summary", show_header=False)
    for k in (
        "store",
        "artifacts",
        "n_tiles",
        "complete",
        "shards_exported",
        "tiles_exported",
        "backfilled",
        "failed_attempts",
        "seconds",
        "tiles_per_s",
        "resumed",
    ):
        t.add_row(k, str(s.get(k)))
    for reason, n in s.get("failure_reasons", {}).items():
        t.add_row("failure", f"{n} x {reason}")
    console.print(t)


def cmd_ee_check(args: argparse.Namespace) -> int:
    from rich.table import Table

    from mmearth_data.ee_check import EECheckError, run_ee_check

    opts = ee_options(args)
    opts.pop("months")  # each check tile has its own season
    try:
        checks, info = run_ee_check(opts, simulate=args.simulate, keep=args.keep, say=console.print)
    except EECheckError as err:
        err_console.print(f"[bold red]error:[/] {cli_terms(err)}")
        return 2
    title = "ee-check" + (" (SIMULATED: the offline world, not Earth Engine)" if args.simulate else "")
    t = Table(title=title)
    for col in ("check", "result", "value", "expected"):
        t.add_column(col)
    for c in checks:
        t.add_row(c.name, "[green]pass[/]" if c.passed else "[bold red]FAIL[/]", c.value, c.expect)
    console.print(t)
    if args.simulate:
        eecu = "none (simulated)"
    elif info["eecu_s"] is None:
        eecu = "not reported (the profile service did not answer)"
    else:
        eecu = f"{info['eecu_s']:.1f} EECU-seconds for 4 tiles ({info['eecu_s'] / 4:.1f} per tile)"
    console.print(f"EECU used: {eecu}; {info['seconds']:.1f} s")
    if info.get("store"):
        console.print(f"store kept: {info['store']}")
    ok = all(c.passed for c in checks)
    console.print("all checks passed" if ok else "[bold red]some checks failed[/]")
    return 0 if ok else 1


def cmd_tasks(args: argparse.Namespace) -> int:
    from mmearth_data.tasks import TaskError, build_tasks

    try:
        res = build_tasks(
            args.out, args.tiles, args.tile_size, args.seed, balance=args.balance, workers=args.workers
        )
    except TaskError as err:
        err_console.print(f"[bold red]error:[/] {cli_terms(err)}")
        return 2
    console.print_json(json.dumps(res))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from mmearth_data.validate import print_report, validate_store

    report = validate_store(args.store, deep=args.deep)
    if args.json:
        console.print_json(json.dumps(report, default=str))
    else:
        print_report(report, console)
    return 0 if report["valid"] else 1


def cmd_export_h5(args: argparse.Namespace) -> int:
    from mmearth_data.mmearth_h5 import export_mmearth_h5

    folder = export_mmearth_h5(args.store, args.out, args.name, args.dem_dtype)
    console.print(f"MMEarth HDF5 layout written to {folder}")
    return 0


def cmd_derive(args: argparse.Namespace) -> int:
    from mmearth_data.derive import Derivation, derive_store, parse_split

    how = Derivation(
        crop=args.crop,
        subset=args.subset,
        split=parse_split(args.split) if args.split else None,
        modalities=tuple(m.strip() for m in args.modalities.split(",")) if args.modalities else None,
        seed=args.seed,
    )
    res = derive_store(args.store, args.out, how)
    console.print(
        f"derived {res['n_tiles']} tiles of {res['tile_size']} px ({', '.join(res['modalities'])}) into "
        f"{res['store']} from {res['from']}: {res['derivation']}"
    )
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    from mmearth_data.build import repair_store

    res = repair_store(args.store)
    if res["restored_metadata"]:
        console.print(f"restored metadata from the build's copy: {', '.join(res['restored_metadata'])}")
    if not res["shards"]:
        if not res["restored_metadata"]:
            console.print(f"nothing to repair: every tile of {args.store} matches its checksums")
        return 0
    console.print(
        f"{res['damaged_tiles']} damaged tiles in shards {res['shards']}: "
        + ("re-exported" if res["rebuilt"] else f"marked incomplete; {res['next']}")
    )
    if res.get("remaining"):
        err_console.print(f"[bold red]{res['remaining']} damaged tiles remain[/]")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {
        "build": cmd_build, "validate": cmd_validate, "repair": cmd_repair, "export-h5": cmd_export_h5,
        "derive": cmd_derive, "ee-check": cmd_ee_check, "tasks": cmd_tasks, "catalog": catalog_cli.run,
        "deploy": cmd_deploy,
    }  # fmt: skip
    if args.command not in commands:
        parser.error(f"unknown command {args.command}")
    try:
        return commands[args.command](args)
    except USER_ERRORS as err:
        err_console.print(f"[bold red]error:[/] {cli_terms(err)}")
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM (flows.guard.BuildInterrupted)
        err_console.print(
            f"\n[bold yellow]stopped[/] ({err or 'SIGINT'}): completed shards are kept; re-run the same "
            "command to resume"
        )
        return getattr(err, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
