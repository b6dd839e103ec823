"""Search a corpus catalog's items (GeoParquet) by bbox, date range, biome, year, modality, cloud.

Filters become one pyarrow dataset expression, so Parquet row groups whose statistics cannot match are
skipped and only the filter columns are read before the matching rows are fetched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from mmearth_data.registry import BIOME_CLASSES

SUMMARY_COLUMNS = [
    "id",
    "datetime",
    "mmearth:biome",
    "mmearth:year",
    "mmearth:split",
    "mmearth:s2_product",
    "eo:cloud_cover",
    "mmearth:index",
]


class SearchError(ValueError):
    """A query that cannot run (bad bbox or date, unknown biome or modality, no catalog)."""


@dataclass(frozen=True)
class Query:
    bbox: tuple[float, float, float, float] | None = None
    datetime: tuple[str | None, str | None] | None = None
    biome: tuple[int, ...] | None = None
    year: tuple[int, ...] | None = None
    has: tuple[str, ...] = ()
    max_cloud: float | None = None
    split: str | None = None
    limit: int | None = None


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    try:
        v = tuple(float(x) for x in text.split(","))
    except ValueError:
        v = ()
    if len(v) != 4 or not (-180 <= v[0] <= v[2] <= 180 and -90 <= v[1] <= v[3] <= 90):
        raise SearchError(
            f"`bbox` {text!r}: use west,south,east,north in degrees with west <= east, south <= north"
        )
    return v  # type: ignore[return-value]


def parse_datetime(text: str) -> tuple[str | None, str | None]:
    """'2019-01-01/2019-12-31', '2019-05-01', '../2018-12-31' -> (start, end) ISO dates."""
    parts = text.split("/")
    if len(parts) == 1:
        parts = [parts[0], parts[0]]
    if len(parts) != 2:
        raise SearchError(f"`datetime` {text!r}: use a date or an interval START/END (.. for open)")
    out = []
    for p in parts:
        if p in ("", ".."):
            out.append(None)
            continue
        try:
            np.datetime64(p[:10], "D")
        except ValueError:
            raise SearchError(f"`datetime` {text!r}: {p!r} is not a date (YYYY-MM-DD)") from None
        out.append(p[:10])
    return out[0], out[1]


def parse_biomes(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part.isdigit() and int(part) in BIOME_CLASSES:
            out.append(int(part))
            continue
        hits = [k for k, v in BIOME_CLASSES.items() if part.lower() in v.lower()] if part else []
        if len(hits) != 1:
            choices = "; ".join(f"{k} {v}" for k, v in BIOME_CLASSES.items())
            raise SearchError(
                f"`biome` {part!r} matches {len(hits)} biomes; use a number or a unique name: {choices}"
            )
        out.append(hits[0])
    return tuple(out)


def items_path(catalog: str | Path) -> Path:
    p = Path(catalog) / "items.parquet"
    if not p.exists():
        raise SearchError(f"{catalog} holds no items.parquet; build it with `mmearth catalog build`")
    return p


def items_dataset(catalog: str | Path) -> ds.Dataset:
    """The catalog's ``items.parquet`` as an arrow dataset; ``catalog`` a folder or any fsspec URL
    (``s3://bucket/catalog``: read in ranges, filters pushed down as on a local file)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(catalog))
    if "file" in fs.protocol:
        return ds.dataset(items_path(root), format="parquet")
    path = f"{root.rstrip('/')}/items.parquet"
    if not fs.exists(path):
        raise SearchError(f"{catalog} holds no items.parquet; build it with `mmearth catalog build`")
    return ds.dataset(path, filesystem=fs, format="parquet")


def _timestamp(day: np.datetime64, typ: pa.DataType) -> pa.Scalar:
    return pa.array([day.astype("datetime64[us]")]).cast(typ)[0]


def expression(q: Query, schema: pa.Schema) -> ds.Expression | None:
    conds = []
    if q.bbox is not None:
        w, s, e, n = q.bbox
        conds += [
            ds.field("bbox", "xmax") >= w,
            ds.field("bbox", "xmin") <= e,
            ds.field("bbox", "ymax") >= s,
            ds.field("bbox", "ymin") <= n,
        ]
    if q.datetime is not None:
        typ = schema.field("datetime").type
        start, end = q.datetime
        if start is not None:
            conds.append(ds.field("datetime") >= _timestamp(np.datetime64(start, "D"), typ))
        if end is not None:
            conds.append(
                ds.field("datetime") < _timestamp(np.datetime64(end, "D") + np.timedelta64(1, "D"), typ)
            )
    if q.biome:
        conds.append(ds.field("mmearth:biome").isin(list(q.biome)))
    if q.year:
        conds.append(ds.field("mmearth:year").isin(list(q.year)))
    for m in q.has:
        col = f"mmearth:has_{m}"
        if col not in schema.names:
            known = [c.removeprefix("mmearth:has_") for c in schema.names if c.startswith("mmearth:has_")]
            raise SearchError(f"`has` {m}: the catalog has no modality {m!r}; known: {', '.join(known)}")
        conds.append(ds.field(col) == True)  # noqa: E712 (an arrow expression, not a Python comparison)
    if q.max_cloud is not None:
        conds.append(ds.field("eo:cloud_cover") <= q.max_cloud)
    if q.split is not None:
        conds.append(ds.field("mmearth:split") == q.split)
    if not conds:
        return None
    expr = conds[0]
    for c in conds[1:]:
        expr = expr & c
    return expr


def search(catalog: str | Path, q: Query, columns: Sequence[str] | None = None) -> pa.Table:
    """Matching items (``columns``; default a summary set plus bbox), in catalog order, up to ``q.limit``."""
    dataset = items_dataset(catalog)
    expr = expression(q, dataset.schema)
    cols = list(columns) if columns is not None else SUMMARY_COLUMNS + ["bbox"]
    if q.limit is not None:
        table = (
            dataset.head(q.limit, columns=cols, filter=expr)
            if expr is not None
            else dataset.head(q.limit, columns=cols)
        )
    else:
        table = dataset.to_table(columns=cols, filter=expr)
    return table


def full_items(catalog: str | Path, ids: Sequence[str]) -> list[dict[str, Any]]:
    """Complete STAC item dicts of ``ids`` (stac-geoparquet's own reader)."""
    from stac_geoparquet.arrow import stac_table_to_items

    if not ids:
        return []
    table = items_dataset(catalog).to_table(filter=ds.field("id").isin(list(ids)))
    return list(stac_table_to_items(table))


def to_rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    for r in rows:
        if "datetime" in r and r["datetime"] is not None:
            r["datetime"] = r["datetime"].strftime("%Y-%m-%d")
        if "mmearth:biome" in r:
            r["biome_name"] = BIOME_CLASSES.get(r["mmearth:biome"], "")
        if "bbox" in r and r["bbox"] is not None:
            b = r["bbox"]
            r["lon"] = (b["xmin"] + b["xmax"]) / 2
            r["lat"] = (b["ymin"] + b["ymax"]) / 2
    return rows


def check_tile_list_path(path: str | Path) -> None:
    """Raise :class:`SearchError` unless ``path`` is new or a tile list an earlier search wrote: any
    other file (a store's ``zarr.json``, a config) is never overwritten."""
    p = Path(path)
    if p.is_dir():
        raise SearchError(f"--write-tiles {p} is a folder; name a file (nothing was changed)")
    if p.exists():
        with open(p, "rb") as f:
            head = f.read(len(TILE_LIST_HEADER))
        if head != TILE_LIST_HEADER:
            raise SearchError(
                f"--write-tiles {p} exists and is not a tile list written by `mmearth catalog search`; "
                "choose a new file (nothing was changed)"
            )


TILE_LIST_HEADER = b"# mmearth catalog search"


def write_tile_list(table: pa.Table, path: str | Path, query_text: str = "") -> int:
    """Tile ids, one per line, as ``python -m model.pretrain --tiles`` reads them."""
    check_tile_list_path(path)
    ids = table.column("id").to_pylist()
    with open(path, "w") as f:
        f.write(f"# mmearth catalog search {query_text}\n")
        f.write("\n".join(ids) + "\n")
    return len(ids)


def geojson(catalog: str | Path, table: pa.Table) -> dict[str, Any]:
    items = full_items(catalog, table.column("id").to_pylist())
    return {"type": "FeatureCollection", "features": items}
