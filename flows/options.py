"""The options of ``mmearth build`` (also the keys of a deployment's config file) and of the
Earth Engine source, and the :class:`~mmearth_data.build.BuildConfig` they make. Defaults are read
from the configuration classes (:class:`~mmearth_data.build.BuildConfig`,
:class:`~mmearth_data.sources.earthengine.EEConfig`), so each is written once.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from typing import Any

from mmearth_data.argtypes import int_in as _int_in
from mmearth_data.argtypes import years as parse_years
from mmearth_data.build import BuildConfig, BuildInputError


def _default(cls: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``cls``."""
    return next(f.default for f in fields(cls) if f.name == name)


MAX_TILES = 10_000_000  # far above any stratum capacity; a typo such as 10**12 stops before Prefect starts


def _modalities(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_build_arguments(b: argparse.ArgumentParser) -> None:
    """The options of ``mmearth build`` (also those of a deployment's config file)."""
    b.add_argument(
        "--source", default=_default(BuildConfig, "source"), help="offline (default), earthengine or local"
    )
    b.add_argument(
        "--rasters", default=None,
        help="--source local: a folder of GeoTIFF/JP2/COG files or a static STAC catalog JSON",
    )  # fmt: skip
    b.add_argument(
        "--tiles", type=_int_in(1, MAX_TILES, "the number of tiles"), required=True,
        help="number of tiles (store size)",
    )  # fmt: skip
    b.add_argument("--store", required=True, help="store path or fsspec URL, e.g. data/demo.zarr")
    b.add_argument("--seed", type=_int_in(0, 2**63 - 1, "the seed"), default=_default(BuildConfig, "seed"))
    b.add_argument(
        "--tile-size",
        type=int,
        default=_default(BuildConfig, "tile_size"),
        help="pixels per side, a multiple of 32 (128 or 64)",
    )
    b.add_argument("--years", type=parse_years, default=_default(BuildConfig, "years"), help="e.g. 2017-2020")
    b.add_argument(
        "--modalities",
        type=_modalities,
        default=_default(BuildConfig, "modalities"),
        help="comma list; default all",
    )
    b.add_argument(
        "--reserve", type=_int_in(0, 100, "the reserve"), default=_default(BuildConfig, "reserve"),
        help="alternate tiles planned per tile (backfill)",
    )  # fmt: skip
    b.add_argument(
        "--shard-tiles",
        type=int,
        default=_default(BuildConfig, "shard_tiles"),
        help="tiles per shard (default: from --tiles)",
    )
    b.add_argument(
        "--chunk-tiles",
        type=int,
        default=_default(BuildConfig, "chunk_tiles"),
        help="tiles per chunk (default: 16 or a divisor of the shard)",
    )
    b.add_argument(
        "--faults",
        help="inject faults, e.g. transient=0.1,permanent=0.01,corrupt=0.01,slow=0.05,slow_s=0.2,seed=0 "
        "(tests and benchmarks of the build's retries, backfill and payload checks)",
    )
    b.add_argument(
        "--compression",
        default=_default(BuildConfig, "compression"),
        help="compact (default: Pcodec for the DEM, Blosc/Zstd for the rest) or "
        "portable (Blosc/Zstd only, for Zarr v3 readers without numcodecs extension codecs); both lossless",
    )
    b.add_argument(
        "--extend", action="store_true",
        help="grow a complete store, keeping every written shard: to --tiles tiles (new tiles in --years), "
        "or by the modalities --modalities adds to the stored ones (each tile's from its own scene)",
    )  # fmt: skip
    b.add_argument("--workers", type=int, default=None, help="parallel shard tasks (default: CPU count)")
    d = b.add_mutually_exclusive_group()
    d.add_argument(
        "--dask-address", help="run shard tasks and statistics on this Dask scheduler, tcp://HOST:8786"
    )
    d.add_argument(
        "--dask-workers", type=_int_in(1, 4096, "--dask-workers"),
        help="run shard tasks and statistics on a local Dask cluster of this many worker processes",
    )  # fmt: skip
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    e = b.add_argument_group("earthengine source (see README: Earth Engine)")
    add_ee_arguments(e)


def parse_months(text: str) -> tuple[int, int]:
    """'6-8' or '11-2' (wrapping the year) or '7' -> (first, last) calendar months."""
    try:
        a, _, b = text.partition("-")
        first, last = int(a), int(b or a)
        if not (1 <= first <= 12 and 1 <= last <= 12):
            raise ValueError
        return first, last
    except ValueError:
        raise argparse.ArgumentTypeError(  # noqa: B904 (argparse prints only the message)
            f"months {text!r}: use FIRST-LAST calendar months from 1 to 12, e.g. 6-8 or 11-2"
        )


def add_ee_arguments(e: argparse._ActionsContainer) -> None:
    """The earthengine source's options (build and ee-check)."""
    from mmearth_data.sources.earthengine import EEConfig

    def d(name: str) -> Any:
        return _default(EEConfig, name)

    e.add_argument("--project", help="Cloud project registered for Earth Engine (or EE_PROJECT)")
    e.add_argument("--ee-key", help="service-account key JSON (or EE_SERVICE_ACCOUNT_KEY); default: ADC")
    e.add_argument(
        "--max-in-flight", type=int, default=d("max_in_flight"), help="cap on concurrent requests (quota)"
    )
    e.add_argument(
        "--s2-level",
        default=d("s2_level"),
        choices=["auto", "L2A", "L1C"],
        help="auto: L2A where the tile has an acceptable L2A scene, else L1C (every year)",
    )
    e.add_argument(
        "--max-scene-cloud",
        type=float,
        default=d("max_scene_cloud"),
        help="per cent of the tile's pixels cloudy (tile score)",
    )
    e.add_argument(
        "--max-granule-cloud",
        type=float,
        default=d("max_granule_cloud"),
        help="per cent, granule CLOUDY_PIXEL_PERCENTAGE pre-filter (saves EECU)",
    )
    e.add_argument(
        "--cs-threshold", type=float, default=d("cs_threshold"), help="Cloud Score+ cs below this is cloudy"
    )
    e.add_argument(
        "--scene-choice",
        default=d("scene_choice"),
        choices=["random", "least_cloudy"],
        help="among acceptable scenes: seeded at random per tile, or the least cloudy (random ties)",
    )
    e.add_argument("--months", type=parse_months, help="calendar months the scene may come from, e.g. 6-8")
    e.add_argument(
        "--max-gap-days", type=int, default=d("max_gap_days"), help="Sentinel-1 to Sentinel-2 date gap"
    )
    e.add_argument(
        "--resolve-buffer-m",
        type=float,
        default=d("resolve_buffer_m"),
        help="reach of the nearest RESOLVE polygon (coasts)",
    )
    e.add_argument("--no-high-volume", action="store_true", help="use the standard endpoint")
    e.add_argument(
        "--concurrency-limit",
        help="also take a slot of this Prefect global concurrency limit per request, shared by builds on "
        "every machine (mmearth deploy creates earthengine-requests)",
    )


def ee_options(args: argparse.Namespace) -> dict:
    """Earth Engine options for the build. The key file's path goes through the environment, not the
    options, so that it never reaches Prefect's flow-run parameters."""
    if args.ee_key:
        os.environ["EE_SERVICE_ACCOUNT_KEY"] = args.ee_key
    return {
        "project": args.project,
        "max_in_flight": args.max_in_flight,
        "s2_level": args.s2_level,
        "max_scene_cloud": args.max_scene_cloud,
        "max_granule_cloud": args.max_granule_cloud,
        "cs_threshold": args.cs_threshold,
        "scene_choice": args.scene_choice,
        "months": args.months,
        "max_gap_days": args.max_gap_days,
        "resolve_buffer_m": args.resolve_buffer_m,
        "high_volume": not args.no_high_volume,
        "concurrency_limit": args.concurrency_limit,
    }


def build_config(args: argparse.Namespace) -> BuildConfig:
    """The :class:`BuildConfig` of parsed ``mmearth build`` arguments (also those of a deployment's
    config file); checks the options that are not part of the configuration."""
    if args.dask_address and not args.dask_address.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        raise BuildInputError(
            f"--dask-address {args.dask_address}: give the scheduler's address with its protocol, "
            "e.g. tcp://10.0.0.5:8786 (nothing was changed)"
        )
    if (args.source == "local") != bool(args.rasters):
        raise BuildInputError(
            "--source local needs --rasters DIR_OR_STAC (a folder of GeoTIFF/JP2 files or a STAC catalog)"
            if args.source == "local"
            else f"--rasters is read by --source local only (this build's source is {args.source})"
        )
    return BuildConfig(
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
        compression=args.compression,
        source_options=(ee_options(args) if args.source == "earthengine" else {})
        | ({"rasters": os.path.abspath(args.rasters)} if args.rasters else {})
        | ({"faults": args.faults} if args.faults else {}),
        extend=args.extend,
    )
