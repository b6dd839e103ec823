"""The requests the Earth Engine source sends, checked as the service would read them: golden files
built offline from earthengine-api's shipped algorithm table, strict JSON over a sweep of options and
years, the band plumbing of every pixel request evaluated by name (which asset band ends up under which
stored name), the DEM's projection chain, and the decoding of the service's answers."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mmearth_data.registry import S1_BANDS, S2_BANDS, stored_modalities
from mmearth_data.sources.earthengine import (
    FLOAT_FILL,
    S2_SPECTRAL,
    EEConfig,
    PermanentError,
    decode_labels,
    decode_pixels,
    decode_values,
    pixels_request,
    resolve_labels_expression,
    tile_values_expression,
)
from mmearth_data.sources.ee_graph import GraphError, band_plumbing
from mmearth_data.testing.ee_fake import catalog_bands, scene_bands, strict_json
from mmearth_data.testing.ee_offline import offline_ee

GOLDEN = Path(__file__).resolve().parent / "data" / "ee_golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402

MODS = stored_modalities()


@pytest.fixture(scope="module")
def ee():
    with offline_ee() as module:
        yield module


@pytest.mark.parametrize("name", sorted(make_golden.LOCATIONS))
def test_requests_match_the_golden_files(name, ee):
    got = make_golden.dumps(make_golden.golden(name))
    want = (GOLDEN / f"{name}.json").read_text()
    assert got == want, (
        f"the recipe changed: run tests/data/ee_golden/make_golden.py and review the diff of {name}.json"
    )


def test_no_stale_golden_files():
    assert {p.stem for p in GOLDEN.glob("*.json")} == set(make_golden.LOCATIONS)


@pytest.mark.parametrize("name", sorted(make_golden.LOCATIONS))
def test_golden_files_are_strict_json(name):
    strict_json((GOLDEN / f"{name}.json").read_text())


def test_strict_parser_refuses_what_the_service_refuses(ee):
    expr = ee.Image.constant(0).unmask(float("nan"))
    text = expr.serialize(for_cloud_api=True)
    assert "NaN" in text  # what the earlier recipe sent
    with pytest.raises(ValueError, match="Unexpected token NaN"):
        strict_json(text)


def _tile(size=128, year=2019, lat=46.5, lon=8.0):
    return make_golden.tile_for(lat, lon, year, 5, 0, size)


def test_every_request_of_an_option_sweep_is_strict_json(ee):
    responses = list(make_golden.RESPONSES.values())
    n = 0
    options = itertools.product(("random", "least_cloudy"), ("auto", "L2A", "L1C"), (0.0, 10.0), (0, 30))
    for (choice, level, cloud, gap), year in itertools.product(options, range(2016, 2026)):
        months = (11, 2) if year % 3 == 0 else None
        opts = {"scene_choice": choice, "s2_level": level, "max_scene_cloud": cloud, "max_gap_days": gap}
        cfg = EEConfig(**opts, seed=year, months=months)
        t = _tile(64 if year % 2 else 128, year)
        strict_json(tile_values_expression(t, cfg).serialize(for_cloud_api=True))
        scene = decode_values(responses[n % len(responses)])
        strict_json(pixels_request(t, MODS, scene)["expression"].serialize(for_cloud_api=True))
        n += 1
    strict_json(resolve_labels_expression([10.0, -3.1], [20.0, -60.0], 2000).serialize(for_cloud_api=True))
    assert n == 2 * 3 * 2 * 2 * 10


# --- band plumbing: which asset band is stored under which name --------------------------------------
def expected_origin(scene, band_id: str) -> tuple[str, str] | None:
    """(asset, band) that must feed a stored band, None for a masked placeholder. Written from the
    archives' documentation, independently of how the recipe builds its expression."""
    modality, band = band_id.split("__")
    s2 = f"{scene.s2_collection}/{scene.s2_id}"
    if modality == "sentinel2":
        return (s2, band) if band in S2_SPECTRAL[scene.s2_product] else None
    if modality == "sentinel2_masks":
        if band == "QA60" and "MSK_CLASSI_OPAQUE" in scene.s2_bands:
            return (s2, "MSK_CLASSI_CIRRUS")  # flags = cirrus*2, where opaque: 1
        return (s2, band) if band in scene.s2_bands else None
    if modality == "sentinel1":
        pol, orbit = band.split("_")
        p = scene.s1[orbit]
        return (",".join(f"COPERNICUS/S1_GRD/{i}" for i in p.ids), pol) if pol in p.pols else None
    if (modality == "dem" and not scene.n_dem) or (modality == "dynamic_world" and not scene.n_dynamic_world):
        return None  # the archive has no image here
    return {
        "dem__elevation": ("COPERNICUS/DEM/GLO30/*", "DEM"),
        "dem__slope": ("COPERNICUS/DEM/GLO30/*", "DEM"),
        "dynamic_world__label": ("GOOGLE/DYNAMICWORLD/V1/*", "label"),
        "esa_worldcover__map": ("ESA/WorldCover/v100/*", "Map"),
        "canopy_height__height": ("users/nlang/ETH_GlobalCanopyHeight_2020_10m_v1", "b1"),
        "canopy_height__std": ("users/nlang/ETH_GlobalCanopyHeightSD_2020_10m_v1", "b1"),
    }[band_id]


