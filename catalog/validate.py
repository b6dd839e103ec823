"""Offline validation of a catalog: STAC 1.1 core schemas plus the extension fields the catalog uses.

The core Item and Collection schemas are the STAC 1.1.0 JSON schemas that pystac bundles (validated
with jsonschema, no network). The extension schemas live online only, so the fields this catalog
writes from the projection, eo and datacube extensions, and its own ``mmearth:`` fields, are checked
against the schemas below, written for exactly those fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
from pystac import STACObjectType
from pystac.validation.stac_validator import JsonSchemaSTACValidator

from catalog.search import items_path

NUM = {"type": "number"}
ITEM_FIELDS = {
    "type": "object",
    "required": ["properties", "assets"],
    "properties": {
        "properties": {
            "type": "object",
            "required": [
                "datetime",
                "proj:code",
                "proj:transform",
                "proj:shape",
                "mmearth:index",
                "mmearth:biome",
                "mmearth:year",
                "mmearth:split",
                "mmearth:s2_product",
            ],
            "properties": {
                "proj:code": {"type": "string", "pattern": "^EPSG:[0-9]+$"},
                "proj:transform": {"type": "array", "items": NUM, "minItems": 6, "maxItems": 9},
                "proj:shape": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1},
                    "minItems": 2,
                    "maxItems": 2,
                },
                "eo:cloud_cover": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
                "mmearth:index": {"type": "integer", "minimum": 0},
                "mmearth:biome": {"type": "integer", "minimum": 1, "maximum": 14},
                "mmearth:ecoregion": {"type": "integer", "minimum": 0},
                "mmearth:year": {"type": "integer", "minimum": 2015},
                "mmearth:split": {"enum": ["train", "val", "test"]},
                "mmearth:s2_product": {"enum": ["L1C", "L2A"]},
                "mmearth:s2_id": {"type": ["string", "null"]},
                "mmearth:cloud_score": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
                "mmearth:cloud_score_source": {"type": ["string", "null"]},
            },
            "patternProperties": {
                "^mmearth:has_": {"type": "boolean"},
                "^mmearth:s1_ids_(asc|desc)$": {"type": ["array", "null"], "items": {"type": "string"}},
                "^mmearth:s1_date_(asc|desc)$": {"type": ["string", "null"], "format": "date"},
                "^mmearth:s1_gap_days_(asc|desc)$": {"type": ["number", "null"], "minimum": 0},
            },
        },
        "assets": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "object",
                    "required": ["href", "mmearth:index"],
                    "properties": {"mmearth:index": {"type": "integer", "minimum": 0}},
                }
            },
        },
    },
}
DIMENSION = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"type": "string"},
        "axis": {"enum": ["x", "y", "z"]},
        "extent": {"type": "array", "minItems": 2, "maxItems": 2},
        "values": {"type": "array"},
        "description": {"type": "string"},
    },
}
VARIABLE = {
    "type": "object",
    "required": ["dimensions", "type"],
    "properties": {
        "dimensions": {"type": "array", "items": {"type": "string"}},
        "type": {"enum": ["data", "auxiliary"]},
        "unit": {"type": "string"},
    },
}
BAND = {
    "type": "object",
    "required": ["name", "data_type"],
    "properties": {
        "name": {"type": "string"},
        "data_type": {"type": "string"},
        "statistics": {
            "type": "object",
            "properties": {k: NUM for k in ("minimum", "maximum", "mean", "stddev")},
        },
    },
}
COLLECTION_FIELDS = {
    "type": "object",
    "required": ["assets", "summaries", "sci:citation"],
    "properties": {
        "sci:citation": {"type": "string"},
        "sci:doi": {"type": "string", "pattern": "^10\\."},
        "assets": {
            "type": "object",
            "required": ["store"],
            "properties": {
                "store": {
                    "type": "object",
                    "required": ["href", "cube:dimensions", "cube:variables", "bands"],
                    "properties": {
                        "cube:dimensions": {"type": "object", "additionalProperties": DIMENSION},
                        "cube:variables": {"type": "object", "additionalProperties": VARIABLE},
                        "bands": {"type": "array", "items": BAND, "minItems": 1},
                    },
                }
            },
        },
    },
}


class CatalogInvalid(ValueError):
    pass


_core = None


def _validator() -> JsonSchemaSTACValidator:
    global _core
    if _core is None:
        _core = JsonSchemaSTACValidator()
    return _core


def validate_item(item: dict[str, Any]) -> None:
    """Raise (pystac's STACValidationError or jsonschema's ValidationError) when ``item`` is invalid."""
    _validator().validate_core(item, STACObjectType.ITEM, item["stac_version"], href=item.get("id"))
    jsonschema.validate(item, ITEM_FIELDS)


def validate_collection(coll: dict[str, Any]) -> None:
    _validator().validate_core(coll, STACObjectType.COLLECTION, coll["stac_version"], href=coll.get("id"))
    jsonschema.validate(coll, COLLECTION_FIELDS)


def validate_catalog(catalog: str | Path, batch: int = 10_000) -> int:
    """Validate the collection and every item of a catalog directory; returns the number of items."""
    import json

    import pyarrow.parquet as pq
    from stac_geoparquet.arrow import stac_table_to_items

    catalog = Path(catalog)
    coll = json.loads((catalog / "collection.json").read_text())
    validate_collection(coll)
    n = 0
    pf = pq.ParquetFile(items_path(catalog))
    for rb in pf.iter_batches(batch_size=batch):
        for item in stac_table_to_items(rb):
            validate_item(item)
            if item.get("collection") != coll["id"]:
                raise CatalogInvalid(
                    f"item {item['id']} names collection {item.get('collection')}, not {coll['id']}"
                )
            n += 1
    return n
