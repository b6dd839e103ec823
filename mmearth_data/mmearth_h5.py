"""Export a corpus store to MMEarth's HDF5 layout, which MMEarth-train and torchgeo's ``MMEarth`` read.

The layout (MMEarth-data's release, as its readers expect it): a folder ``<name>/`` holding

- ``<name>.h5``: one dataset per modality with the tile axis first, one chunk per tile, gzip level 4:
  ``sentinel2`` uint16 (n, 13, H, W) in MMEarth's band order (B1-B7, **B8A, B8**, B9-B12; 0 = no data),
  ``sentinel2_cloudmask`` (QA60) and ``sentinel2_cloudprod`` (MSK_CLDPRB) uint16 (65535 = no data),
  ``sentinel2_scl`` uint16 (255), ``sentinel1`` float32 (n, 8, H, W) ascending VV, VH, HH, HV then
  descending (-inf), ``aster`` (elevation, slope; float32 with -inf, or int16 as MMEarth writes it),
  ``canopy_height_eth`` int8 (n, 2, H, W) (our 0-254 m and fill 255 reinterpreted: heights above 127 m
  and the fill read back negative), ``dynamic_world`` uint8 (n, 1, H, W) classes 1-9 (0),
  ``esa_worldcover`` uint8 (n, 1, H, W) codes 10-100 (255), ``era5`` float32 (n, 12) (inf),
  ``biome`` uint8 one-hot (n, 14), ``eco_region`` uint16 one-hot (n, 846), ``lat``/``lon`` float32
  (n, 2) sine and cosine, ``month`` float32 (n, 2), and ``metadata`` records (tile id, S2 type);
- ``<name>_tile_info.json``: per tile id ``S2_DATE``, ``S2_type`` (l1c / l2a), ``lat``, ``lon``,
  ``CRS`` and ``BANDS`` (bands delivered per modality; ERA5's monthly bands named by their month,
  ``YYYYMM_temperature_2m``, as MMEarth names them);
- ``<name>_band_stats.json``: mean, std, min, max per band for ``sentinel2_l1c``, ``sentinel2_l2a``,
  ``sentinel1``, ``aster``, ``canopy_height_eth``, ``era5``, ``lat``, ``lon``, ``month`` (from the
  store's statistics where it has them, else computed over the exported values);
- ``<name>_splits.json``: ``train`` / ``val`` / ``test`` lists of row indices.

Only complete tiles are exported, in store order.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pandas as pd

from mmearth_data.registry import get
from mmearth_data.store import CorpusReader

S2_ORDER = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B10", "B11", "B12")
S1_ORDER = ("VV_asc", "VH_asc", "HH_asc", "HV_asc", "VV_desc", "VH_desc", "HH_desc", "HV_desc")
ERA5_NAMES = (
    "prev_temperature_2m", "prev_temperature_2m_min", "prev_temperature_2m_max",
    "prev_total_precipitation_sum",
    "curr_temperature_2m", "curr_temperature_2m_min", "curr_temperature_2m_max",
    "curr_total_precipitation_sum",
    "0_temperature_2m_mean", "1_temperature_2m_min_min", "2_temperature_2m_max_max",
    "3_total_precipitation_sum_sum",
)  # fmt: skip
N_BIOMES, N_ECOREGIONS = 14, 846


class ExportError(ValueError):
    """An export that cannot be made (the message names the problem and the fix; nothing is written)."""


def _one_hot(codes: np.ndarray, n: int, dtype: Any) -> np.ndarray:
    """Classes 1..n as MMEarth's one-hot rows (all zero for 0, no label)."""
    out = np.zeros((len(codes), n), dtype)
    ok = (codes >= 1) & (codes <= n)
    out[np.flatnonzero(ok), codes[ok].astype(int) - 1] = 1
    return out


def _moments(x: np.ndarray) -> dict[str, list[float]]:
    """Per-band mean/std/min/max over finite values; ``x`` is (n, bands, ...)."""
    v = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1).astype(np.float64)
    v = np.where(np.isfinite(v), v, np.nan)
    return {
        "mean": np.nanmean(v, 1).tolist(),
        "std": np.nanstd(v, 1).tolist(),
        "min": np.nanmin(v, 1).tolist(),
        "max": np.nanmax(v, 1).tolist(),
    }


