"""The browse page at scale: a catalog of the small store's 56 real tiles plus 100,000 synthetic items
(``bench/catalog.py``'s generator), the page's queries checked against a plain reading of the items
table, the server's refusals, and the page driven in headless Chromium from the world to one tile."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from fastapi.testclient import TestClient

from catalog.browse import BrowseIndex, Filters
from catalog.build import build_catalog, metadata_batches, write_items
from catalog.serve import create_app
from catalog.vendor import LIBRARIES, VendorError, install, installed, integrity_of
from mmearth_data.sampling import SamplingError, parse_years
from mmearth_data.store import CorpusReader

from conftest import chromium, serving

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts"
N_SYNTHETIC = 100_000


def _bench_catalog():
    spec = importlib.util.spec_from_file_location("bench_catalog", REPO / "bench" / "catalog.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def big_catalog(small_store, tmp_path_factory) -> Path:
    """The small store's real catalog (quicklooks, collection) whose items table also holds 100,000
    synthetic items (their store indices lie past the store: no detail)."""
    out = tmp_path_factory.mktemp("big") / "cat"
    build_catalog(small_store, out)
    reader = CorpusReader(small_store)
    mods = [m.name for m in reader.modalities]
    real = list(metadata_batches(reader, 1000))
    fake = _bench_catalog().synthetic(N_SYNTHETIC, 50_000, seed=3, tile_size=reader.tile_size,
                                      first_index=reader.n_tiles)  # fmt: skip
    (out / "items.parquet").unlink()
    items = iter(real + list(fake))
    write_items(items, out / "items.parquet", reader.tile_size, "small", "../small.zarr", mods, False)
    return out


@pytest.fixture(scope="module")
def table(big_catalog):
    return ds.dataset(big_catalog / "items.parquet").to_table().to_pandas()


def _expected(table, bbox=None, biome=None, years=None, has=None, max_cloud=None, split=None):
    lon = (table["bbox"].map(lambda b: b["xmin"]) + table["bbox"].map(lambda b: b["xmax"])) / 2
    lat = (table["bbox"].map(lambda b: b["ymin"]) + table["bbox"].map(lambda b: b["ymax"])) / 2
    m = np.ones(len(table), bool)
    if bbox:
        m &= (lon >= bbox[0]) & (lon <= bbox[2]) & (lat >= bbox[1]) & (lat <= bbox[3])
    if biome:
        m &= table["mmearth:biome"].isin(biome)
    if years:
        m &= table["mmearth:year"].isin(years)
    if has:
        m &= table[f"mmearth:has_{has}"].astype(bool)
    if max_cloud is not None:
        m &= table["eo:cloud_cover"] <= max_cloud
    if split:
        m &= table["mmearth:split"] == split
    return table[np.asarray(m)]


def test_counts_table_and_tile_list_equal_a_plain_reading_of_the_items(big_catalog, table):
    idx = BrowseIndex(big_catalog)
    assert idx.n == N_SYNTHETIC + 56
    cases = [
        {},
        {"bbox": "5,45,15,55", "biome": "4"},
        {"bbox": "-10,35,30,60", "biome": "4,5", "year": "2018-2019", "has": "sentinel1", "max_cloud": "10"},
        {"year": "2017,2020", "split": "val"},
    ]
    for params in cases:
        f = Filters.parse(params, idx.modalities)
        want = _expected(table, bbox=f.bbox, biome=f.biome, years=f.year, has=(f.has or [None])[0],
                         max_cloud=f.max_cloud, split=f.split)  # fmt: skip
        s = idx.summary(f)
        assert s["count"] == len(want), params
        crosstab = want.groupby(["mmearth:biome", "mmearth:year"]).size()
        assert s["table"] == {f"{b}/{y}": int(n) for (b, y), n in crosstab.items()}, params
        assert sorted(idx.tile_ids(f)) == sorted(want["id"]), params
        assert int(idx.density(f, 64, 32).sum()) == len(want), params


def test_footprints_are_the_items_geometry(big_catalog, table):
    import shapely

    idx = BrowseIndex(big_catalog)
    f = Filters.parse({"bbox": "0,40,20,50"}, idx.modalities)
    got = idx.footprints(f)
    assert 0 < len(got["features"]) <= 5000
    geom = dict(zip(table["id"], table["geometry"], strict=True))
    for feat in got["features"][:50]:
        mine = shapely.geometry.shape(feat["geometry"])
        theirs = shapely.from_wkb(geom[feat["id"]])
        assert mine.hausdorff_distance(theirs) < 2e-6  # degrees: both rounded near 0.1 m
    assert idx.footprints(Filters.parse({}, idx.modalities))["too_many"] == N_SYNTHETIC + 56


def test_years_are_taken_as_ranges_and_lists():
    assert parse_years("2017-2020") == (2017, 2018, 2019, 2020)
    assert parse_years("2017,2019") == (2017, 2019) and parse_years("2018") == (2018,)
    with pytest.raises(SamplingError, match="use a range like 2017-2020"):
        parse_years("2020-2017")
    assert parse_years("2017-2018,2020") == (2017, 2018, 2020)


@pytest.mark.parametrize(
    "query, message",
    [
        ("bbox=1,2,3", "west,south,east,north"),
        ("year=twenty", "use a range like 2017-2020"),
        ("has=radar", "not a modality of this catalog"),
        ("max_cloud=200", "0-100"),
        ("split=holdout", "one of train, val, test"),
        ("biome=forest", "matches"),
        ("path=../../etc/passwd", "unknown parameters path"),
        ("datetime=2019-13-45", "is not a date"),
    ],
)
def test_bad_query_values_get_400_with_the_fix(big_catalog, query, message):
    client = TestClient(create_app(big_catalog))
    for route in ("summary", "footprints", "tiles.txt", "density.png"):
        r = client.get(f"/api/browse/{route}?{query}")
        assert r.status_code == 400 and message in r.json()["detail"], (route, r.text)
    assert client.get("/api/browse/density.png?w=100000&h=10").status_code == 422


def test_server_is_read_only_and_serves_only_named_files(big_catalog):
    client = TestClient(create_app(big_catalog))
    for path in ("/vendor/leaflet/../../serve.py", "/vendor/leaflet/%2e%2e/%2e%2e/serve.py",
                 "/vendor/leaflet/x.js", "/vendor/leaflet/leaflet-src.js"):  # fmt: skip
        assert client.get(path).status_code == 404, path
    for method in ("post", "put", "delete"):
        assert getattr(client, method)("/api/browse/summary").status_code == 405
    synthetic = ds.dataset(big_catalog / "items.parquet").to_table(columns=["id"]).column("id")[-1].as_py()
    assert client.get(f"/api/tiles/{synthetic}").status_code == 404  # past the store: no detail
    text = client.get("/api/browse/tiles.txt?bbox=5,45,15,55&biome=4").text
    assert text.endswith("\n") and all(line.startswith("G") for line in text.splitlines())


def test_the_map_library_is_checked_against_its_pinned_hash(tmp_path):
    lib = LIBRARIES["leaflet"]
    bad = tmp_path / "leaflet-1.9.4.tgz"
    bad.write_bytes(b"not the release")
    with pytest.raises(VendorError, match="differs from the pinned"):
        install("leaflet", tarball=bad)
    assert (
        integrity_of(b"")
        == "sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg=="
    )
    if not installed():
        pytest.skip("the map library is not installed (make install fetches it with npm)")
    v = (REPO / "catalog" / "static" / "vendor" / "leaflet" / "VERSION.json").read_text()
    assert lib["version"] in v and lib["integrity"] in v


@pytest.fixture(scope="module")
def live(big_catalog):
    with serving(create_app(big_catalog)) as url:
        yield url


def test_page_from_the_world_to_one_tile(live, big_catalog, small_store, table):
    """World view: the density layer and the exact count of 100,056; zoom to a real tile: its footprint,
    click it for its quicklook and values; filter by its biome: the count is exact; the download link
    gives the selection's tile list; the URL holds the view and the filters."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    tiles = CorpusReader(small_store).tiles()
    target = tiles.iloc[5]
    drv = chromium()
    try:
        wait = WebDriverWait(drv, 30)
        drv.get(live + "/")
        wait.until(lambda d: d.find_elements(By.ID, "count"))
        wait.until(
            lambda d: d.find_element(By.ID, "count").get_attribute("data-count") == str(N_SYNTHETIC + 56)
        )
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "img.density"))
        assert "Leaflet 1.9.4" in drv.find_element(By.ID, "credit").text.replace("leaflet", "Leaflet")
        ARTIFACTS.mkdir(exist_ok=True)
        drv.save_screenshot(str(ARTIFACTS / "browse_world.png"))
        drv.execute_script(f"window.mmMap.setView([{target['lat']}, {target['lon']}], 15)")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"path.tile[data-id='{target['tile_id']}']"))
        shape = drv.find_element(By.CSS_SELECTOR, f"path.tile[data-id='{target['tile_id']}']")
        drv.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", shape)
        wait.until(ec.text_to_be_present_in_element((By.ID, "tile-id"), target["tile_id"]))
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('quicklook'); return i && i.complete && i.naturalWidth > 0;"
        ))  # fmt: skip
        assert "era5" in drv.find_element(By.ID, "values").text
        drv.save_screenshot(str(ARTIFACTS / "browse_tile.png"))
        assert (ARTIFACTS / "browse_tile.png").stat().st_size > 20_000
        # filter: the tile's biome, at world zoom again
        Select(drv.find_element(By.ID, "biome")).select_by_value(str(int(target["biome"])))
        drv.execute_script("window.mmMap.setView([20, 0], 1)")
        drv.find_element(By.ID, "apply").click()
        bbox = [float(v) for v in drv.execute_script(
            "const b = window.mmMap.getBounds(); "
            "return [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()]"
        )]  # fmt: skip
        bbox = [max(bbox[0], -180), max(bbox[1], -90), min(bbox[2], 180), min(bbox[3], 90)]
        want = _expected(table, bbox=bbox, biome=[int(target["biome"])])
        wait.until(lambda d: d.find_element(By.ID, "count").get_attribute("data-count") == str(len(want)))
        assert f"biome={int(target['biome'])}" in drv.current_url
        href = drv.find_element(By.ID, "download").get_attribute("href")
        listed = drv.execute_script("return await (await fetch(arguments[0])).text()", href).split()
        assert sorted(listed) == sorted(want["id"])
    finally:
        drv.quit()
