"""The ``mmearth`` command line: ``build`` and ``validate``.

Exit codes: 0 success, 1 the build or the store is not valid (reasons printed), 2 bad input (the
message names the problem and the fix; nothing already written is touched).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from rich.console import Console

from mmearth_data.build import DEFAULT_MODALITIES, BuildConfig, BuildInputError

console = Console(stderr=False)
err_console = Console(stderr=True)


def parse_years(text: str) -> tuple[int, ...]:
    """'2017-2020' or '2017,2019' -> years."""
    try:
        years: list[int] = []
        for part in text.split(","):
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                if b < a:
                    raise ValueError
                years += range(a, b + 1)
            else:
                years.append(int(part))
        return tuple(sorted(set(years)))
    except ValueError:
        raise argparse.ArgumentTypeError(  # noqa: B904 (argparse prints only the message)
            f"years {text!r}: use a range like 2017-2020 or a list like 2017,2019"
        )


def _modalities(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmearth", description="Build and check MMEarth-style corpora.")
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build or resume a corpus store")
    b.add_argument("--source", default="offline", help="offline (default)")
    b.add_argument("--tiles", type=int, required=True, help="number of tiles (store size)")
    b.add_argument("--store", required=True, help="store path or fsspec URL, e.g. data/demo.zarr")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--tile-size", type=int, default=128, help="pixels per side, a multiple of 32 (128 or 64)")
    b.add_argument("--years", type=parse_years, default=(2017, 2018, 2019, 2020), help="e.g. 2017-2020")
    b.add_argument(
        "--modalities", type=_modalities, default=DEFAULT_MODALITIES, help="comma list; default all"
    )
    b.add_argument("--reserve", type=int, default=2, help="alternate tiles planned per tile (backfill)")
    b.add_argument("--shard-tiles", type=int, default=0, help="tiles per shard (default: from --tiles)")
    b.add_argument("--chunk-tiles", type=int, default=4, help="tiles per chunk")
    b.add_argument("--workers", type=int, default=None, help="parallel shard tasks (default: CPU count)")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")

    v = sub.add_parser("validate", help="check a store against the contract and summarise it")
    v.add_argument("--store", required=True)
    v.add_argument("--json", action="store_true")
    return ap


def cmd_build(args: argparse.Namespace) -> int:
    cfg = BuildConfig(
        store=args.store,
        n_tiles=args.tiles,
        source=args.source,
        seed=args.seed,
        tile_size=args.tile_size,
        years=args.years,
        modalities=args.modalities,
        reserve=args.reserve,
        chunk_tiles=args.chunk_tiles,
        shard_tiles=args.shard_tiles,
    )
    from mmearth_data.build import check_request

    check_request(cfg)  # fail fast, before Prefect starts; reads only
    from flows.build_corpus import run_build

    summary = run_build(cfg, workers=args.workers, show_progress=not args.no_progress)
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


def cmd_validate(args: argparse.Namespace) -> int:
    from mmearth_data.validate import print_report, validate_store

    report = validate_store(args.store)
    if args.json:
        console.print_json(json.dumps(report, default=str))
    else:
        print_report(report, console)
    return 0 if report["valid"] else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            return cmd_build(args)
        if args.command == "validate":
            return cmd_validate(args)
    except BuildInputError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