def _from_store(stats: dict[str, Any], bands: tuple[str, ...]) -> dict[str, list[float]]:
    """Per-band statistics from the store's; a band without data (B10 of L2A) gets mean 0, std 1."""
    empty = {"mean": 0.0, "std": 1.0, "min": 0.0, "max": 0.0}
    return {
        k: [float(stats[b][k]) if stats[b].get(k) is not None else empty[k] for b in bands]
        for k in ("mean", "std", "min", "max")
    }


NEEDED = ("biome", "canopy_height", "dem", "dynamic_world", "ecoregion", "era5", "esa_worldcover",
          "sentinel1", "sentinel2", "sentinel2_masks")  # fmt: skip


def export_mmearth_h5(url: str, out: str, name: str = "data_100k_v001", dem_dtype: str = "float32") -> str:
    """Write the complete tiles of the store at ``url`` into ``out/name/`` (see the module docstring);
    returns that folder. ``dem_dtype="int16"`` rounds the DEM as MMEarth's release stores it."""
    import h5py

    r, final = _check_request(url, out, name, dem_dtype)
    meta = r.tiles()
    rows = np.flatnonzero(meta["complete"].to_numpy())
    folder = os.path.join(out, f".{name}.partial")  # renamed into place once whole
    if os.path.exists(folder):
        import shutil

        shutil.rmtree(folder)
    os.makedirs(folder)
    f = h5py.File(os.path.join(folder, f"{name}.h5"), "w")
    out_ds = _datasets(f, len(rows), r.tile_size, dem_dtype)
    ids = meta["tile_id"].to_numpy()[rows].astype(str)
    s2_level = meta["s2_product"].to_numpy()[rows].astype(str)
    record = np.dtype([("meta_id", f"S{max(len(t) for t in ids)}"), ("S2_type", "S3")])
    recs = [(t.encode(), lv.lower().encode()) for t, lv in zip(ids, s2_level, strict=True)]
    f.create_dataset("metadata", data=np.array(recs, record))
    tile_info: dict[str, Any] = {}
    pos = 0
    extra: dict[str, list] = {"aster": [], "lat": [], "lon": [], "month": []}
    for k in range(r.n_shards):
        s0, s1 = r.shard_range(k)
        keep = np.flatnonzero(meta["complete"].to_numpy()[s0:s1])
        if not len(keep):
            continue
        d = r.read(list(NEEDED) + [f"{m}_present" for m in NEEDED], s0, s1)
        d = {key: v[keep] for key, v in d.items()}
        a, b = pos, pos + len(keep)
        _write_pixels(out_ds, d, a, b, dem_dtype)
        extra["aster"].append(np.where(np.isnan(d["dem"]), np.nan, d["dem"])[:, :, ::4, ::4])
        rows_k = s0 + keep
        _write_location(out_ds, meta, rows_k, a, b, extra)
        for j, i in enumerate(rows_k):
            tile_info[str(meta["tile_id"].iloc[i])] = _tile_info(meta.iloc[i], s2_level[a + j], d, j)
        pos = b
    f.close()
    split = meta["split"].to_numpy()[rows].astype(str)
    splits = {s: np.flatnonzero(split == s).tolist() for s in ("train", "val", "test")}
    band_stats = _band_stats(r.statistics, extra)
    for suffix, obj in (("tile_info", tile_info), ("band_stats", band_stats), ("splits", splits)):
        with open(os.path.join(folder, f"{name}_{suffix}.json"), "w") as fh:
            json.dump(obj, fh, allow_nan=False)
    os.rename(folder, final)
    return final


