"""The offline world's physics: values, not shapes."""

import numpy as np
import pytest

from mmearth_data.registry import stored_modalities
from mmearth_data.sampling import SampleConfig, primaries, sample_plan
from mmearth_data.sources.base import TileRequest
from mmearth_data.sources.offline import OfflineSource, slope_degrees

B = {
    b: i
    for i, b in enumerate(("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"))
}


@pytest.fixture(scope="module")
def tiles():
    plan = primaries(sample_plan(SampleConfig(224, seed=5, tile_size=64, reserve=0)))
    reqs = [TileRequest.from_row(r, 64) for _, r in plan.iterrows()]
    res = OfflineSource(seed=5).fetch(reqs, stored_modalities())
    return list(zip(reqs, res, strict=True))


def clear(res):
    masks = res.arrays["sentinel2_masks"]
    return masks[2] == 0  # QA60: no opaque cloud, no cirrus


def ndvi(res, sel):
    s2 = res.arrays["sentinel2"].astype(np.float64)
    nir, red = s2[B["B8"]][sel], s2[B["B4"]][sel]
    return np.mean((nir - red) / (nir + red))


def test_forest_tiles_are_greener_than_desert_tiles(tiles):
    forest = [ndvi(r, clear(r)) for q, r in tiles if q.biome in (1, 4) and clear(r).mean() > 0.5]
    desert = [ndvi(r, clear(r)) for q, r in tiles if q.biome == 13 and clear(r).mean() > 0.5]
    assert len(forest) >= 5 and len(desert) >= 5
    assert np.median(forest) > np.median(desert) + 0.2


def test_water_is_dark_in_nir(tiles):
    water, land = [], []
    for _, r in tiles:
        dw = r.arrays["dynamic_world"][0]
        ok = clear(r) & (r.arrays["sentinel2_masks"][0] != 11)
        nir = r.arrays["sentinel2"][B["B8"]]
        water += nir[(dw == 1) & ok].tolist()
        land += nir[(dw == 2) & ok].tolist()
    assert len(water) > 1000
    assert np.median(water) < 600 < np.median(land)


def test_slope_is_consistent_with_elevation(tiles):
    for _, r in tiles[:20]:
        elev, slope = r.arrays["dem"]
        # both come from the DEM's 30 m grid, resampled bilinearly with centres aligned: every third
        # 10 m pixel (offset 1) is a 30 m sample exactly, and there slope is that grid's gradient
        z30, s30 = elev[1::3, 1::3], slope[1::3, 1::3]
        inside = (slice(1, -1), slice(1, -1))
        np.testing.assert_allclose(slope_degrees(z30, 30.0)[inside], s30[inside], rtol=1e-4, atol=1e-4)
        # between the samples the 10 m surface agrees with the stored slope (loosely: a k^-3 terrain
        # has detail at 30 m that bilinear interpolation of elevation and of slope treat differently)
        inner = (slice(3, -3), slice(3, -3))
        s10 = slope_degrees(elev)[inner]
        if slope[inner].mean() > 1.0:
            assert np.corrcoef(s10.ravel(), slope[inner].ravel())[0, 1] > 0.6
            assert np.median(np.abs(s10 - slope[inner])) < 0.25 * slope[inner].mean()
    steep = [r.arrays["dem"][1].mean() for q, r in tiles if q.biome == 10]
    flat = [r.arrays["dem"][1].mean() for q, r in tiles if q.biome == 9]
    assert np.median(steep) > np.median(flat)


def test_cloudy_pixels_are_flagged_in_every_mask(tiles):
    cloudy = [
        r for _, r in tiles if r.s2_product == "L2A" and (r.arrays["sentinel2_masks"][0] == 9).mean() > 0.05
    ]
    assert len(cloudy) >= 5
    for r in cloudy:
        scl, prob, qa = r.arrays["sentinel2_masks"]
        blue = r.arrays["sentinel2"][B["B2"]]
        thick = scl == 9
        assert prob[thick].min() > 40
        assert (qa[thick] == 1).mean() > 0.95
        surface = np.isin(scl, (4, 5, 6))
        if surface.any():
            assert blue[thick].mean() > 2 * blue[surface].mean()
    l1c = [r for _, r in tiles if r.s2_product == "L1C"]
    assert all((r.arrays["sentinel2_masks"][0] == 255).all() for r in l1c), "L1C has no SCL"
    assert all(r.arrays["sentinel2"][B["B10"]].min() > 0 for r in l1c)