def plumbing_problems(expression_json: dict, scene, band_ids: list[str]) -> list[str]:
    bands = band_plumbing(expression_json, scene_bands(scene.s2_bands))
    problems = []
    if list(bands) != band_ids:
        problems.append(f"output bands {list(bands)} differ from bandIds")
    for band_id, b in bands.items():
        want = expected_origin(scene, band_id)
        got = None if b.placeholder else (",".join(b.assets), b.source)
        if got != want:
            problems.append(f"{band_id}: stored from {got}, expected {want}")
        if want is None and not b.masked:
            problems.append(f"{band_id}: a placeholder that is not masked")
    return problems


@pytest.mark.parametrize("name", sorted(make_golden.RESPONSES))
def test_every_stored_band_comes_from_the_asset_band_of_its_name(name):
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    scene = decode_values(golden["values_response"])
    px = golden["pixels"]
    assert plumbing_problems(px["expression"], scene, px["bandIds"]) == []


def test_plumbing_holds_for_every_sentinel1_polarisation_case(ee):
    base = make_golden.RESPONSES["amazon_2019_l2a"]
    vv = {"ids": ["S1A_IW_GRDH_1SDV_20190812T092517_A"], "time": base["s2_time"], "pols": ["VV", "VH"]}
    hh = {"ids": ["S1B_IW_GRDH_1SDH_20190810T092517_B"], "time": base["s2_time"], "pols": ["HH", "HV"]}
    two = {
        "ids": ["S1A_IW_GRDH_1SDV_X1", "S1A_IW_GRDH_1SDV_X2"],
        "time": base["s2_time"],
        "pols": ["VV", "VH"],
    }
    t = _tile()
    for asc, desc in itertools.product([vv, hh, two, {"ids": []}], repeat=2):
        scene = decode_values(dict(base, s1_asc=asc, s1_desc=desc))
        req = pixels_request(t, MODS, scene)
        expr = json.loads(req["expression"].serialize(for_cloud_api=True))
        assert plumbing_problems(expr, scene, req["bandIds"]) == [], (asc, desc)
        bands = band_plumbing(expr, catalog_bands)
        if asc is hh:
            assert bands["sentinel1__HH_asc"].source == "HH" and bands["sentinel1__VV_asc"].placeholder


def test_plumbing_check_catches_sentinel1_renamed_by_position(ee):
    """The earlier recipe: masked placeholders VV, VH, HH, HV; the scene's pair added with overwrite
    (overwritten bands move to the end), then renamed by position. VV data lands under HH."""
    scene = decode_values(make_golden.RESPONSES["amazon_2019_l2a"])
    pols = ["VV", "VH", "HH", "HV"]
    scene_img = ee.Image(f"COPERNICUS/S1_GRD/{scene.s1['desc'].ids[0]}")
    empty = ee.Image.constant([0, 0, 0, 0]).rename(pols).toFloat().updateMask(0)
    desc = empty.addBands(scene_img.select("[VH][VH]"), None, True).rename([f"{p}_desc" for p in pols])
    asc = empty.rename([f"{p}_asc" for p in pols])
    s1 = ee.Image.cat([asc, desc]).select(list(S1_BANDS))
    s1 = s1.rename([f"sentinel1__{b}" for b in S1_BANDS])
    expr = json.loads(s1.serialize(for_cloud_api=True))
    bands = band_plumbing(expr, catalog_bands)
    assert bands["sentinel1__HH_desc"].source == "VV"  # the bug, reproduced
    problems = [p for p in plumbing_problems(expr, scene, [f"sentinel1__{b}" for b in S1_BANDS])]
    assert any(p.startswith("sentinel1__VV_desc") for p in problems)
    assert any(p.startswith("sentinel1__HH_desc") for p in problems)