def _check_request(url: str, out: str, name: str, dem_dtype: str) -> tuple[CorpusReader, str]:
    """(the store's reader, the folder to write) or :class:`ExportError`; nothing is written."""
    if dem_dtype not in ("float32", "int16"):
        raise ExportError(f"dem_dtype {dem_dtype!r}: use float32 (lossless) or int16 (MMEarth's)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"`out` {out} is a file; name a folder (nothing was changed)")
    final = os.path.join(out, name)
    if os.path.exists(final):
        raise ExportError(f"{final} already exists; choose another `out` or `name` (nothing was changed)")
    r = CorpusReader(url)
    missing = set(NEEDED) - {m.name for m in r.modalities}
    if missing:
        raise ValueError(f"{url} lacks {', '.join(sorted(missing))}; MMEarth's layout needs every modality")
    return r, final


def _datasets(f: Any, n: int, S: int, dem_dtype: str) -> dict[str, Any]:
    """MMEarth's HDF5 datasets of ``n`` tiles of ``S`` px (gzip, one tile per chunk)."""

    def ds(key: str, shape: tuple[int, ...], dtype: Any) -> Any:
        return f.create_dataset(
            key, shape=(n, *shape), dtype=dtype, chunks=(1, *shape), compression="gzip", compression_opts=4
        )

    return {
        "sentinel2": ds("sentinel2", (13, S, S), "uint16"),
        "sentinel2_cloudmask": ds("sentinel2_cloudmask", (1, S, S), "uint16"),
        "sentinel2_cloudprod": ds("sentinel2_cloudprod", (1, S, S), "uint16"),
        "sentinel2_scl": ds("sentinel2_scl", (1, S, S), "uint16"),
        "sentinel1": ds("sentinel1", (8, S, S), "float32"),
        "aster": ds("aster", (2, S, S), dem_dtype),
        "canopy_height_eth": ds("canopy_height_eth", (2, S, S), "int8"),
        "dynamic_world": ds("dynamic_world", (1, S, S), "uint8"),
        "esa_worldcover": ds("esa_worldcover", (1, S, S), "uint8"),
        "era5": ds("era5", (12,), "float32"),
        "biome": ds("biome", (N_BIOMES,), "uint8"),
        "eco_region": ds("eco_region", (N_ECOREGIONS,), "uint16"),
        "lat": ds("lat", (2,), "float32"),
        "lon": ds("lon", (2,), "float32"),
        "month": ds("month", (2,), "float32"),
    }


def _write_pixels(out_ds: dict[str, Any], d: dict[str, np.ndarray], a: int, b: int, dem_dtype: str) -> None:
    """Rows ``a:b`` of the modality datasets, in MMEarth's bands, dtypes and no-data values."""
    s2_idx = [get("sentinel2").bands.index(band) for band in S2_ORDER]
    mask_bands = get("sentinel2_masks").bands
    out_ds["sentinel2"][a:b] = d["sentinel2"][:, s2_idx]
    masks = d["sentinel2_masks"]
    for key, band, fill in (
        ("sentinel2_cloudmask", "QA60", 65535),
        ("sentinel2_cloudprod", "MSK_CLDPRB", 65535),
    ):
        v = masks[:, mask_bands.index(band)].astype(np.uint16)
        out_ds[key][a:b] = np.where(v == 255, fill, v)[:, None]
    out_ds["sentinel2_scl"][a:b] = masks[:, mask_bands.index("SCL")][:, None].astype(np.uint16)
    s1 = d["sentinel1"].astype(np.float32)
    out_ds["sentinel1"][a:b] = np.where(np.isnan(s1), -np.inf, s1)
    dem = d["dem"]
    if dem_dtype == "int16":
        dem = np.where(np.isnan(dem), -32768, np.round(dem)).astype(np.int16)
    else:
        dem = np.where(np.isnan(dem), -np.inf, dem)
    out_ds["aster"][a:b] = dem
    out_ds["canopy_height_eth"][a:b] = d["canopy_height"].view(np.int8)  # MMEarth's int8: 255 -> -1
    out_ds["dynamic_world"][a:b] = d["dynamic_world"]
    out_ds["esa_worldcover"][a:b] = np.where(d["esa_worldcover"] == 0, 255, d["esa_worldcover"])
    out_ds["era5"][a:b] = np.where(np.isnan(d["era5"]), np.inf, d["era5"])
    out_ds["biome"][a:b] = _one_hot(d["biome"], N_BIOMES, np.uint8)
    out_ds["eco_region"][a:b] = _one_hot(d["ecoregion"], N_ECOREGIONS, np.uint16)


def _write_location(
    out_ds: dict[str, Any], meta: pd.DataFrame, rows_k: np.ndarray, a: int, b: int, extra: dict[str, list]
) -> None:
    """Rows ``a:b`` of ``lat``, ``lon`` and ``month`` as MMEarth encodes them (sin, cos)."""
    lat = np.radians(meta["lat"].to_numpy()[rows_k])
    lon = np.radians(meta["lon"].to_numpy()[rows_k])
    date = meta["s2_date"].to_numpy()[rows_k].astype("datetime64[M]")
    month = (date.astype(int) % 12 + 1).astype(np.float64)
    for key, v in (("lat", lat), ("lon", lon), ("month", 2 * np.pi * month / 12)):
        enc = np.stack([np.sin(v), np.cos(v)], 1).astype(np.float32)
        out_ds[key][a:b] = enc
        extra[key].append(enc)


def _tile_info(row: pd.Series, level: str, d: dict[str, np.ndarray], j: int) -> dict[str, Any]:
    """One tile's entry of ``tile_info.json``: date, level, place, CRS and the bands it holds."""
    day = row["s2_date"]
    curr = day.strftime("%Y%m") if not pd.isna(day) else "curr"
    prev = (day.replace(day=1) - pd.Timedelta(days=1)).strftime("%Y%m") if not pd.isna(day) else "prev"
    era5_bands = [b.replace("prev", prev).replace("curr", curr) for b in ERA5_NAMES]
    return {
        "S2_DATE": day.strftime("%Y-%m-%d") if not pd.isna(day) else "",
        "S2_type": level.lower(),
        "lat": float(row["lat"]),
        "lon": float(row["lon"]),
        "CRS": f"EPSG:{int(row['epsg'])}",
        "BANDS": {
            "sentinel2": list(S2_ORDER),
            "sentinel1_asc": ["VV", "VH", "HH", "HV"] if d["sentinel1_present"][j] else [],
            "sentinel1_desc": ["VV", "VH", "HH", "HV"] if d["sentinel1_present"][j] else [],
            "aster": ["b1", "slope"] if d["dem_present"][j] else [],
            "era5": era5_bands if d["era5_present"][j] else [],
            "dynamic_world": ["label"] if d["dynamic_world_present"][j] else [],
            "canopy_height_eth": ["height", "std"] if d["canopy_height_present"][j] else [],
            "esa_worldcover": ["Map"] if d["esa_worldcover_present"][j] else [],
        },
    }


def _band_stats(st: dict[str, Any], extra: dict[str, list]) -> dict[str, Any]:
    """``band_stats.json``: the store's statistics in MMEarth's bands, and moments of what MMEarth
    derives (the DEM as exported, the encoded location and month)."""
    s2 = st.get("sentinel2", {})
    band_stats = {
        "sentinel2_l1c": _from_store(s2["L1C"], S2_ORDER) if "L1C" in s2 else None,
        "sentinel2_l2a": _from_store(s2["L2A"], S2_ORDER) if "L2A" in s2 else None,
        "sentinel1": _from_store(st["sentinel1"], S1_ORDER),
        "aster": _moments(np.concatenate(extra["aster"])),
        "canopy_height_eth": _from_store(st["canopy_height"], ("height", "std")),
        "era5": _from_store(st["era5"], get("era5").bands),
        "lat": _moments(np.concatenate(extra["lat"])),
        "lon": _moments(np.concatenate(extra["lon"])),
        "month": _moments(np.concatenate(extra["month"])),
    }
    fallback = band_stats["sentinel2_l2a"] or band_stats["sentinel2_l1c"]
    for level in ("sentinel2_l1c", "sentinel2_l2a"):
        band_stats[level] = band_stats[level] or fallback
    return band_stats