def test_l2a_has_no_b10_and_l1c_is_brighter_in_blue(tiles):
    l2a = [r for _, r in tiles if r.s2_product == "L2A"]
    l1c = [r for _, r in tiles if r.s2_product == "L1C"]
    assert l2a and l1c
    assert all((r.arrays["sentinel2"][B["B10"]] == 0).all() for r in l2a)
    assert all(r.s2_date < np.datetime64("2019-01-01") for r in l1c)


def test_sentinel1_vv_above_vh_and_sometimes_missing(tiles):
    diffs = []
    for _, r in tiles:
        s1 = r.arrays["sentinel1"].astype(np.float32)
        for co, cross in ((0, 1), (4, 5)):
            if np.isfinite(s1[co]).any():
                diffs.append(np.nanmean(s1[co]) - np.nanmean(s1[cross]))
    assert np.mean(diffs) > 3 and np.mean(np.array(diffs) > 0) > 0.95
    missing_orbit = sum(
        1 for _, r in tiles if not r.extra["s1_orbits"]["asc"] or not r.extra["s1_orbits"]["desc"]
    )
    assert 0 < missing_orbit < len(tiles) / 2


def test_sentinel1_cross_polarisation_follows_each_parcels_canopy(tiles):
    # in the growing season a parcel's VH rises with the biomass its NDVI shows (volume scattering), as
    # crop monitoring with Sentinel-1 measures it; the soil's roughness per parcel blurs but does not hide it
    corr = []
    for _, r in tiles:
        st = r.extra["structure"]
        parcel, vh = st["parcel"], r.arrays["sentinel1"][1].astype(np.float32)
        ok = clear(r) & (parcel >= 0)
        if st["greenness"] < 0.5 or ok.mean() < 0.3 or not np.isfinite(vh).any():
            continue
        ids = [i for i in np.unique(parcel[ok]) if (ok & (parcel == i)).sum() >= 20]
        if len(ids) >= 4:
            pv = [(ndvi(r, ok & (parcel == i)), float(np.mean(vh[ok & (parcel == i)]))) for i in ids]
            corr.append(np.corrcoef(np.array(pv).T)[0, 1])
    assert len(corr) >= 5
    assert np.median(corr) > 0.3, corr


def test_era5_temperature_falls_with_latitude_and_elevation(tiles):
    lat = np.array([abs(q.lat) for q, _ in tiles])
    elev = np.array([np.mean(r.arrays["dem"][0]) for _, r in tiles])
    t_year = np.array([r.arrays["era5"][8] for _, r in tiles])  # year_t2m, K
    X = np.column_stack([np.ones_like(lat), lat, elev])
    coef, *_ = np.linalg.lstsq(X, t_year, rcond=None)
    assert coef[1] < -0.2, f"no cooling with latitude: {coef}"
    assert coef[2] < -0.002, f"no cooling with elevation: {coef}"
    assert np.all((t_year > 200) & (t_year < 320))
    era = np.array([r.arrays["era5"] for _, r in tiles])
    assert np.all(era[:, 1] <= era[:, 0]) and np.all(era[:, 0] <= era[:, 2])  # min <= mean <= max
    assert np.all(era[:, 11] >= era[:, 7])  # 12-month precipitation >= the month's


def test_canopy_height_follows_tree_cover(tiles):
    tall, open_, water = [], [], []
    for _, r in tiles:
        dw = r.arrays["dynamic_world"][0]
        h = r.arrays["canopy_height"][0]
        tall += h[dw == 2].tolist()
        open_ += h[(dw == 3) | (dw == 8)].tolist()
        water += (h[r.extra["structure"]["classes"] == 0] == 255).tolist()
    assert np.median(tall) > 5 and np.median(open_) == 0
    assert np.all(water), "water is no data in canopy height"


# Dynamic World label -> WorldCover class of the same meaning
DW_TO_WC = {1: 80, 2: 10, 3: 30, 4: 90, 5: 40, 6: 20, 7: 50, 8: 60, 9: 70}


def test_label_products_are_independent_maps_that_mostly_agree(tiles):
    same, water_same, per_tile = [], [], []
    for _, r in tiles:
        dw, wc = r.arrays["dynamic_world"][0], r.arrays["esa_worldcover"][0]
        agree = np.vectorize(DW_TO_WC.get)(dw) == wc
        same.append(agree.mean())
        water = r.extra["structure"]["classes"] == 0
        if water.sum() > 50:
            water_same.append(((dw == 1) & (wc == 80))[water].mean())
        per_tile.append(agree.all())
    # real WorldCover and Dynamic World agree on roughly 60-75 % of pixels; neither copies the other
    assert 0.55 < np.mean(same) < 0.9, np.mean(same)
    assert not any(per_tile)
    assert np.median(water_same) > 0.8  # open water is easy for both


