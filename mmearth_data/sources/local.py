"""Local rasters: tiles built from the user's own GeoTIFF / JP2 / COG files, or from a static STAC
catalog of such files (``mmearth build --source local --rasters DIR_OR_CATALOG``).

Data flow: files -> :func:`inventory` (what each file holds: modality, bands, scene, date, product,
footprint) -> the plan (tiles inside the Sentinel-2 scenes' footprints, ``sample_in_footprints``)
-> :meth:`LocalSource.fetch`: each file's bands reprojected onto the tile's UTM 10 m grid with the
registry's resampling (any CRS, any resolution; GDAL's warper reads only the blocks it needs).

What a file holds is read from its name or its STAC item:

- Sentinel-2, one band per file (the SAFE granule naming ``T33UUU_20170216T102101_B04.jp2`` is L1C,
  ``..._B04_10m.jp2`` L2A; ``MSIL1C`` / ``MSIL2A`` in the path decide too), or a multi-band file whose band
  descriptions are band names (``B2`` .. ``B12``, ``B8A``); the acquisition day comes from the name
  (``YYYYMMDDTHHMMSS``) or the STAC item's ``datetime``; the product from the name or the item's
  ``processing:level`` / ``s2:processing_level``. STAC assets are matched by key (``B04``, ``B4``), by
  ``eo:bands`` / ``bands`` names or by their common names (``red``, ``nir``, ...).
- a DEM: a single-band file with ``dem`` in its name, or a STAC asset keyed ``dem`` / ``elevation``;
  slope is computed on the tile's 10 m grid from the resampled elevation.
- any other pixel modality of the registry: a file whose name starts with the modality's name (or a
  STAC asset keyed by it) with the registry's number of bands, in registry order.

A tile's Sentinel-2 scene is the earliest of its year (or the stored one, for a tile getting
modalities added) that covers the whole tile with data (no zero in the 10 m bands). Modalities
without a raster over the whole tile are absent (fill, ``present`` false), never made up. Scenes of
processing baseline 04.00 (from 25 January 2022) are shifted by the 1000 they add, as Earth Engine's
harmonized collections are. Biome and ecoregion are the plan's (the world's maps).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mmearth_data.registry import MODALITIES, S2_BANDS, Modality, get
from mmearth_data.sources.base import SourceError, TileFailure, TileRequest, TileResult, empty_arrays

EXTENSIONS = (".tif", ".tiff", ".jp2")
BASELINE_04 = np.datetime64("2022-01-25")  # processing baseline 04.00: +1000 on every band
COMMON_NAMES = {
    "coastal": "B1", "blue": "B2", "green": "B3", "red": "B4", "rededge": "B5", "rededge1": "B5",
    "rededge2": "B6", "rededge3": "B7", "nir": "B8", "nir08": "B8A", "nir09": "B9", "cirrus": "B10",
    "swir16": "B11", "swir22": "B12",
}  # fmt: skip
REQUIRED_S2 = ("B2", "B3", "B4", "B8")  # the 10 m bands a scene must have
_BAND = re.compile(r"(?:^|[_.-])B(0?[1-9]|1[0-2]|8A)(?:_(10|20|60)m)?$", re.IGNORECASE)
_DAY = re.compile(r"(20\d{2})(\d{2})(\d{2})T\d{6}")


class LocalRasterError(SourceError):
    """The rasters given cannot be used as asked (nothing readable, no Sentinel-2 scene)."""


def s2_band_name(token: str) -> str | None:
    """The registry's name of a Sentinel-2 band token (``B04``, ``b8a``, ``B4``, ``red``), or None."""
    t = token.strip()
    if t.lower() in COMMON_NAMES:
        return COMMON_NAMES[t.lower()]
    m = re.fullmatch(r"B(0?[1-9]|1[0-2]|8A)", t, re.IGNORECASE)
    if not m:
        return None
    v = m.group(1).upper()
    return "B8A" if v == "8A" else f"B{int(v)}"


@dataclass(frozen=True)
class Raster:
    """One file (or STAC asset) and what it holds."""

    path: str
    modality: str
    bands: tuple[str, ...]  # registry band names of the file's bands, in file order
    scene: str  # scene id (Sentinel-2) or file stem
    day: str | None = None  # ISO acquisition day (Sentinel-2)
    product: str | None = None  # L1C / L2A (Sentinel-2)


@dataclass
class Scene:
    """A Sentinel-2 scene: its band files, day, product and WGS84 footprint (the 10 m bands' overlap)."""

    scene: str
    day: str
    product: str
    rasters: list[Raster] = field(default_factory=list)
    footprint: Any = None

    @property
    def year(self) -> int:
        return int(self.day[:4])

    def band_files(self) -> dict[str, tuple[str, int]]:
        """band -> (path, 1-based band index in that file)."""
        return {b: (r.path, k + 1) for r in self.rasters for k, b in enumerate(r.bands)}


