"""The STAC catalog of a corpus store: a STAC 1.1 Collection (JSON) and one Item per tile (GeoParquet).

Data flow: store -> per-tile metadata in batches -> STAC item dicts -> ``stac_geoparquet`` Arrow batches
-> ``items.parquet`` (streamed: memory stays flat with corpus size); store attributes (registry,
statistics, provenance) -> ``collection.json``; tile arrays shard by shard -> ``quicklooks/<id>.png``.

Layout of a catalog directory::

    collection.json        STAC 1.1 Collection (datacube extension on the store asset)
    items.parquet          STAC Items as stac-geoparquet rows, one per complete tile
    quicklooks/<id>.png    six-panel quicklook per tile (small corpora, or --quicklooks all)
    items/<id>.json        static JSON items (optional, --json-items)

Item properties besides the STAC ones: ``proj:code|transform|shape`` (projection extension),
``eo:cloud_cover`` (per cent opaque cloud, eo extension), and ``mmearth:*`` fields: ``index`` (the
tile's position on the store's ``tile`` dimension), ``biome``, ``biome_name``, ``ecoregion``,
``year``, ``split``, ``s2_product`` and one ``has_<modality>`` flag per stored modality.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from stac_geoparquet.arrow import parse_stac_items_to_arrow, to_parquet

from catalog.quicklook import PANEL_TITLES, PANELS, legends, png_bytes, strip
from mmearth_data.grid import footprint_rings
from mmearth_data.registry import BIOME_CLASSES, Modality
from mmearth_data.store import CorpusReader, strings

STAC_VERSION = "1.1.0"
EXT = {
    "proj": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "eo": "https://stac-extensions.github.io/eo/v2.0.0/schema.json",
    "datacube": "https://stac-extensions.github.io/datacube/v2.2.0/schema.json",
    "sci": "https://stac-extensions.github.io/scientific/v1.0.0/schema.json",
}
ZARR_TYPE = "application/vnd+zarr"
PARQUET_TYPE = "application/vnd.apache.parquet"
CITATION = (
    "Nedungadi, V., Kariryaa, A., Oehmcke, S., Belongie, S., Igel, C., Lang, N. (2024). MMEarth: Exploring "
    "Multi-Modal Pretext Tasks For Geospatial Representation Learning. ECCV 2024."
)
CITATION_DOI = "10.48550/arXiv.2405.02771"
QUICKLOOK_AUTO_MAX = 20_000


class CatalogError(ValueError):
    """Bad input for the catalog (no store, nothing complete, an unusable output directory)."""


@dataclass
class ExtentAccumulator:
    """Spatial, temporal and summary extents gathered while items stream past."""

    bbox: list[float] = field(default_factory=lambda: [180.0, 90.0, -180.0, -90.0])
    start: np.datetime64 | None = None
    end: np.datetime64 | None = None
    n: int = 0
    years: set = field(default_factory=set)
    biomes: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)
    products: set = field(default_factory=set)

    def add(self, df: pd.DataFrame, bboxes: np.ndarray) -> None:
        self.n += len(df)
        self.bbox = [
            min(self.bbox[0], float(bboxes[:, 0].min())),
            min(self.bbox[1], float(bboxes[:, 1].min())),
            max(self.bbox[2], float(bboxes[:, 2].max())),
            max(self.bbox[3], float(bboxes[:, 3].max())),
        ]
        dates = df["s2_date"].to_numpy().astype("datetime64[D]")
        lo, hi = dates.min(), dates.max()
        self.start = lo if self.start is None else min(self.start, lo)
        self.end = hi if self.end is None else max(self.end, hi)
        self.years |= {int(y) for y in np.unique(df["year"])}
        for col, acc in (("biome", self.biomes), ("split", self.splits)):
            for k, v in df[col].value_counts().items():
                acc[k] = acc.get(k, 0) + int(v)
        self.products |= set(df["s2_product"].unique().tolist())


def _iso(day: Any) -> str:
    return f"{np.datetime_as_string(np.datetime64(day, 'D'))}T00:00:00Z"


def footprints(df: pd.DataFrame, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The items' geometry: :func:`mmearth_data.grid.footprint_rings` of the tiles (n, 5, 2) and their
    bboxes (n, 4)."""
    rings = footprint_rings(np.stack(df["transform"].to_numpy()), df["epsg"].to_numpy(), tile_size)
    lon, lat = rings[..., 0], rings[..., 1]
    return rings, np.stack([lon.min(1), lat.min(1), lon.max(1), lat.max(1)], 1)


