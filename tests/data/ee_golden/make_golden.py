"""Regenerate the golden Earth Engine requests: ``python tests/data/ee_golden/make_golden.py``.

For a few real locations, the per-tile requests of the earthengine source are built offline with
earthengine-api's shipped algorithm table and written as sorted, indented JSON: the computeValue
expression, a values response in the service's format (scene ids in the archives' own formats; the
scenes are examples, not looked up), and the computePixels request built from exactly that response.
``tests/test_earthengine.py`` rebuilds them and compares: a change to the recipe shows up as a reviewed
diff of these files. Every file must parse as strict JSON (no NaN or Infinity), as the service parses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from mmearth_data.registry import stored_modalities
from mmearth_data.sources.base import TileRequest
from mmearth_data.sources.earthengine import (
    L2A_SPECTRAL,
    EEConfig,
    decode_values,
    pixels_request,
    tile_values_expression,
)
from mmearth_data.testing.ee_offline import offline_ee

HERE = Path(__file__).resolve().parent
# name: (lat, lon, year, biome, ecoregion, config overrides)
LOCATIONS = {
    "amazon_2019_l2a": (-3.1, -60.0, 2019, 1, 0, {}),
    "sahara_2017_l1c": (23.0, 12.0, 2017, 13, 0, {}),
    "alps_2020_least_cloudy": (46.5, 8.0, 2020, 5, 0, {"scene_choice": "least_cloudy", "seed": 3}),
    "siberia_2018_tile64": (70.0, 130.0, 2018, 11, 0, {"max_gap_days": 20}),
    "kenya_2023_baseline4": (-1.3, 36.8, 2023, 7, 0, {"s2_level": "L2A"}),
}
L2A_BANDS = [*L2A_SPECTRAL, "AOT", "WVP", "SCL", "TCI_R", "TCI_G", "TCI_B", "MSK_CLDPRB", "MSK_SNWPRB",
             "QA10", "QA20", "QA60"]  # fmt: skip
BASELINE4 = ["MSK_CLASSI_OPAQUE", "MSK_CLASSI_CIRRUS", "MSK_CLASSI_SNOW_ICE"]
L1C_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12", "QA10", "QA20",
             "QA60"]  # fmt: skip
DAY = 86_400_000


def s1_pass(ids: list[str], time_ms: int, pols: list[str], rel_orbit: int) -> dict:
    return {"ids": ids, "time": time_ms, "pols": pols, "rel_orbit": rel_orbit}


def ms(date: str) -> int:
    return int(np.datetime64(date, "ms").astype(np.int64))


# values responses in computeValue's format, one per location (what the service would answer)
RESPONSES = {
    "amazon_2019_l2a": {
        "n_scenes": 7, "s2_product": "L2A", "s2_id": "20190815T140051_20190815T140047_T20MRB",
        "n_dynamic_world": 41, "n_dem": 1,
        "s2_time": ms("2019-08-15T14:00:51"), "s2_bands": L2A_BANDS, "s2_cloud": 1.25,
        "s2_cloud_source": "cloud_score_plus", "s2_granule_cloud": 23.4,
        "s1_asc": {"ids": []},
        "s1_desc": s1_pass(["S1A_IW_GRDH_1SDV_20190812T092517_20190812T092542_028535_0339A1_3C1E"],
                           ms("2019-08-12T09:25:17"), ["VV", "VH"], 156),
        "era5": [299.1, 295.2, 304.8, 0.12, 299.6, 295.0, 305.3, 0.08, 300.1, 294.1, 307.2, 2.41],
    },
    "sahara_2017_l1c": {
        "n_scenes": 31, "s2_product": "L1C", "s2_id": "20170412T093031_20170412T093943_T33QUB",
        "n_dynamic_world": 57, "n_dem": 2,
        "s2_time": ms("2017-04-12T09:30:31"), "s2_bands": L1C_BANDS, "s2_cloud": 0.0,
        "s2_cloud_source": "cloud_score_plus", "s2_granule_cloud": 0.0,
        "s1_asc": s1_pass(["S1A_IW_GRDH_1SDV_20170409T172331_20170409T172356_016079_01A8D2_9E01",
                           "S1A_IW_GRDH_1SDV_20170409T172356_20170409T172421_016079_01A8D2_6F2B"],
                          ms("2017-04-09T17:23:31"), ["VV", "VH"], 87),
        "s1_desc": s1_pass(["S1A_IW_GRDH_1SDV_20170418T052011_20170418T052036_016207_01ACB1_0B7C"],
                           ms("2017-04-18T05:20:11"), ["VV", "VH"], 51),
        "era5": [298.2, 290.1, 306.0, 0.0, 303.4, 294.2, 311.9, 0.0, 299.5, 281.3, 316.2, 0.01],
    },
    "alps_2020_least_cloudy": {
        "n_scenes": 12, "s2_product": "L2A", "s2_id": "20200726T102031_20200726T102026_T32TMS",
        "n_dynamic_world": 23, "n_dem": 1,
        "s2_time": ms("2020-07-26T10:20:31"), "s2_bands": L2A_BANDS, "s2_cloud": 0.0,
        "s2_cloud_source": "cloud_score_plus", "s2_granule_cloud": 4.1,
        "s1_asc": s1_pass(["S1B_IW_GRDH_1SDV_20200724T172431_20200724T172456_022613_02AEB4_1A2B"],
                          ms("2020-07-24T17:24:31"), ["VV", "VH"], 15),
        "s1_desc": s1_pass(["S1A_IW_GRDH_1SDV_20200727T053256_20200727T053321_033630_03E5C2_7C0D"],
                           ms("2020-07-27T05:32:56"), ["VV", "VH"], 66),
        "era5": [283.0, 276.9, 290.1, 0.19, 285.4, 279.0, 292.5, 0.17, 276.8, 265.2, 292.5, 1.79],
    },
    "siberia_2018_tile64": {
        "n_scenes": 3, "s2_product": "L2A", "s2_id": "20180702T033541_20180702T033537_T52WDE",
        "n_dynamic_world": 9, "n_dem": 1,
        "s2_time": ms("2018-07-02T03:35:41"), "s2_bands": L2A_BANDS, "s2_cloud": 6.5,
        "s2_cloud_source": "scl", "s2_granule_cloud": 41.0,
        "s1_asc": s1_pass(["S1B_IW_GRDH_1SDH_20180629T215018_20180629T215043_011579_0154A2_4E11"],
                          ms("2018-06-29T21:50:18"), ["HH", "HV"], 147),
        "s1_desc": {"ids": []},
        "era5": [279.0, 272.1, 287.7, 0.03, 285.8, 278.2, 295.0, 0.04, 260.3, 228.4, 295.0, 0.25],
    },
    "kenya_2023_baseline4": {
        "n_scenes": 19, "s2_product": "L2A", "s2_id": "20230214T074951_20230214T080027_T37MBU",
        "n_dynamic_world": 35, "n_dem": 1,
        "s2_time": ms("2023-02-14T07:49:51"), "s2_bands": L2A_BANDS + BASELINE4, "s2_cloud": 3.0,
        "s2_cloud_source": "cloud_score_plus", "s2_granule_cloud": 8.8,
        "s1_asc": s1_pass(["S1A_IW_GRDH_1SDV_20230212T154110_20230212T154135_047236_05AB10_0D2E"],
                          ms("2023-02-12T15:41:10"), ["VV", "VH"], 130),
        "s1_desc": s1_pass(["S1A_IW_GRDH_1SDV_20230219T031905_20230219T031930_047331_05AE21_9A0F"],
                           ms("2023-02-19T03:19:05"), ["VV", "VH"], 79),
        "era5": [294.3, 286.5, 303.0, 0.05, 294.0, 287.1, 302.6, 0.04, 292.9, 284.0, 304.1, 0.88],
    },
}  # fmt: skip


# a stored tile getting modalities added (``build --extend --modalities``): pinned to its scene
PINNED = {"alps_2020_pinned_added": ("alps_2020_least_cloudy", ("canopy_height", "dynamic_world"))}
for _name, (_base, _) in PINNED.items():
    LOCATIONS[_name], RESPONSES[_name] = LOCATIONS[_base], RESPONSES[_base]


def tile_for(lat: float, lon: float, year: int, biome: int, eco: int, size: int = 128) -> TileRequest:
    return TileRequest.at(lat, lon, year, size, biome, eco)


def golden(name: str) -> dict:
    lat, lon, year, biome, eco, over = LOCATIONS[name]
    t = tile_for(lat, lon, year, biome, eco, 64 if name.endswith("tile64") else 128)
    cfg = EEConfig(**over)
    response = RESPONSES[name]
    mods = stored_modalities()
    if name in PINNED:
        day = str(np.datetime64(response["s2_time"], "ms").astype("datetime64[D]"))
        t = replace(t, s2_id=response["s2_id"], s2_product=response["s2_product"], s2_date=day)
        mods = stored_modalities(PINNED[name][1])
    values = tile_values_expression(t, cfg)
    req = pixels_request(t, mods, decode_values(response))
    pixels = {k: v for k, v in req.items() if k != "expression"}
    pixels["expression"] = json.loads(req["expression"].serialize(for_cloud_api=True))
    return {
        "tile": asdict(t),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("key_file", "transport")},
        "values": json.loads(values.serialize(for_cloud_api=True)),
        "values_response": response,
        "pixels": pixels,
    }


def dumps(obj: dict) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n"


def main() -> None:
    with offline_ee():
        for old in HERE.glob("*.json"):
            if old.stem not in LOCATIONS:
                old.unlink()
        for name in LOCATIONS:
            (HERE / f"{name}.json").write_text(dumps(golden(name)))
            print(f"wrote {name}.json")


if __name__ == "__main__":
    main()