@dataclass
class Inventory:
    scenes: list[Scene]
    others: list[Raster]  # DEM and other modalities
    skipped: list[tuple[str, str]]  # (path, why)
    footprints: dict[str, Any]  # path -> WGS84 polygon


def footprint_of(path: str) -> Any:
    """WGS84 polygon of a raster's extent (edges densified, so a UTM rectangle stays exact enough)."""
    import rasterio
    import shapely
    from rasterio.warp import transform_geom

    with rasterio.open(path) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs
    if crs is None:
        raise LocalRasterError(f"{path} has no coordinate reference system; georeference it (gdal_edit.py)")
    box = shapely.segmentize(shapely.box(left, bottom, right, top), max(right - left, top - bottom) / 16)
    geo = transform_geom(crs, "EPSG:4326", shapely.geometry.mapping(box))
    return shapely.geometry.shape(geo)


def _from_name(path: str) -> Raster | str:
    """What a file holds by its name and band descriptions, or why it is skipped."""
    import rasterio

    p = Path(path)
    stem = p.stem
    try:
        with rasterio.open(path) as src:
            count, descriptions = src.count, tuple(d or "" for d in src.descriptions)
    except Exception as err:
        return f"not readable as a raster ({type(err).__name__}: {str(err)[:120]})"
    full = str(p).replace(os.sep, "/")
    day = _DAY.search(full)
    iso = f"{day.group(1)}-{day.group(2)}-{day.group(3)}" if day else None
    m = _BAND.search(stem)
    if m and count == 1:
        band = s2_band_name("B" + m.group(1))
        product = "L2A" if (m.group(2) or "MSIL2A" in full.upper()) else "L1C"
        if "MSIL1C" not in full.upper() and not m.group(2) and not re.search(r"T\d{2}[A-Z]{3}_", stem):
            product = None  # a band file of unknown processing level
        scene = stem[: m.start()] or p.parent.name
        return Raster(path, "sentinel2", (band,), scene, iso, product)
    names = tuple(s2_band_name(d) for d in descriptions)
    if count > 1 and all(names):
        product = "L2A" if "L2A" in full.upper() else ("L1C" if "L1C" in full.upper() else None)
        return Raster(path, "sentinel2", names, stem, iso, product)
    for mod in MODALITIES:
        if mod.kind == "pixel" and mod.stored and stem.lower().startswith(mod.name) and count == mod.n_bands:
            if mod.name != "sentinel2":
                return Raster(path, mod.name, tuple(mod.bands), stem)
    if re.search(r"(^|[^a-z])dem([^a-z]|$)", stem.lower()) and count == 1:
        return Raster(path, "dem", ("elevation",), stem)
    return "not recognised (Sentinel-2 band files, a DEM named *dem*, or <modality>*.tif)"


def _from_stac(path: str) -> tuple[list[Raster], list[tuple[str, str]]]:
    import pystac

    obj = pystac.read_file(path)
    items = obj.get_items(recursive=True) if hasattr(obj, "get_items") else [obj]
    out: list[Raster] = []
    skipped: list[tuple[str, str]] = []
    for item in items:
        props = item.properties
        when = item.datetime or item.common_metadata.start_datetime
        iso = str(np.datetime64(when.replace(tzinfo=None), "D")) if when else None
        level = str(props.get("processing:level") or props.get("s2:processing_level") or "")
        product = "L2A" if "2A" in level else ("L1C" if "1C" in level else None)
        for key, asset in item.assets.items():
            href = asset.get_absolute_href()
            names = [b.get("name", "") for b in asset.extra_fields.get("eo:bands", [])]
            names += [b.get("name", "") for b in asset.extra_fields.get("bands", [])]
            names += [b.get("common_name", "") for b in asset.extra_fields.get("eo:bands", [])]
            s2 = [s2_band_name(n) for n in [key, *names] if n and s2_band_name(n)]
            if s2:
                out.append(Raster(href, "sentinel2", (s2[0],), item.id, iso, product))
            elif key.lower() in ("dem", "elevation"):
                out.append(Raster(href, "dem", ("elevation",), item.id))
            elif key in {m.name for m in MODALITIES if m.kind == "pixel" and m.stored}:
                out.append(Raster(href, key, tuple(get(key).bands), item.id))
            elif "data" in (asset.roles or []):
                skipped.append((href, f"asset {key!r} of item {item.id} is not a known band or modality"))
    return out, skipped