def test_parcels_are_edges_in_sentinel2_and_sentinel1(tiles):
    from mmearth_data.sources.landscape import gaussian_blur

    ratios_s2, ratios_s1 = [], []
    for _, r in tiles:
        parcel = r.extra["structure"]["parcel"]
        if (parcel >= 0).mean() < 0.3:
            continue
        edge = np.zeros(parcel.shape, bool)
        edge[:, 1:] |= (parcel[:, 1:] != parcel[:, :-1]) & (parcel[:, 1:] >= 0) & (parcel[:, :-1] >= 0)
        inner = (parcel >= 0) & ~edge
        inner[:, 1:] &= ~edge[:, :-1]
        inner[:, :-1] &= ~edge[:, 1:]
        b8 = r.arrays["sentinel2"][B["B8"]].astype(float)
        g2 = np.abs(np.diff(b8, axis=1, prepend=b8[:, :1]))
        ratios_s2.append(g2[edge].mean() / g2[inner].mean())
        vv = r.arrays["sentinel1"][0].astype(np.float32)
        if np.isfinite(vv).all():
            lin = gaussian_blur(10 ** (vv / 10), 1.5)  # averaged over speckle
            g1 = np.abs(np.diff(lin, axis=1, prepend=lin[:, :1]))
            ratios_s1.append(g1[edge].mean() / g1[inner].mean())
    assert len(ratios_s2) >= 5 and len(ratios_s1) >= 3
    assert np.median(ratios_s2) > 1.25 and np.median(ratios_s1) > 1.1, (
        np.median(ratios_s2),
        np.median(ratios_s1),
    )


def test_farmland_land_cover_follows_the_parcels(tiles):
    """Crops or grass is decided per parcel: within one parcel every crop or grass pixel has one class,
    so land-cover edges on farmland are parcel edges."""
    from mmearth_data.sources.offline import C

    n = 0
    for req, r in tiles:
        st = r.extra["structure"]
        farm = np.isin(st["classes"], [C["crops"], C["grass"]]) & (st["parcel"] >= 0)
        for p in np.unique(st["parcel"][farm]):
            n += 1
            assert len(np.unique(st["classes"][farm & (st["parcel"] == p)])) == 1, req.tile_id
        assert 0.0 <= st["greenness"] <= 1.0
    assert n > 100


def test_rivers_run_downhill_on_the_dem(tiles):
    n = 0
    for _, r in tiles:
        path = r.extra["structure"]["river_path"]
        if len(path) < 10:
            continue
        rows, cols = np.array(path).T
        z = r.arrays["dem"][0][rows, cols]
        assert np.all(np.diff(z) <= 1e-3), "a river climbs"
        classes = r.extra["structure"]["classes"]
        assert (classes[rows, cols] == 0).mean() > 0.9  # the path is water
        n += 1
    assert n >= 3


def test_clouds_are_more_frequent_in_wet_months(tiles):
    wet = [r.extra["cloud_fraction"] for _, r in tiles if r.extra["structure"]["scene_month_precip_mm"] > 120]
    dry = [r.extra["cloud_fraction"] for _, r in tiles if r.extra["structure"]["scene_month_precip_mm"] < 20]
    assert len(wet) >= 5 and len(dry) >= 5
    assert np.mean(wet) > np.mean(dry) + 0.03 and np.mean(np.array(dry) > 0.01) < 0.3


def test_same_tile_and_seed_is_byte_identical(tiles):
    q, r = tiles[0]
    again = OfflineSource(seed=5).fetch([q], stored_modalities())[0]
    for k, v in r.arrays.items():
        assert v.tobytes() == again.arrays[k].tobytes(), k
    other = OfflineSource(seed=6).fetch([q], stored_modalities())[0]
    assert other.arrays["sentinel2"].tobytes() != r.arrays["sentinel2"].tobytes()


