"""The browse page's queries at MMEarth's scale: the catalog's items held as columns in memory, filtered
with numpy, so that every answer the map needs (exact counts, the biome x year table, a density image
of the viewport, footprints, the tile list) comes in well under a second for 1.2M items.

Data flow: ``items.parquet`` -> :class:`BrowseIndex` (one read of the filter columns at start: about
40 bytes per item) -> :meth:`BrowseIndex.select` (a boolean mask for the filters of ``mmearth catalog
search`` plus the viewport) -> counts, table, :meth:`density_png`, :meth:`footprints`, :meth:`tile_ids`.
Footprints are computed from each item's UTM transform exactly as the items' geometry is
(:func:`catalog.build.footprints`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from catalog.search import SearchError, items_path, parse_bbox, parse_biomes, parse_datetime
from mmearth_data.sampling import SamplingError, parse_years

SPLITS = ("train", "val", "test")
MAX_CELLS = 512 * 512  # density image size limit
MAX_FOOTPRINTS = 5000
RAMP = np.array(  # light yellow -> orange -> dark red (counts per cell, log scale)
    [[255, 255, 204], [254, 217, 118], [253, 141, 60], [227, 26, 28], [128, 0, 38]], np.float64
)


@dataclass(frozen=True)
class Filters:
    """The page's filters (those of ``mmearth catalog search``); ``bbox`` is the viewport."""

    bbox: tuple[float, float, float, float] | None = None
    biome: tuple[int, ...] | None = None
    year: tuple[int, ...] | None = None
    has: tuple[str, ...] = ()
    max_cloud: float | None = None
    datetime: tuple[str | None, str | None] | None = None
    split: str | None = None

    @classmethod
    def parse(cls, params: dict[str, str | None], modalities: list[str]) -> Filters:
        """From query parameters (strings); raises :class:`SearchError` naming a bad value."""
        has = tuple(h for h in (params.get("has") or "").split(",") if h)
        unknown = [h for h in has if h not in modalities]
        if unknown:
            raise SearchError(
                f"has {', '.join(unknown)}: not a modality of this catalog ({', '.join(modalities)})"
            )
        split = params.get("split") or None
        if split is not None and split not in SPLITS:
            raise SearchError(f"split {split!r}: one of {', '.join(SPLITS)}")
        cloud = params.get("max_cloud")
        try:
            max_cloud = float(cloud) if cloud not in (None, "") else None
        except ValueError:
            raise SearchError(f"max_cloud {cloud!r}: a number of per cent, 0-100") from None
        if max_cloud is not None and not 0 <= max_cloud <= 100:
            raise SearchError(f"max_cloud {cloud!r}: a number of per cent, 0-100")
        return cls(
            bbox=parse_bbox(params["bbox"]) if params.get("bbox") else None,
            biome=parse_biomes(params["biome"]) if params.get("biome") else None,
            year=_years(params["year"]) if params.get("year") else None,
            has=has,
            max_cloud=max_cloud,
            datetime=parse_datetime(params["datetime"]) if params.get("datetime") else None,
            split=split,
        )


def _years(text: str) -> tuple[int, ...]:
    try:
        return parse_years(text)
    except SamplingError as err:
        raise SearchError(str(err)) from None


