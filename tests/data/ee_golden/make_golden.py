"""Regenerate the golden Earth Engine requests: ``python tests/data/ee_golden/make_golden.py``.

For a few real locations, the per-tile requests of the earthengine source (the computeValue
expression and the computePixels request) are built offline with earthengine-api's shipped algorithm
table and written as sorted, indented JSON. ``tests/test_earthengine.py`` rebuilds them and compares:
a change to the recipe shows up as a reviewed diff of these files.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mmearth_data.grid import GlobalGrid, tile_transforms, utm_epsg
from mmearth_data.registry import stored_modalities
from mmearth_data.sources.base import TileRequest
from mmearth_data.sources.earthengine import EEConfig, pixels_request, tile_values_expression
from mmearth_data.sources.ee_offline import offline_ee

HERE = Path(__file__).resolve().parent
# name: (lat, lon, year, biome, ecoregion, config overrides)
LOCATIONS = {
    "amazon_2019_l2a": (-3.1, -60.0, 2019, 1, 0, {}),
    "sahara_2017_l1c": (23.0, 12.0, 2017, 13, 0, {}),
    "alps_2020_random_scene": (46.5, 8.0, 2020, 5, 0, {"scene_choice": "random", "seed": 3}),
    "siberia_2018_tile64": (70.0, 130.0, 2018, 11, 0, {"max_gap_days": 20}),
}


def tile_for(lat: float, lon: float, year: int, biome: int, eco: int, size: int = 128) -> TileRequest:
    grid = GlobalGrid(size)
    row, col = grid.cell_of(np.array([lat]), np.array([lon]))
    clat, clon = grid.center(row, col)
    epsg = utm_epsg(clat, clon)
    transform = tile_transforms(clat, clon, epsg, size)[0]
    return TileRequest(
        grid.tile_id(int(row[0]), int(col[0])), float(clat[0]), float(clon[0]), int(epsg[0]),
        tuple(float(v) for v in transform), size, year, biome, eco,
    )  # fmt: skip


def golden(name: str) -> dict:
    lat, lon, year, biome, eco, over = LOCATIONS[name]
    t = tile_for(lat, lon, year, biome, eco, 64 if name.endswith("tile64") else 128)
    cfg = EEConfig(**over)
    values = tile_values_expression(t, cfg)
    req = pixels_request(t, stored_modalities(), cfg)
    pixels = {k: v for k, v in req.items() if k != "expression"}
    pixels["expression"] = json.loads(req["expression"].serialize(for_cloud_api=True))
    return {
        "tile": asdict(t),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("key_file", "transport")},
        "values": json.loads(values.serialize(for_cloud_api=True)),
        "pixels": pixels,
    }


def dumps(obj: dict) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def main() -> None:
    with offline_ee():
        for name in LOCATIONS:
            (HERE / f"{name}.json").write_text(dumps(golden(name)))
            print(f"wrote {name}.json")


if __name__ == "__main__":
    main()