def test_a_modality_the_offline_world_does_not_model_is_delivered_absent():
    """A new registry entry: the offline source delivers it as fill with ``present`` false, and the
    store writer accepts the result (a default build does not crash on it)."""
    from mmearth_data.registry import Modality, stored_modalities
    from mmearth_data.sources.base import TileRequest
    from mmearth_data.sources.offline import OfflineSource
    from mmearth_data.store import payload_problem

    new = Modality(
        name="soil_moisture", kind="pixel", bands=("ssm",), dtype="float32", fill=float("nan"), units="m3/m3",
        resampling="bilinear", description="surface soil moisture", provider="test", license="test",
    )  # fmt: skip
    mods = (*stored_modalities(), new)
    res = OfflineSource(seed=1).fetch([TileRequest.at(48.0, 11.0, 2019, 32, biome=4, ecoregion=100)], mods)[0]
    assert res.present["soil_moisture"] is False and np.isnan(res.arrays["soil_moisture"]).all()
    assert res.arrays["soil_moisture"].shape == (1, 32, 32) and res.present["sentinel2"]
    assert payload_problem(res, mods, 32) is None


def test_crop_parcels_are_bare_or_closed_canopy_in_the_growing_season(tiles):
    # a crop's ground cover grows logistically: in season most parcels are bare soil or closed canopy,
    # few in between, and a closed canopy is as green as real farmland's (NDVI above 0.85, the median
    # full-canopy spectrum of a real May L2A scene); a linear cover would spread them evenly
    from mmearth_data.sources.offline import C

    per_parcel = []
    for _, r in tiles:
        st = r.extra["structure"]
        if st["greenness"] < 0.5 or r.s2_product != "L2A":
            continue
        ok = clear(r) & (st["parcel"] >= 0) & (st["classes"] == C["crops"])
        for i in np.unique(st["parcel"][ok]):
            if (ok & (st["parcel"] == i)).sum() >= 20:
                per_parcel.append(ndvi(r, ok & (st["parcel"] == i)))
    v = np.array(per_parcel)
    assert len(v) >= 50
    assert ((v > 0.45) & (v < 0.75)).mean() < 0.25, np.percentile(v, [10, 50, 90])
    assert (v > 0.85).mean() > 0.08 and (v < 0.4).mean() > 0.25, np.percentile(v, [10, 50, 90])


def test_task_landscapes_draw_field_sizes_independent_of_the_biome():
    """The pretraining world sizes parcels by biome; ``field_sizes`` (the downstream tasks' landscapes)
    draws them in the given range wherever the tile is, and changes nothing else about the call."""
    small = TileRequest.at(5.0, 20.0, 2019, 64, biome=1)
    large = TileRequest.at(45.0, -100.0, 2019, 64, biome=8)
    mods = stored_modalities(["sentinel2"])

    def sizes(src, t):
        reqs = [TileRequest.at(t.lat + 0.01 * i, t.lon, 2019, 64, biome=t.biome) for i in range(40)]
        return np.array([r.extra["structure"]["field_size_px"] for r in src.fetch(reqs, mods)])

    world = OfflineSource(seed=5)
    assert np.median(sizes(world, large)) > 2.5 * np.median(sizes(world, small))  # by biome
    task = OfflineSource(seed=5, field_sizes=(6.0, 34.0))
    a, b = sizes(task, small), sizes(task, large)
    assert a.min() >= 6 and b.max() <= 34
    assert abs(np.log(np.median(a) / np.median(b))) < 0.35  # the same draw in both biomes
    assert task.describe()["field_sizes"] == [6.0, 34.0] and "field_sizes" not in world.describe()
    with pytest.raises(ValueError, match="field_sizes"):
        OfflineSource(field_sizes=(20.0, 10.0))


def test_the_obscured_mask_holds_every_cloud_shadow_and_snow_pixel_the_scene_classification_shows(tiles):
    """``structure["obscured"]`` (which the downstream tasks read to leave hidden tiles out) covers
    every pixel that L2A's scene classification calls cloud shadow (3), cloud (8, 9) or snow (11)."""
    n_snow = n_l2a = 0
    for _, r in tiles:
        obscured = r.extra["structure"]["obscured"]
        assert obscured.dtype == bool and obscured.shape == (64, 64)
        assert obscured.mean() >= r.extra["cloud_fraction"]  # opaque cloud is hidden ground
        if r.s2_product != "L2A":
            continue
        scl = r.arrays["sentinel2_masks"][0]
        assert obscured[np.isin(scl, [3, 8, 9, 11])].all()
        n_l2a += 1
        n_snow += int((scl == 11).mean() > 0.5)
    assert n_l2a >= 50 and n_snow >= 3  # the check met snowy scenes
