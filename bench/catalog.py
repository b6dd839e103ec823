"""Catalog at MMEarth scale: build a 1.2M-item stac-geoparquet table, then search it.

    python bench/catalog.py [--items 1200000] [--batch 50000]

The items come from synthetic per-tile metadata (random land-ish centres on the real global grid's UTM
zones, biomes 1-14, years 2017-2020, clouds, modality flags) fed through the same streaming writer
``mmearth catalog build`` uses (``catalog.build.write_items``), batch by batch. Reports build time,
peak memory (RSS high-water mark of this process, over its start), the latency of a bbox + biome
search (median of 5, cold file cache not forced), and the browse page's queries (counts and biome x
year table, density image, footprints, tile list; min / median / max of 5 fresh filters each). Ends
with ``bench: catalog page_query_max_s=<value> search_s=<value> target=1 ok|short`` (target: every page
query under 1 s).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

# run as a script, this file's folder comes first on sys.path and its name would hide the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from catalog.build import write_items  # noqa: E402
from catalog.search import Query, search  # noqa: E402
from mmearth_data.grid import GlobalGrid, tile_transforms, utm_epsg  # noqa: E402

MODALITIES = ["sentinel2", "sentinel2_masks", "sentinel1", "dem", "era5", "dynamic_world", "esa_worldcover",
              "canopy_height", "biome", "ecoregion"]  # fmt: skip
TARGET_S = 1.0


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(n: int, batch: int, seed: int = 0, tile_size: int = 128, first_index: int = 0):
    """Per-tile metadata frames of ``n`` synthetic tiles, ``batch`` at a time (``catalog.build.write_items``'s
    input), store indices from ``first_index``."""
    grid = GlobalGrid(tile_size)
    rng = np.random.default_rng(seed)
    for s0 in range(0, n, batch):
        k = min(batch, n - s0)
        lat = rng.uniform(-56, 75, k)
        lon = rng.uniform(-180, 180, k)
        rows, cols = grid.cell_of(lat, lon)
        lat, lon = grid.center(rows, cols)
        epsg = utm_epsg(lat, lon)
        df = pd.DataFrame(
            {
                "index": np.arange(first_index + s0, first_index + s0 + k),
                "tile_id": grid.tile_ids(rows, cols),
                "lat": lat,
                "lon": lon,
                "epsg": epsg,
                "s2_date": np.datetime64("2017-01-01") + rng.integers(0, 4 * 365, k).astype("timedelta64[D]"),
                "year": rng.integers(2017, 2021, k),
                "split": rng.choice(["train", "val", "test"], k, p=[0.9, 0.05, 0.05]),
                "cloud_fraction": rng.beta(0.8, 6, k).astype(np.float32),
                "biome": rng.integers(1, 15, k),
                "ecoregion": rng.integers(1, 847, k),
            }
        )
        df["s2_product"] = np.where(df["s2_date"] >= np.datetime64("2019-01-01"), "L2A", "L1C")
        for m in MODALITIES:
            df[f"{m}_present"] = rng.random(k) < (0.9 if m == "sentinel1" else 1.0)
        df["transform"] = list(tile_transforms(lat, lon, epsg, tile_size))
        yield df


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1_200_000)
    ap.add_argument("--batch", type=int, default=50_000)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    rss0 = rss_mb()
    t0 = time.perf_counter()
    done = {"n": 0}

    def batches():
        for df in synthetic(args.items, args.batch):
            done["n"] += len(df)
            yield df
            print(
                f"  {done['n']:>9,} items  {time.perf_counter() - t0:6.1f} s  peak RSS {rss_mb():.0f} MB",
                flush=True,
            )

    acc = write_items(batches(), out / "items.parquet", 128, "bench", "../store.zarr", MODALITIES, False)
    build_s = time.perf_counter() - t0
    peak = rss_mb()
    size_mb = (out / "items.parquet").stat().st_size / 1e6
    q = Query(bbox=(5.0, 45.0, 15.0, 55.0), biome=(4,))
    lat = []
    hits = 0
    for _ in range(5):
        t = time.perf_counter()
        hits = search(out, q).num_rows
        lat.append(time.perf_counter() - t)
    q2 = Query(bbox=(-10.0, 35.0, 30.0, 60.0), biome=(4, 5), year=(2019,), has=("sentinel1",), max_cloud=10)
    t = time.perf_counter()
    hits2 = search(out, q2).num_rows
    lat2 = time.perf_counter() - t
    med = statistics.median(lat)
    page = page_queries(out)
    print(f"| catalog of {acc.n:,} synthetic items | value |")
    print("|---|---:|")
    print(f"| build seconds (items -> stac-geoparquet) | {build_s:.1f} |")
    print(f"| items per second | {acc.n / build_s:,.0f} |")
    print(f"| peak RSS MB (process start: {rss0:.0f} MB) | {peak:.0f} |")
    print(f"| items.parquet MB | {size_mb:.1f} |")
    print(f"| search bbox 5..15E 45..55N + biome 4: seconds (median of 5) | {med:.3f} ({hits} hits) |")
    print(
        f"| search bbox + 2 biomes + year + has sentinel1 + cloud <= 10 %: seconds "
        f"| {lat2:.3f} ({hits2} hits) |"
    )
    print()
    print("| browse page query (1500 x 560 px map: density of 375 x 140 cells) | min s | median s | max s |")
    print("|---|---:|---:|---:|")
    for name, times in page.items():
        print(f"| {name} | {min(times):.3f} | {statistics.median(times):.3f} | {max(times):.3f} |")
    worst = max(max(t) for name, t in page.items() if name != "open the index (once, at server start)")
    verdict = "ok" if worst < TARGET_S else "short"
    print(f"bench: catalog page_query_max_s={worst:.3f} search_s={med:.3f} target={TARGET_S:g} {verdict}")


def page_queries(catalog: Path, repeats: int = 5) -> dict[str, list[float]]:
    """Seconds of the browse page's queries (``catalog.browse.BrowseIndex``), each a fresh filter
    (the index caches answers: a repeated query would be free)."""
    from catalog.browse import BrowseIndex, Filters

    out: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        t = time.perf_counter()
        fn()
        out.setdefault(name, []).append(time.perf_counter() - t)

    box: dict[str, BrowseIndex] = {}
    timed("open the index (once, at server start)", lambda: box.setdefault("i", BrowseIndex(catalog)))
    idx = box["i"]
    mods = idx.modalities
    for k in range(repeats):
        world = Filters.parse({"bbox": "-180,-90,180,90", "max_cloud": str(90 + k)}, mods)
        europe = Filters.parse({"bbox": f"-10,35,{30 + k},60", "biome": "4,5", "year": "2018-2019",
                                "has": "sentinel1", "max_cloud": "10"}, mods)  # fmt: skip
        city = Filters.parse({"bbox": f"{12.3 + k / 100},52.3,12.7,52.7"}, mods)
        timed("first draw: world counts + biome x year table", lambda f=world: idx.summary(f))
        timed("first draw: world density image", lambda f=world: idx.density_png(f, 375, 140))
        timed(
            "filter change: Europe, 2 biomes, 2 years, has, cloud: counts + table",
            lambda f=europe: idx.summary(f),
        )
        timed("filter change: Europe density image", lambda f=europe: idx.density_png(f, 375, 140))
        timed("zoomed in: footprints of a 0.4 degree view", lambda f=city: idx.footprints(f))
        timed("download: tile list of the Europe selection", lambda f=europe: idx.tile_ids(f))
    return out


if __name__ == "__main__":
    main()
