"""The main job on the offline default: build the demo corpus, validate it, write its STAC catalog,
pretrain MP-MAE briefly on it, print where everything is.

    make run        # or: python -m flows.demo [--tiles 256] [--store data/demo.zarr] [--steps 30]

Re-running resumes the build (or does nothing when the store is complete; a demo store made by another
version of the generator is rebuilt) and starts a fresh short pretraining run in ``runs/demo``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rich.console import Console

from catalog.build import build_catalog
from flows.build_corpus import run_build
from flows.cli import print_summary
from mmearth_data.build import BuildConfig, build_dir
from mmearth_data.validate import print_report, validate_store
from model import pretrain

console = Console()


def replace_stale_demo(cfg: BuildConfig) -> bool:
    """The demo owns its store: one built by another version of the generator or with other options
    is deleted (with its artifacts) so that this run rebuilds it; anything else at the path is left to
    the build's own checks. Returns True when a store was replaced."""
    from mmearth_data.build import OtherBuildError, build_dir, check_store_path

    try:
        check_store_path(cfg)
    except OtherBuildError as err:
        console.print(f"[yellow]{err.args[0].split(';')[0]}: rebuilding the demo corpus")
        shutil.rmtree(cfg.store)
        shutil.rmtree(build_dir(cfg.store), ignore_errors=True)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--store", default="data/demo.zarr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30, help="pretraining steps (0: skip pretraining)")
    ap.add_argument("--run", default="runs/demo", help="pretraining run directory (replaced)")
    ap.add_argument("--catalog", default="data/demo.catalog", help="catalog directory (replaced)")
    args = ap.parse_args(argv)

    console.rule("[bold]1/4 build the demo corpus (offline source)")
    cfg = BuildConfig(store=args.store, n_tiles=args.tiles, seed=args.seed)
    replace_stale_demo(cfg)
    summary = run_build(cfg)
    print_summary(summary)

    console.rule("[bold]2/4 validate")
    report = validate_store(args.store)
    print_report(report, console)
    if not report["valid"]:
        return 1

    console.rule("[bold]3/4 STAC catalog (collection, items in GeoParquet, quicklooks)")
    shutil.rmtree(args.catalog, ignore_errors=True)
    cat = build_catalog(args.store, args.catalog)
    console.print(f"{cat['n_items']} items, {cat['quicklooks']} quicklooks in {cat['seconds']:.1f} s")

    if args.steps > 0:
        console.rule(f"[bold]4/4 pretrain MP-MAE briefly ({args.steps} steps, atto, 56 px, CPU or GPU)")
        shutil.rmtree(args.run, ignore_errors=True)
        opts = pretrain.options(
            store=args.store, out=args.run, model="atto", img_size=56, patch_size=8, batch_size=32,
            steps=args.steps, blr=1.5e-3, seed=args.seed,
        )  # fmt: skip
        rc = pretrain.run_and_report(opts)
        if rc:
            return rc

    art = build_dir(args.store)
    console.rule("[bold]where everything is")
    console.print(f"corpus store (Zarr v3)   {Path(args.store).resolve()}")
    console.print(f"sample plan (GeoParquet) {Path(art, 'plan.parquet').resolve()}")
    console.print(f"sample map               {Path(art, 'sample_map.png').resolve()}")
    console.print(f"biome x year counts      {Path(art, 'strata.png').resolve()}")
    console.print(f"failures                 {Path(art, 'failures.json').resolve()}")
    catdir = Path(args.catalog).resolve()
    console.print(f"STAC collection          {catdir / 'collection.json'}")
    console.print(f"STAC items (GeoParquet)  {catdir / 'items.parquet'}")
    console.print(f"browse page              .venv/bin/mmearth catalog serve --catalog {args.catalog}")
    console.print("                         then open http://127.0.0.1:8765/")
    if args.steps > 0:
        run = Path(args.run).resolve()
        console.print(f"checkpoint (safetensors) {run / 'model.safetensors'}")
        console.print(f"loss curves (CSV, plot)  {run / 'metrics.csv'}  {run / 'loss_curves.png'}")
        console.print(f"TensorBoard              tensorboard --logdir {run / 'tb'}")
    console.print(
        'open it:  python -c "import xarray as xr; '
        f"print(xr.open_zarr('{args.store}', consolidated=False))\""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