def test_evaluator_refuses_what_the_service_refuses(ee):
    img = ee.Image("COPERNICUS/S2_SR_HARMONIZED/20190815T140051_20190815T140047_T20MRB")
    with pytest.raises(GraphError, match="did not match any bands"):
        band_plumbing(json.loads(img.select(["B10"]).serialize(for_cloud_api=True)), catalog_bands)
    with pytest.raises(GraphError, match="no band rule"):
        band_plumbing(
            json.loads(img.normalizedDifference(["B8", "B4"]).serialize(for_cloud_api=True)), catalog_bands
        )
    with pytest.raises(GraphError, match="in both images"):
        band_plumbing(json.loads(img.addBands(img).serialize(for_cloud_api=True)), catalog_bands)


def test_archives_without_an_image_over_the_tile_give_masked_placeholders_and_absent_flags(ee):
    from mmearth_data.sources.earthengine import tile_result

    t = _tile(64)
    scene = decode_values(dict(make_golden.RESPONSES["amazon_2019_l2a"], n_dem=0, n_dynamic_world=0))
    req = pixels_request(t, MODS, scene)
    expr = json.loads(req["expression"].serialize(for_cloud_api=True))
    assert plumbing_problems(expr, scene, req["bandIds"]) == []
    bands = band_plumbing(expr, scene_bands(scene.s2_bands))
    assert all(bands[k].placeholder for k in ("dem__elevation", "dem__slope", "dynamic_world__label"))
    assert "GLO30" not in json.dumps(expr) and "DYNAMICWORLD" not in json.dumps(expr)
    res = tile_result(t, MODS, scene, {})
    assert res.present["dem"] is False and res.present["dynamic_world"] is False and res.present["sentinel2"]


def test_l2a_b10_and_l1c_masks_are_masked_placeholders():
    l1c = {"sentinel2_masks__SCL", "sentinel2_masks__MSK_CLDPRB"}
    for name, placeholders in (("amazon_2019_l2a", {"sentinel2__B10"}), ("sahara_2017_l1c", l1c)):
        golden = json.loads((GOLDEN / f"{name}.json").read_text())
        bands = band_plumbing(golden["pixels"]["expression"], catalog_bands)
        got = {k for k, b in bands.items() if b.placeholder and not k.startswith("sentinel1")}
        assert got == placeholders, name
        assert all(bands[k].masked for k in got)


# --- terrain, resampling, casts ----------------------------------------------------------------------
def test_slope_is_computed_on_a_30m_grid_in_the_tiles_utm_zone_then_resampled_bilinearly():
    golden = json.loads((GOLDEN / "amazon_2019_l2a.json").read_text())
    t = golden["tile"]
    bands = band_plumbing(golden["pixels"]["expression"], catalog_bands)
    _, _, c, _, _, f = t["transform"]
    reproject = f"reproject:EPSG:{t['epsg']}:[30, 0, {c}, 0, -30, {f}]:None"
    for name in ("dem__elevation", "dem__slope"):
        ops = list(bands[name].ops)
        assert ops.count(reproject) == 1 and not any("4326" in o for o in ops), ops
        assert ops.index("resample:bilinear") < ops.index("mosaic") < ops.index(reproject)  # GLO-30 tiles
        assert ops[ops.index(reproject) + 1 :][-3:] == [
            "resample:bilinear",
            f"unmask:{FLOAT_FILL}",
            "toFloat",
        ]
    slope = list(bands["dem__slope"].ops)
    assert slope.index(reproject) < slope.index("Terrain.slope") < len(slope) - 3
    assert "Terrain.slope" not in bands["dem__elevation"].ops


def test_continuous_bands_are_rounded_before_integer_casts_and_categorical_ones_are_not():
    golden = json.loads((GOLDEN / "alps_2020_least_cloudy.json").read_text())
    bands = band_plumbing(golden["pixels"]["expression"], catalog_bands)
    for name in ("canopy_height__height", "canopy_height__std", "sentinel2__B5"):
        ops = bands[name].ops
        assert ops[-3:][0] == "round" and ops[-1] in ("toUint8", "toUint16"), (name, ops)
        assert ops.index("resample:bilinear") < ops.index("round")
    for name in ("dynamic_world__label", "esa_worldcover__map", "sentinel2_masks__SCL"):
        assert "round" not in bands[name].ops and "resample:bilinear" not in bands[name].ops


