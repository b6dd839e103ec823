"""The main job on the offline default: build the demo corpus, validate it, print where things are.

    make run        # or: python -m flows.demo [--tiles 256] [--store data/demo.zarr]

Re-running resumes (or does nothing when the store is complete).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from flows.build_corpus import run_build
from flows.cli import print_summary
from mmearth_data.build import BuildConfig, build_dir
from mmearth_data.validate import print_report, validate_store

console = Console()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--store", default="data/demo.zarr")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    console.rule("[bold]1/2 build the demo corpus (offline source)")
    cfg = BuildConfig(store=args.store, n_tiles=args.tiles, seed=args.seed)
    summary = run_build(cfg)
    print_summary(summary)

    console.rule("[bold]2/2 validate")
    report = validate_store(args.store)
    print_report(report, console)

    art = build_dir(args.store)
    console.rule("[bold]where everything is")
    console.print(f"corpus store (Zarr v3)   {Path(args.store).resolve()}")
    console.print(f"sample plan (GeoParquet) {Path(art, 'plan.parquet').resolve()}")
    console.print(f"sample map               {Path(art, 'sample_map.png').resolve()}")
    console.print(f"biome x year counts      {Path(art, 'strata.png').resolve()}")
    console.print(f"failures                 {Path(art, 'failures.json').resolve()}")
    console.print(
        'open it:  python -c "import xarray as xr; '
        f"print(xr.open_zarr('{args.store}', consolidated=False))\""
    )
    return 0 if report["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