def inventory(rasters: str) -> Inventory:
    """What the files under ``rasters`` (a folder, or a STAC catalog / collection / item JSON) hold."""
    if not os.path.exists(rasters):
        raise LocalRasterError(f"`rasters` {rasters}: no such file or folder")
    found: list[Raster] = []
    skipped: list[tuple[str, str]] = []
    if os.path.isfile(rasters) and rasters.endswith(".json"):
        found, skipped = _from_stac(rasters)
    else:
        for d, _, files in sorted(os.walk(rasters, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(EXTENSIONS):
                    got = _from_name(os.path.join(d, f))
                    if isinstance(got, str):
                        skipped.append((os.path.join(d, f), got))
                    else:
                        found.append(got)
    scenes: dict[str, Scene] = {}
    others: list[Raster] = []
    fps: dict[str, Any] = {}
    for r in found:
        if r.modality != "sentinel2":
            fps[r.path] = footprint_of(r.path)
            others.append(r)
            continue
        if r.day is None:
            skipped.append((r.path, "no acquisition day in its name (YYYYMMDDTHHMMSS); describe it in a STAC "
                                    "item with a datetime"))  # fmt: skip
            continue
        if r.product is None:
            skipped.append((r.path, "processing level unknown (MSIL1C / MSIL2A or _10m naming; STAC: "
                                    "processing:level)"))  # fmt: skip
            continue
        s = scenes.setdefault(r.scene, Scene(r.scene, r.day, r.product))
        s.rasters.append(r)
    kept = []
    for s in scenes.values():
        have = set(s.band_files())
        lack = [b for b in REQUIRED_S2 if b not in have]
        if lack:
            why = f"scene {s.scene} lacks the 10 m bands {', '.join(lack)}"
            skipped += [(r.path, why) for r in s.rasters]
            continue
        fp = None
        for b in REQUIRED_S2:
            path = s.band_files()[b][0]
            fps.setdefault(path, footprint_of(path))
            fp = fps[path] if fp is None else fp.intersection(fps[path])
        s.footprint = fp
        kept.append(s)
    kept.sort(key=lambda s: (s.day, s.scene))
    return Inventory(kept, others, skipped, fps)


def _warp(path: str, index: int, t: TileRequest, resampling: str, border: int = 0,
          src_nodata: float | None = None) -> np.ndarray:  # fmt: skip
    """Band ``index`` of ``path`` on the tile's grid (plus ``border`` pixels around it), float32, NaN
    where the file has no data."""
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    a, b, c, d, e, f = t.transform
    transform = Affine(a, b, c - border * a, d, e, f - border * e)
    n = t.size + 2 * border
    out = np.full((n, n), np.nan, np.float32)
    with rasterio.open(path) as src:
        nodata = src.nodata if src_nodata is None else src_nodata
        reproject(
            source=rasterio.band(src, index), destination=out, src_nodata=nodata, dst_nodata=np.nan,
            dst_transform=transform, dst_crs=f"EPSG:{t.epsg}", resampling=Resampling[resampling],
        )  # fmt: skip
    return out


class LocalSource:
    """Tiles from local rasters (see the module docstring)."""

    name = "local"
    years = range(2015, 2100)  # whatever the files hold (Sentinel-2 from 2015)
    version = "1"

    def __init__(self, rasters: str, seed: int = 0):
        self.rasters, self.seed = str(rasters), seed

    @cached_property
    def inventory(self) -> Inventory:
        inv = inventory(self.rasters)
        if not inv.scenes:
            why = "; ".join(f"{Path(p).name}: {w}" for p, w in inv.skipped[:5]) or "no raster files found"
            raise LocalRasterError(f"`rasters` {self.rasters} holds no usable Sentinel-2 scene ({why})")
        return inv

    def check(self, tile_size: int, modalities: tuple[Modality, ...]) -> None:
        """Raise :class:`LocalRasterError` when the rasters hold no usable Sentinel-2 scene."""
        self.inventory  # noqa: B018

    def describe(self) -> dict[str, Any]:
        inv = self.inventory
        return {
            "source": "local",
            "rasters": self.rasters,
            "scenes": [
                {"id": s.scene, "day": s.day, "product": s.product, "bands": sorted(s.band_files())}
                for s in inv.scenes
            ],  # fmt: skip
            "other_rasters": [{"path": r.path, "modality": r.modality} for r in inv.others],
            "skipped": len(inv.skipped),
            "labels": "biome and ecoregion from the world's maps (the plan)",
        }

    def sample_plan(self, cfg: Any, world: Any = None, exclude=frozenset(), first_slot: int = 0):
        from mmearth_data.sampling import sample_in_footprints

        scenes = [(s.footprint, s.year) for s in self.inventory.scenes]
        return sample_in_footprints(cfg, scenes, world, exclude=exclude, first_slot=first_slot)

    def fetch(
        self, tiles: list[TileRequest], modalities: tuple[Modality, ...]
    ) -> list[TileResult | TileFailure]:
        return [self._one(t, modalities) for t in tiles]

    def _tile_polygon(self, t: TileRequest):
        from mmearth_data.grid import footprints

        return footprints(np.array([t.transform]), np.array([t.epsg]), t.size)[0]

    def _one(self, t: TileRequest, modalities: tuple[Modality, ...]) -> TileResult | TileFailure:
        poly = self._tile_polygon(t)
        if t.pinned:
            scenes = [
                s for s in self.inventory.scenes if s.day == t.s2_date and (not t.s2_id or s.scene == t.s2_id)
            ]
        else:
            scenes = [s for s in self.inventory.scenes if s.year == t.year]
        scenes = [s for s in scenes if s.footprint.contains(poly)]
        s2m = get("sentinel2")
        chosen, s2 = None, None
        for s in scenes:
            files = s.band_files()
            try:
                ten = {b: _warp(*files[b], t, s2m.resampling, src_nodata=0) for b in REQUIRED_S2}
            except Exception as err:
                why = f"{s.scene}: {type(err).__name__}: {str(err)[:160]}"
                return TileFailure(t.tile_id, "sentinel2", why)
            if all(np.isfinite(v).all() and (v > 0).all() for v in ten.values()):
                chosen = s
                s2 = np.zeros(s2m.shape(1, t.size)[1:], np.float32)
                for k, b in enumerate(S2_BANDS):
                    if b in ten:
                        s2[k] = ten[b]
                    elif b in files:
                        s2[k] = np.nan_to_num(_warp(*files[b], t, s2m.resampling, src_nodata=0), nan=0.0)
                break
        if chosen is None:
            what = f"the scene of {t.s2_date}" if t.pinned else f"no scene of {t.year}"
            return TileFailure(t.tile_id, "sentinel2", f"{what} covers the whole tile with data")
        if np.datetime64(chosen.day) >= BASELINE_04:
            s2 = np.where(s2 > 0, np.maximum(s2 - 1000, 1), 0)
        arrays = empty_arrays(modalities, t.size)
        present = {m.name: False for m in modalities}
        for m in modalities:
            if m.name == "sentinel2":
                arrays[m.name] = np.rint(s2).clip(0, 65535).astype(m.np_dtype)
                present[m.name] = True
            elif m.name in ("biome", "ecoregion"):
                value = t.biome if m.name == "biome" else t.ecoregion
                if value and value > 0:
                    arrays[m.name], present[m.name] = np.asarray(value, m.np_dtype), True
            elif m.kind == "pixel":
                got = self._modality(t, m, poly)
                if got is not None:
                    arrays[m.name], present[m.name] = got, True
        return TileResult(
            tile_id=t.tile_id, arrays=arrays, present=present, s2_date=np.datetime64(chosen.day, "D"),
            s2_product=chosen.product, extra={"s2_id": chosen.scene},
        )  # fmt: skip

    def _modality(self, t: TileRequest, m: Modality, poly) -> np.ndarray | None:
        """A non-Sentinel-2 pixel modality from the first raster holding it over the whole tile."""
        for r in self.inventory.others:
            if r.modality != m.name or not self.inventory.footprints[r.path].contains(poly):
                continue
            if m.name == "dem":
                z = _warp(r.path, 1, t, m.resampling, border=1)
                if not np.isfinite(z).all():
                    continue
                gy, gx = np.gradient(z.astype(np.float64), 10.0)
                slope = np.degrees(np.arctan(np.hypot(gx, gy)))
                return np.stack([z[1:-1, 1:-1], slope[1:-1, 1:-1]]).astype(m.np_dtype)
            bands = np.stack([_warp(r.path, k + 1, t, m.resampling) for k in range(m.n_bands)])
            if not np.isfinite(bands).all():
                continue
            return bands.astype(m.np_dtype)
        return None


def make_local_source(options: dict[str, Any]) -> LocalSource:
    unknown = set(options) - {"rasters", "seed"}
    if unknown:
        raise SourceError(f"unknown local source options {', '.join(sorted(unknown))}; known: rasters")
    if not options.get("rasters"):
        raise SourceError(
            "`source` local needs `rasters` DIR_OR_STAC (a folder of GeoTIFF/JP2 files or a STAC catalog)"
        )
    return LocalSource(os.path.abspath(options["rasters"]), seed=options.get("seed", 0))
