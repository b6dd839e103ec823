"""Offline build throughput, end to end through the Prefect flow (sample, export, statistics).

    python bench/build.py [--tiles 1024] [--tile-size 128] [--workers N]

Prints a table and ends with ``bench: build tiles_per_s=<v> target=25 ok|short``. Target: >= 25 tiles/s
at 128 px on 2 cores, so that a 100k-tile offline corpus takes about an hour.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from flows.build_corpus import run_build  # noqa: E402
from mmearth_data.build import BuildConfig  # noqa: E402

TARGET = 25.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=1024)
    ap.add_argument("--tile-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-build-")
    store = f"{tmp}/bench.zarr"
    cfg = BuildConfig(store=store, n_tiles=args.tiles, tile_size=args.tile_size)
    t0 = time.perf_counter()
    summary = run_build(cfg, workers=args.workers, show_progress=False)
    wall = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store) for f in fs)
    rate = summary["tiles_exported"] / summary["seconds"]
    rows = [
        ("machine", f"{platform.machine()}, {os.cpu_count()} cores"),
        ("tiles x px", f"{args.tiles} x {args.tile_size}"),
        ("flow seconds (plan+export+stats)", f"{summary['seconds']:.1f}"),
        ("wall seconds incl. Prefect start", f"{wall:.1f}"),
        ("tiles/s through the flow", f"{rate:.1f}"),
        ("tiles/s incl. Prefect start", f"{args.tiles / wall:.1f}"),
        ("store bytes/tile", f"{size / args.tiles / 1e3:.1f} KB"),
        ("complete", f"{summary['complete']}/{args.tiles}"),
    ]
    w = max(len(k) for k, _ in rows)
    print("| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k.ljust(w)} | {v} |")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"bench: build tiles_per_s={rate:.1f} target={TARGET:g} {'ok' if rate >= TARGET else 'short'}")


if __name__ == "__main__":
    main()