class BrowseIndex:
    """The catalog's items as in-memory columns (see the module docstring)."""

    def __init__(self, catalog: str | Path):
        dataset = ds.dataset(items_path(catalog), format="parquet")
        first = dataset.head(1, columns=["proj:shape"]).column("proj:shape").to_pylist()
        self.tile_size = int(first[0][0]) if first else 128
        names = dataset.schema.names
        self.modalities = [n[len("mmearth:has_") :] for n in names if n.startswith("mmearth:has_")]
        cols = ["id", "bbox", "datetime", "eo:cloud_cover", "mmearth:biome", "mmearth:year", "mmearth:split",
                "proj:code", "proj:transform"] + [f"mmearth:has_{m}" for m in self.modalities]  # fmt: skip
        t = dataset.to_table(columns=cols)
        self.n = t.num_rows
        self.ids = t.column("id").combine_chunks()
        bbox = t.column("bbox").combine_chunks()
        x0, y0 = (pc.struct_field(bbox, k).to_numpy(zero_copy_only=False) for k in ("xmin", "ymin"))
        x1, y1 = (pc.struct_field(bbox, k).to_numpy(zero_copy_only=False) for k in ("xmax", "ymax"))
        wide = (x1 - x0) > 180  # a tile across the antimeridian: its bbox spans the globe
        self.lon = np.where(wide, np.where(x0 + 360 - x1 < 1, 180.0, x0), (x0 + x1) / 2).astype(np.float32)
        self.lat = ((y0 + y1) / 2).astype(np.float32)
        days = pc.cast(t.column("datetime"), pa.timestamp("us", tz="UTC")).to_numpy().astype("datetime64[D]")
        self.day = days.astype(np.int64).astype(np.int32)
        cloud = t.column("eo:cloud_cover").to_numpy()
        self.cloud = np.where(np.isnan(cloud.astype(np.float64)), np.nan, cloud).astype(np.float32)
        self.biome = t.column("mmearth:biome").to_numpy().astype(np.int16)
        self.year = t.column("mmearth:year").to_numpy().astype(np.int16)
        split = t.column("mmearth:split").to_numpy(zero_copy_only=False)
        self.split = np.full(self.n, 255, np.uint8)
        for k, s in enumerate(SPLITS):
            self.split[split == s] = k
        self.has = np.zeros(self.n, np.uint32)
        for k, m in enumerate(self.modalities):
            self.has |= t.column(f"mmearth:has_{m}").to_numpy(zero_copy_only=False).astype(np.uint32) << k
        code = t.column("proj:code").to_numpy(zero_copy_only=False)
        self.epsg = (
            np.array([int(c.split(":")[1]) for c in code], np.int32) if self.n else np.zeros(0, np.int32)
        )
        flat = pc.list_flatten(t.column("proj:transform").combine_chunks()).to_numpy()
        self.transform = flat.reshape(self.n, 6) if self.n else np.zeros((0, 6))
        self.years = sorted({int(y) for y in np.unique(self.year)})
        self.biomes = sorted({int(b) for b in np.unique(self.biome)})
        self._cache: OrderedDict[tuple, Any] = OrderedDict()

    # --- selection -------------------------------------------------------------------------------
    def select(self, f: Filters, with_bbox: bool = True) -> np.ndarray:
        """Boolean mask of the items matching ``f`` (and its viewport, with ``with_bbox``)."""
        m = np.ones(self.n, bool)
        if with_bbox and f.bbox is not None:
            w, s, e, n = f.bbox
            m &= (self.lon >= w) & (self.lon <= e) & (self.lat >= s) & (self.lat <= n)
        if f.biome:
            m &= np.isin(self.biome, f.biome)
        if f.year:
            m &= np.isin(self.year, f.year)
        if f.has:
            bits = 0
            for h in f.has:
                bits |= 1 << self.modalities.index(h)
            m &= (self.has & bits) == bits
        if f.max_cloud is not None:
            m &= self.cloud <= f.max_cloud  # NaN (no cloud score) never passes, as in search
        if f.datetime is not None:
            a, b = f.datetime
            if a:
                m &= self.day >= np.datetime64(a, "D").astype(np.int64)
            if b:
                m &= self.day <= np.datetime64(b, "D").astype(np.int64)
        if f.split:
            m &= self.split == SPLITS.index(f.split)
        return m

    def _cached(self, key: tuple, make):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = make()
        self._cache[key] = value
        if len(self._cache) > 256:
            self._cache.popitem(last=False)
        return value

    def summary(self, f: Filters) -> dict[str, Any]:
        """Exact counts (viewport and all filters; filters without the viewport; the catalog) and the
        biome x year table of the viewport's selection."""

        def make():
            inview = self.select(f)
            code = self.biome[inview].astype(np.int64) * 10000 + self.year[inview]
            keys, counts = np.unique(code, return_counts=True)
            table = {f"{k // 10000}/{k % 10000}": int(c) for k, c in zip(keys, counts, strict=True)}
            return {
                "count": int(inview.sum()),
                "count_all_places": int(self.select(f, with_bbox=False).sum()),
                "total": self.n,
                "table": table,
                "biomes": sorted({int(k // 10000) for k in keys}),
                "years": sorted({int(k % 10000) for k in keys}),
            }

        return self._cached(("summary", f), make)

    def density(self, f: Filters, width: int, height: int) -> np.ndarray:
        """Counts of the selection per cell of a ``width`` x ``height`` grid over the viewport (row 0 at
        the north), cached per filters, viewport and size."""
        if width * height > MAX_CELLS or width < 1 or height < 1:
            raise SearchError(f"density grid {width} x {height}: at most {MAX_CELLS} cells")
        w, s, e, n = f.bbox or (-180.0, -90.0, 180.0, 90.0)

        def make():
            sel = self.select(f)
            h, _, _ = np.histogram2d(
                self.lat[sel], self.lon[sel], bins=(height, width), range=((s, n), (w, e))
            )
            return h[::-1].astype(np.int64)

        return self._cached(("density", f, width, height), make)

    def density_png(self, f: Filters, width: int, height: int) -> bytes:
        """The density as a PNG with alpha (empty cells transparent), colour by log count."""
        from catalog.quicklook import png_bytes

        counts = self.density(f, width, height)
        top = max(int(counts.max()), 1)
        v = np.log1p(counts) / np.log1p(top)
        pos = v * (len(RAMP) - 1)
        k = np.clip(pos.astype(int), 0, len(RAMP) - 2)
        frac = (pos - k)[..., None]
        rgb = RAMP[k] * (1 - frac) + RAMP[k + 1] * frac
        alpha = np.where(counts > 0, 210, 0)
        return png_bytes(np.dstack([rgb, alpha]).astype(np.uint8))

    def footprints(self, f: Filters, limit: int = MAX_FOOTPRINTS) -> dict[str, Any]:
        """GeoJSON footprints of the viewport's selection, or ``{"too_many": count}`` past ``limit``."""
        from catalog.build import footprints

        idx = np.flatnonzero(self.select(f))
        if len(idx) > limit:
            return {"type": "FeatureCollection", "features": [], "too_many": int(len(idx))}
        import pandas as pd

        df = pd.DataFrame({"epsg": self.epsg[idx], "transform": list(self.transform[idx])})
        rings, _ = footprints(df, self.tile_size) if len(idx) else (np.zeros((0, 5, 2)), None)
        ids = self.ids.take(pa.array(idx)).to_pylist()
        feats = [
            {
                "type": "Feature",
                "id": tid,
                "geometry": {"type": "Polygon", "coordinates": [np.round(ring, 6).tolist()]},
                "properties": {
                    "biome": int(self.biome[i]),
                    "year": int(self.year[i]),
                    "split": SPLITS[self.split[i]] if self.split[i] < len(SPLITS) else None,
                    "cloud": None if np.isnan(self.cloud[i]) else round(float(self.cloud[i]), 1),
                },
            }  # fmt: skip
            for tid, ring, i in zip(ids, rings, idx, strict=True)
        ]
        return {"type": "FeatureCollection", "features": feats}

    def tile_ids(self, f: Filters) -> list[str]:
        """Ids of the selection (viewport included), in catalog order."""
        return self.ids.take(pa.array(np.flatnonzero(self.select(f)))).to_pylist()