def test_pixels_request_loads_exactly_the_chosen_scenes():
    for name, response in make_golden.RESPONSES.items():
        text = json.dumps(json.loads((GOLDEN / f"{name}.json").read_text())["pixels"])
        if name in make_golden.PINNED:  # canopy height and Dynamic World only: no scene is loaded
            assert "COPERNICUS/S2" not in text and "COPERNICUS/S1" not in text
            continue
        assert response["s2_id"] in text
        for orbit in ("s1_asc", "s1_desc"):
            for i in response[orbit].get("ids", []):
                assert f'"COPERNICUS/S1_GRD/{i}"' in text
        assert 'S2_SR_HARMONIZED"' not in text and 'COPERNICUS/S1_GRD"' not in text  # no second search
        assert "CLOUDY_PIXEL_PERCENTAGE" not in text and "randomColumn" not in text


def test_values_request_scores_the_tile_and_falls_back_to_l1c():
    text = (GOLDEN / "amazon_2019_l2a.json").read_text()
    values = json.dumps(json.loads(text)["values"])
    tokens = ["GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED", "Image.linkCollection", "COPERNICUS/S2_HARMONIZED",
              "COPERNICUS/S2_SR_HARMONIZED", "mmearth_cloud", "mmearth_valid", "Collection.randomColumn",
              "relativeOrbitNumber_start", "mmearth_covered", "ECMWF/ERA5_LAND/MONTHLY_AGGR",
              "Geometry.buffer"]  # fmt: skip
    for token in tokens:
        assert token in values, token
    assert "RESOLVE" not in values  # labels come from the plan
    kenya = json.dumps(json.loads((GOLDEN / "kenya_2023_baseline4.json").read_text())["values"])
    assert 'COPERNICUS/S2_HARMONIZED"' not in kenya  # --s2-level L2A: no L1C fallback
    assert '"maxError"' in values


def test_values_request_of_a_pinned_tile_asks_for_its_stored_scene_only():
    """A tile getting modalities added later: its values request loads the stored scene by id from the
    stored product's collection, scores it, and makes no choice (no cloud filters, no random order, no
    fallback to the other product)."""
    from mmearth_data.testing.ee_fake import pinned_scene_id

    golden = json.loads((GOLDEN / "alps_2020_pinned_added.json").read_text())
    values = json.dumps(golden["values"])
    assert pinned_scene_id(golden["values"]) == golden["tile"]["s2_id"] == make_golden.RESPONSES[
        "alps_2020_least_cloudy"]["s2_id"]  # fmt: skip
    assert "COPERNICUS/S2_SR_HARMONIZED" in values and '"COPERNICUS/S2_HARMONIZED"' not in values
    for token in ("Collection.randomColumn", "Filter.lessThan", "Filter.greaterThan", "mmearth_rank"):
        assert token not in values, token
    for token in ("mmearth_cloud", "ECMWF/ERA5_LAND/MONTHLY_AGGR", "mmearth_covered"):  # from that scene
        assert token in values, token
    unpinned = json.loads((GOLDEN / "alps_2020_least_cloudy.json").read_text())["values"]
    assert pinned_scene_id(unpinned) is None


# --- decoding the service's answers ---------------------------------------------------------------------
def test_decode_values_and_pixels():
    scene = decode_values(make_golden.RESPONSES["siberia_2018_tile64"])
    assert scene.s2_product == "L2A" and scene.s1["asc"].pols == ("HH", "HV") and not scene.s1["desc"].present
    assert scene.s1_gap_days("asc") == pytest.approx(2.24, abs=0.01)
    assert decode_values({"n_scenes": 0}) is None
    for bad in ({"n_scenes": 3}, [], dict(make_golden.RESPONSES["amazon_2019_l2a"], era5=[1.0])):
        with pytest.raises(PermanentError):
            decode_values(bad)
    t = _tile(64)
    kinds = {"float16": "<f4", "float32": "<f4", "uint16": "<u2", "uint8": "u1"}
    fields = [(f"{m.name}__{b}", kinds[m.dtype]) for m in MODS if m.kind == "pixel" for b in m.bands]
    arr = np.zeros((64, 64), dtype=fields)
    arr["sentinel1__VV_asc"] = -11.5
    arr["sentinel1__VV_asc"][:3] = FLOAT_FILL
    arr["dem__elevation"] = FLOAT_FILL
    out = decode_pixels(arr, t, MODS)
    s1 = out["sentinel1"]
    assert s1.dtype == np.float16 and np.isnan(s1[0, :3]).all() and (s1[0, 3:] == -11.5).all()
    assert np.isnan(out["dem"][0]).all() and out["sentinel2"].shape == (len(S2_BANDS), 64, 64)


def test_decode_labels():
    rows = [[1, 7, 55, 0.0], [0, -1, -1, -1]]
    got = decode_labels(rows, 2)
    assert got.tolist() == [[-1, -1, -1], [7, 55, 0]]
    with pytest.raises(PermanentError):
        decode_labels(rows, 3)