def _text(v: Any) -> str | None:
    return str(v) if isinstance(v, str) and v else None


def _number(v: Any, digits: int = 3) -> float | None:
    return round(float(v), digits) if v is not None and np.isfinite(v) else None


def scene_provenance(row: Any) -> dict[str, Any]:
    """Which scenes a tile was made from (store schema 1.1; None where the source records none): the
    Sentinel-2 scene id, the tile cloud score and its mask, and per Sentinel-1 orbit the slice ids, the
    pass date and its gap to the Sentinel-2 scene in days."""
    out: dict[str, Any] = {
        "mmearth:s2_id": _text(getattr(row, "s2_id", None)),
        "mmearth:cloud_score": _number(getattr(row, "cloud_score", None)),
        "mmearth:cloud_score_source": _text(getattr(row, "cloud_score_source", None)),
    }
    for orbit in ("asc", "desc"):
        ids = _text(getattr(row, f"s1_ids_{orbit}", None))
        day = getattr(row, f"s1_date_{orbit}", None)
        out[f"mmearth:s1_ids_{orbit}"] = ids.split(",") if ids else None
        out[f"mmearth:s1_date_{orbit}"] = None if day is None or pd.isna(day) else str(day)[:10]
        out[f"mmearth:s1_gap_days_{orbit}"] = _number(getattr(row, f"s1_gap_days_{orbit}", None), 2)
    return out


def items_from_metadata(
    df: pd.DataFrame,
    tile_size: int,
    collection_id: str,
    store_href: str,
    stored: list[str],
    quicklooks: bool,
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """STAC item dicts for the tiles of ``df`` (per-tile metadata, one row per tile, with ``index``)."""
    rings, bboxes = footprints(df, tile_size)
    items = []
    for k, row in enumerate(df.itertuples(index=False)):
        ring = np.round(rings[k], 7).tolist()
        tid = str(row.tile_id)
        biome = int(row.biome)
        cloud = float(row.cloud_fraction)
        props: dict[str, Any] = {
            "datetime": _iso(row.s2_date),
            "proj:code": f"EPSG:{int(row.epsg)}",
            "proj:transform": [float(v) for v in row.transform],
            "proj:shape": [tile_size, tile_size],
            "eo:cloud_cover": round(100.0 * cloud, 3) if np.isfinite(cloud) else None,
            "mmearth:index": int(row.index),
            "mmearth:biome": biome,
            "mmearth:biome_name": BIOME_CLASSES.get(biome, "unknown"),
            "mmearth:ecoregion": int(row.ecoregion),
            "mmearth:year": int(row.year),
            "mmearth:split": str(row.split),
            "mmearth:s2_product": str(row.s2_product),
        }
        for m in stored:
            props[f"mmearth:has_{m}"] = bool(getattr(row, f"{m}_present"))
        props.update(scene_provenance(row))
        assets: dict[str, Any] = {
            "data": {
                "href": store_href,
                "type": ZARR_TYPE,
                "title": "corpus store (this tile: index on the tile dimension)",
                "roles": ["data"],
                "mmearth:index": int(row.index),
            }
        }
        if quicklooks:
            assets["quicklook"] = {
                "href": f"quicklooks/{tid}.png",
                "type": "image/png",
                "title": " | ".join(PANEL_TITLES[p] for p in PANELS),
                "roles": ["overview", "visual"],
            }
        items.append(
            {
                "type": "Feature",
                "stac_version": STAC_VERSION,
                "stac_extensions": [EXT["proj"], EXT["eo"]],
                "id": tid,
                "collection": collection_id,
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "bbox": [round(float(v), 7) for v in bboxes[k]],
                "properties": props,
                "assets": assets,
                "links": [
                    {"rel": "collection", "href": "./collection.json", "type": "application/json"},
                    {"rel": "root", "href": "./collection.json", "type": "application/json"},
                ],
            }
        )
    return items, bboxes


def metadata_batches(reader: CorpusReader, batch_tiles: int) -> Iterator[pd.DataFrame]:
    """Per-tile metadata of complete tiles (column ``index``: the store index), ``batch_tiles`` store
    indices at a time."""
    for s0 in range(0, reader.n_tiles, batch_tiles):
        s1 = min(s0 + batch_tiles, reader.n_tiles)
        if not reader.read(["complete"], s0, s1)["complete"].any():
            continue
        df = reader.tiles(s0, s1)
        df = df[df["complete"]].rename_axis("index").reset_index()
        if "biome" not in df:
            df["biome"] = 0
        if "ecoregion" not in df:
            df["ecoregion"] = 0
        yield df


def write_items(
    batches: Iterable[pd.DataFrame],
    path: str | Path,
    tile_size: int,
    collection_id: str,
    store_href: str,
    stored: list[str],
    quicklooks: bool,
    json_dir: Path | None = None,
    row_group_size: int = 65_536,
) -> ExtentAccumulator:
    """Stream item batches into a stac-geoparquet file; returns the extents seen."""
    acc = ExtentAccumulator()

    def arrow_batches() -> Iterator[pa.RecordBatch]:
        for df in batches:
            if df.empty:
                continue
            items, bboxes = items_from_metadata(df, tile_size, collection_id, store_href, stored, quicklooks)
            acc.add(df, bboxes)
            if json_dir is not None:
                for it in items:  # static items live one level down: links and assets point up
                    static = json.loads(json.dumps(it))
                    for link in static["links"]:
                        link["href"] = "../collection.json"
                    for asset in static["assets"].values():
                        if "://" not in asset["href"]:
                            asset["href"] = f"../{asset['href']}"
                    (json_dir / f"{it['id']}.json").write_text(json.dumps(static))
            table = parse_stac_items_to_arrow(items, chunk_size=len(items)).read_all()
            yield from table.to_batches(max_chunksize=row_group_size)  # one row group each

    gen = arrow_batches()
    first = next(gen, None)
    if first is None:
        raise CatalogError("the store holds no complete tile: nothing to catalog (finish the build first)")
    schema = first.schema

    def aligned() -> Iterator[pa.RecordBatch]:
        yield first
        for b in gen:
            yield b if b.schema.equals(schema) else _align(b, schema)

    reader = pa.RecordBatchReader.from_batches(schema, aligned())
    to_parquet(reader, str(path))
    return acc


def _align(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Cast a batch onto the file's schema (columns all-null in one batch come out as null type)."""
    cols = []
    for f in schema:
        if f.name in batch.schema.names:
            col = batch.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(batch.num_rows, f.type))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _provider_list(mods: list[Modality]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for m in mods:
        if m.provider == "derived":
            continue
        p = seen.setdefault(m.provider, {"name": m.provider, "roles": ["producer", "licensor"], "mods": []})
        p["mods"].append(f"{m.name} ({m.license})")
    out = []
    for p in seen.values():
        out.append(
            {
                "name": p["name"],
                "roles": p["roles"],
                "description": "licence per modality: " + ", ".join(p["mods"]),
            }
        )
    return out


def _bands(m: Modality, statistics: dict[str, Any]) -> list[dict[str, Any]]:
    st = statistics.get(m.name, {})
    fill = m.nodata
    out = []
    for b in m.bands:
        band: dict[str, Any] = {"name": f"{m.name}/{b}", "data_type": m.dtype, "unit": m.unit_of(b)}
        band["nodata"] = "nan" if fill is None else fill
        if m.categorical and len(m.classes) <= 64:  # ecoregion ids are listed in the registry instead
            band["classes"] = [{"value": int(v), "name": n} for v, n in m.classes.items()]
        s = st.get(b) if m.name != "sentinel2" else (st.get("L2A", {}).get(b) or st.get("L1C", {}).get(b))
        if s and s.get("count"):
            band["statistics"] = {
                "minimum": s["min"],
                "maximum": s["max"],
                "mean": s["mean"],
                "stddev": s["std"],
            }
        out.append(band)
    return out


def _datacube(reader: CorpusReader) -> tuple[dict[str, Any], dict[str, Any]]:
    """The store asset's datacube extension: its dimensions and variables."""
    mods, n, S = reader.modalities, reader.n_tiles, reader.tile_size
    dims = {
        "tile": {"type": "other", "description": "tile index (items' mmearth:index)", "extent": [0, n - 1]},
        "y": {
            "type": "spatial",
            "axis": "y",
            "description": "rows of the tile's own UTM 10 m grid",
            "extent": [0, S - 1],
        },
        "x": {
            "type": "spatial",
            "axis": "x",
            "description": "columns of the tile's own UTM 10 m grid",
            "extent": [0, S - 1],
        },
    }
    variables = {}
    for m in mods:
        if not m.scalar:
            dims[m.band_dim] = {"type": "bands", "values": list(m.bands)}
        variables[m.name] = {
            "dimensions": list(m.dims()),
            "type": "data",
            "description": m.description,
            "unit": m.units if isinstance(m.units, str) else ",".join(m.units),
        }
    return dims, variables


def collection_dict(
    reader: CorpusReader, acc: ExtentAccumulator, collection_id: str, store_href: str, json_items: list[str]
) -> dict[str, Any]:
    attrs = reader.attrs
    mods = reader.modalities
    S = reader.tile_size
    dims, variables = _datacube(reader)
    summaries: dict[str, Any] = {
        "mmearth:year": sorted(acc.years),
        "mmearth:biome": sorted(int(b) for b in acc.biomes),
        "mmearth:biome_name": [BIOME_CLASSES.get(int(b), "unknown") for b in sorted(acc.biomes)],
        "mmearth:split": sorted(acc.splits),
        "mmearth:s2_product": sorted(acc.products),
        "mmearth:modality": [m.name for m in mods],
    }
    derived = attrs.get("derived")  # a store made by `mmearth derive`: its source's build
    build = attrs.get("build") or (derived or {}).get("source_build", {})
    links = [
        {"rel": "self", "href": "./collection.json", "type": "application/json"},
        {"rel": "root", "href": "./collection.json", "type": "application/json"},
        {"rel": "items", "href": "./items.parquet", "type": PARQUET_TYPE, "title": "items (stac-geoparquet)"},
        {"rel": "cite-as", "href": f"https://doi.org/{CITATION_DOI}"},
    ]
    for tid in json_items:
        links.append({"rel": "item", "href": f"./items/{tid}.json", "type": "application/geo+json"})
    return {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": [EXT["datacube"], EXT["sci"]],
        "id": collection_id,
        "title": f"MMEarth-style multi-modal corpus: {collection_id}",
        "description": (
            f"{acc.n} tiles of {S} x {S} px at 10 m on each tile's UTM grid, balanced over biomes and years, "
            f"with {', '.join(m.name for m in mods)}. Source: {build.get('config', {}).get('source', '?')}."
        ),
        "license": "other",
        "providers": _provider_list(list(mods)),
        "extent": {
            "spatial": {"bbox": [acc.bbox]},
            "temporal": {"interval": [[_iso(acc.start), _iso(acc.end)]]},
        },
        "summaries": summaries,
        "sci:citation": CITATION,
        "sci:doi": CITATION_DOI,
        "assets": {
            "store": {
                "href": store_href,
                "type": ZARR_TYPE,
                "title": "Zarr v3 corpus store",
                "roles": ["data"],
                "cube:dimensions": dims,
                "cube:variables": variables,
                "bands": [b for m in mods for b in _bands(m, reader.statistics)],
            },
            "items": {"href": "./items.parquet", "type": PARQUET_TYPE, "roles": ["metadata"]},
        },
        "links": links,
        "mmearth:build": {
            "schema_version": attrs.get("schema_version"),
            "config_hash": build.get("config_hash"),
            "config": build.get("config"),
            "source": build.get("source"),
            "versions": build.get("versions"),
            **({"derived": {k: v for k, v in derived.items() if k != "source_build"}} if derived else {}),
            "catalog_created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "mmearth:legends": legends(),
        "mmearth:counts": {"biome": {str(k): v for k, v in acc.biomes.items()}, "split": acc.splits},
    }


def store_href_for(store: str, out: Path) -> str:
    if "://" in store:
        return store
    return os.path.relpath(Path(store).resolve(), out.resolve())


def resolve_store(catalog_dir: Path, href: str) -> str:
    return href if "://" in href else str((catalog_dir / href).resolve())


def write_quicklooks(reader: CorpusReader, out: Path, progress=None) -> int:
    """One quicklook PNG per complete tile, reading shard by shard."""
    qdir = out / "quicklooks"
    qdir.mkdir(parents=True, exist_ok=True)
    names = [p for p in PANELS if p in {m.name for m in reader.modalities}]
    n = 0
    for k in range(reader.n_shards):
        s0, s1 = reader.shard_range(k)
        complete = reader.read(["complete"], s0, s1)["complete"].astype(bool)
        if not complete.any():
            continue
        data = reader.read(["tile_id", *names, *(f"{m}_present" for m in names)], s0, s1)
        ids = strings(data["tile_id"])
        present = {m: data[f"{m}_present"].astype(bool) for m in names}
        for i in np.flatnonzero(complete):
            arrays = {m: data[m][i] for m in names if present[m][i]}
            (qdir / f"{ids[i]}.png").write_bytes(png_bytes(strip(arrays)))
            n += 1
        if progress is not None:
            progress(n)
    return n


IN_PROGRESS = ".catalog-in-progress"


def build_catalog(
    store: str,
    out: str | Path,
    batch_tiles: int = 50_000,
    quicklooks: str = "auto",
    json_items: bool = False,
    collection_id: str | None = None,
) -> dict[str, Any]:
    """Write the catalog of ``store`` into ``out`` (a folder, or any fsspec URL such as
    ``s3://bucket/catalog``: written in a local temporary folder, then uploaded, ``collection.json``
    last); returns a summary (paths, counts, seconds)."""
    import tempfile

    import fsspec

    fs, root = fsspec.core.url_to_fs(str(out))
    if "file" in fs.protocol:
        return _build_catalog_here(store, Path(root), batch_tiles, quicklooks, json_items, collection_id)
    root = root.rstrip("/")
    if fs.exists(root) and fs.ls(root) and not fs.exists(f"{root}/collection.json"):
        raise CatalogError(f"`out` {out} holds other files (no collection.json); choose an empty or new URL")
    if collection_id is None:
        collection_id = Path(store.rstrip("/")).name.removesuffix(".zarr") or "corpus"
    # the items point at the store by its URL, or by its absolute path on this machine
    href = store if "://" in store else str(Path(store).resolve())
    with tempfile.TemporaryDirectory(prefix="mmearth-catalog-") as tmp:
        res = _build_catalog_here(store, Path(tmp), batch_tiles, quicklooks, json_items, collection_id, href)
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file() and p.name != "collection.json")
        for p in [*files, Path(tmp) / "collection.json"]:  # readers see the old catalog or the new one
            fs.put_file(str(p), f"{root}/{p.relative_to(tmp).as_posix()}")
    url = str(out).rstrip("/")
    return res | {"collection": f"{url}/collection.json", "items": f"{url}/items.parquet"}


def _build_catalog_here(
    store: str,
    out: Path,
    batch_tiles: int,
    quicklooks: str,
    json_items: bool,
    collection_id: str | None,
    href: str | None = None,
) -> dict[str, Any]:
    import time

    t0 = time.perf_counter()
    reader = CorpusReader(store)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CatalogError(f"`out` {out} exists and is not a directory; choose another path")
    marker = out / IN_PROGRESS  # an earlier build of ours that stopped part-way: it is redone
    if out.exists() and any(out.iterdir()) and not (out / "collection.json").exists() and not marker.exists():
        raise CatalogError(
            f"`out` {out} holds other files (no collection.json); choose an empty or new directory"
        )
    if quicklooks not in ("auto", "all", "none"):
        raise CatalogError(f"`quicklooks` {quicklooks!r}: use auto, all or none")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"catalog of {store} being written; removed when collection.json is written\n")
    want_ql = quicklooks == "all" or (quicklooks == "auto" and reader.n_tiles <= QUICKLOOK_AUTO_MAX)
    cid = collection_id or Path(store.rstrip("/")).name.removesuffix(".zarr") or "corpus"
    href = href or store_href_for(store, out)
    json_dir = out / "items" if json_items else None
    if json_dir is not None:
        json_dir.mkdir(exist_ok=True)
    stored = [m.name for m in reader.modalities]
    tmp = out / "items.parquet.tmp"
    acc = write_items(
        metadata_batches(reader, batch_tiles), tmp, reader.tile_size, cid, href, stored, want_ql, json_dir
    )
    os.replace(tmp, out / "items.parquet")
    n_ql = write_quicklooks(reader, out) if want_ql else 0
    ids = sorted(p.stem for p in json_dir.glob("*.json")) if json_dir is not None else []
    coll = collection_dict(reader, acc, cid, href, ids)
    (out / "collection.json").write_text(json.dumps(coll, indent=1))
    marker.unlink()
    return {
        "collection": str(out / "collection.json"),
        "items": str(out / "items.parquet"),
        "n_items": acc.n,
        "quicklooks": n_ql,
        "json_items": len(ids),
        "seconds": time.perf_counter() - t0,
    }
