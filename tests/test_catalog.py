"""STAC catalog: schema validity offline, round trip through stac-geoparquet, search, the CLI, the
server's refusal of traversal paths, and the browse page driven in headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from catalog.build import build_catalog, footprints, metadata_batches
from catalog.search import Query, SearchError, parse_biomes, search, to_rows
from catalog.serve import create_app
from catalog.validate import validate_catalog, validate_collection, validate_item
from flows.cli import main as cli
from mmearth_data.store import CorpusReader

from conftest import chromium, serving

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts"


@pytest.fixture(scope="module")
def catalog_dir(tiny_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("catalog") / "cat"
    build_catalog(tiny_store, out, batch_tiles=6, json_items=True)  # 6: several streamed batches
    return out


def test_collection_and_every_item_validate_offline(catalog_dir, tiny_store):
    n = validate_catalog(catalog_dir)
    reader = CorpusReader(tiny_store)
    assert n == int(np.asarray(reader.group["complete"][:]).sum())
    coll = json.loads((catalog_dir / "collection.json").read_text())
    assert coll["stac_version"] == "1.1.0"
    assert set(coll["summaries"]["mmearth:modality"]) == {m.name for m in reader.modalities}
    bands = {b["name"]: b for b in coll["assets"]["store"]["bands"]}
    assert bands["dem/elevation"]["statistics"]["mean"] == pytest.approx(
        reader.statistics["dem"]["elevation"]["mean"]
    )
    assert coll["assets"]["store"]["cube:variables"]["sentinel2"]["dimensions"] == [
        "tile", "sentinel2_band", "y", "x"
    ]  # fmt: skip
    w, s, e, n_ = coll["extent"]["spatial"]["bbox"][0]
    assert -180 <= w < e <= 180 and -90 <= s < n_ <= 90
    for f in (catalog_dir / "items").glob("*.json"):
        validate_item(json.loads(f.read_text()))
    broken = json.loads((catalog_dir / "collection.json").read_text())
    del broken["extent"]
    with pytest.raises(Exception, match="extent"):
        validate_collection(broken)


def test_items_read_back_with_stac_geoparquet_into_geopandas(catalog_dir, tiny_store):
    import geopandas as gpd
    import pyarrow.parquet as pq
    import stac_geoparquet
    from stac_geoparquet.arrow import stac_table_to_items

    table = pq.read_table(catalog_dir / "items.parquet")
    items = list(stac_table_to_items(table))
    gdf = stac_geoparquet.to_geodataframe(items, dtype_backend="pyarrow")
    assert isinstance(gdf, gpd.GeoDataFrame) and len(gdf) == len(items)
    reader = CorpusReader(tiny_store)
    tiles = reader.tiles().set_index("tile_id")
    for item, geom in zip(items, gdf.geometry, strict=True):
        row = tiles.loc[item["id"]]
        assert geom.contains(gpd.points_from_xy([row["lon"]], [row["lat"]])[0])
        assert item["properties"]["mmearth:index"] == int(
            np.flatnonzero(reader.tiles()["tile_id"] == item["id"])[0]
        )
        assert item["properties"]["proj:code"] == f"EPSG:{int(row['epsg'])}"
        assert item["properties"]["datetime"].startswith(str(row["s2_date"])[:10])


def test_footprints_follow_the_utm_transform(tiny_store):
    reader = CorpusReader(tiny_store)
    df = next(metadata_batches(reader, 8))
    rings, bboxes = footprints(df, reader.tile_size)
    side_deg = reader.tile_size * 10 / 111_320
    assert np.allclose(bboxes[:, 3] - bboxes[:, 1], side_deg, rtol=0.1)
    assert np.all((bboxes[:, 0] <= df["lon"]) & (df["lon"] <= bboxes[:, 2]))
    # one footprint: the plan's geometry of each tile is the catalog item's
    import geopandas as gpd

    from mmearth_data.artifacts import build_dir

    plan = gpd.read_parquet(f"{build_dir(tiny_store)}/plan.parquet").set_index("tile_id")
    for ring, tile_id in zip(rings, df["tile_id"], strict=True):
        assert np.array_equal(np.asarray(plan.geometry[tile_id].exterior.coords), ring)


def test_search_filters(catalog_dir, tiny_store):
    all_rows = to_rows(search(catalog_dir, Query()))
    tiles = CorpusReader(tiny_store).tiles()
    tiles = tiles[tiles["complete"]]
    assert len(all_rows) == len(tiles)
    biome = int(tiles["biome"].iloc[0])
    got = to_rows(search(catalog_dir, Query(biome=(biome,))))
    assert {r["id"] for r in got} == set(tiles.loc[tiles["biome"] == biome, "tile_id"])
    year = int(tiles["year"].iloc[0])
    got = to_rows(search(catalog_dir, Query(year=(year,), has=("sentinel1",))))
    want = tiles[(tiles["year"] == year) & tiles["sentinel1_present"]]
    assert {r["id"] for r in got} == set(want["tile_id"])
    got = to_rows(search(catalog_dir, Query(bbox=(-180.0, 0.0, 180.0, 90.0))))
    assert {r["id"] for r in got} == set(tiles.loc[tiles["lat"] > 0, "tile_id"])
    got = to_rows(search(catalog_dir, Query(max_cloud=5.0)))
    assert {r["id"] for r in got} == set(tiles.loc[tiles["cloud_fraction"] * 100 <= 5.0, "tile_id"])
    d0 = str(tiles["s2_date"].min())[:10]
    got = to_rows(search(catalog_dir, Query(datetime=(d0, d0))))
    assert got and all(r["datetime"] == d0 for r in got)
    assert len(to_rows(search(catalog_dir, Query(limit=3)))) == 3
    assert parse_biomes("desert,4") == (13, 4)
    with pytest.raises(SearchError, match="no modality"):
        search(catalog_dir, Query(has=("radar",)))


def test_cli_build_search_and_tile_list(tmp_path, tiny_store, capsys):
    out = tmp_path / "c"
    assert cli(["catalog", "build", "--store", tiny_store, "--out", str(out), "--quicklooks", "none"]) == 0
    assert not (out / "quicklooks").exists()
    lst = tmp_path / "tiles.txt"
    assert (
        cli(["catalog", "search", "--catalog", str(out), "--year", "2017-2018", "--write-tiles", str(lst)])
        == 0
    )
    ids = [x for x in lst.read_text().splitlines() if not x.startswith("#")]
    tiles = CorpusReader(tiny_store).tiles()
    assert set(ids) == set(tiles.loc[tiles["complete"] & tiles["year"].isin([2017, 2018]), "tile_id"])
    # a tile list of an earlier search is replaced; any other file is never overwritten
    assert cli(["catalog", "search", "--catalog", str(out), "--year", "2017", "--write-tiles", str(lst)]) == 0
    other = tmp_path / "zarr.json"
    other.write_text('{"zarr_format": 3}')
    capsys.readouterr()
    assert cli(["catalog", "search", "--catalog", str(out), "--write-tiles", str(other)]) == 2
    assert "not a tile list" in capsys.readouterr().err and other.read_text() == '{"zarr_format": 3}'
    capsys.readouterr()
    assert cli(["catalog", "search", "--catalog", str(out), "--limit", "2", "--format", "geojson"]) == 0
    fc = json.loads(capsys.readouterr().out)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2
    assert cli(["catalog", "search", "--catalog", str(out), "--bbox", "10,0,5,1"]) == 2
    assert "west <= east" in capsys.readouterr().err
    assert cli(["catalog", "search", "--catalog", str(tmp_path / "none")]) == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert cli(["catalog", "build", "--store", tiny_store, "--out", str(tmp_path / "busy")]) == 2
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


TRAVERSALS = [
    "/../collection.json",
    "/quicklooks/../collection.json",
    "/quicklooks/..%2Fcollection.json",
    "/quicklooks/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/quicklooks/..%252F..%252Fetc%252Fpasswd",
    "/api/tiles/..%2F..%2Fetc%2Fpasswd",
    "/api/tiles/%2e%2e",
    "/static/../../etc/passwd",
    "/collection.json",
    "/items.parquet",
    "/quicklooks/",
]


def test_server_refuses_traversal_and_unknown_tiles(catalog_dir):
    client = TestClient(create_app(catalog_dir))
    first = client.get("/api/tiles?limit=1").json()["tiles"][0]["id"]
    assert client.get(f"/quicklooks/{first}.png").headers["content-type"] == "image/png"
    for path in TRAVERSALS:
        r = client.get(path)
        assert r.status_code == 404, path
        assert b"root:" not in r.content and b"stac_version" not in r.content, path
    for tid in ("G1850_1U_1R", "G1850_1U_1R.png", "x" * 300, first + "%00", first.lower()):
        assert client.get(f"/api/tiles/{tid}").status_code == 404
        assert client.get(f"/quicklooks/{tid}.png").status_code == 404
    assert client.get("/api/tiles?bbox=1,2,3").status_code == 400


def test_server_refuses_other_host_headers(catalog_dir):
    client = TestClient(
        create_app(catalog_dir, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1"
    )
    assert client.get("/api/tiles?limit=1").status_code == 200
    # a page on another site whose DNS name was rebound to 127.0.0.1 sends its own name as Host
    r = client.get("/api/tiles?limit=1", headers={"host": "attacker.example"})
    assert r.status_code == 400 and b"tiles" not in r.content
    head, get = client.head("/"), client.get("/")  # HEAD answers as GET, without the body
    assert (
        head.status_code == 200
        and head.content == b""
        and head.headers["content-type"].startswith("text/html")
    )
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))


def test_quicklook_drawn_from_the_store_when_no_file(tmp_path, tiny_store):
    out = tmp_path / "nq"
    build_catalog(tiny_store, out, quicklooks="none")
    client = TestClient(create_app(out))
    tid = client.get("/api/tiles?limit=1").json()["tiles"][0]["id"]
    r = client.get(f"/quicklooks/{tid}.png")
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    detail = client.get(f"/api/tiles/{tid}").json()
    assert len(detail["values"]["era5"]) == 12
    assert detail["provenance"]["source"] == "offline"


@pytest.fixture(scope="module")
def live_server(catalog_dir):
    with serving(create_app(catalog_dir)) as url:
        yield url


def test_browse_page_in_headless_chromium(live_server, catalog_dir, tiny_store):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    drv = chromium()
    try:
        wait = WebDriverWait(drv, 30)
        drv.get(live_server + "/")
        tiles = CorpusReader(tiny_store).tiles()
        n_all = str(int(tiles["complete"].sum()))
        wait.until(lambda d: d.find_elements(By.ID, "count"))
        wait.until(lambda d: d.find_element(By.ID, "count").get_attribute("data-count") == n_all)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "img.density"))
        biome = int(tiles.loc[tiles["complete"], "biome"].value_counts().index[0])
        Select(drv.find_element(By.ID, "biome")).select_by_value(str(biome))
        drv.find_element(By.ID, "apply").click()
        want = str(int((tiles["complete"] & (tiles["biome"] == biome)).sum()))
        wait.until(lambda d: d.find_element(By.ID, "count").get_attribute("data-count") == want)
        target = tiles[tiles["complete"] & (tiles["biome"] == biome)].iloc[0]
        tid = target["tile_id"]
        drv.execute_script(f"window.mmMap.setView([{target['lat']}, {target['lon']}], 14)")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"path.tile[data-id='{tid}']"))
        shapes = drv.find_elements(By.CSS_SELECTOR, "path.tile")
        assert {s.get_attribute("data-biome") for s in shapes} == {str(biome)}
        shape = drv.find_element(By.CSS_SELECTOR, f"path.tile[data-id='{tid}']")
        drv.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", shape)
        wait.until(ec.text_to_be_present_in_element((By.ID, "tile-id"), tid))
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('quicklook'); return i && i.complete && i.naturalWidth > 0;"
        ))  # fmt: skip
        width = drv.execute_script("return document.getElementById('quicklook').naturalWidth;")
        assert width > 5 * CorpusReader(tiny_store).tile_size
        values = drv.find_element(By.ID, "values").text
        assert "era5" in values and "biome" in values and "offline" in values
        assert "S2 scene" in values and "not recorded by this source" in values  # offline: no scene ids
        assert "tree_cover" in drv.find_element(By.ID, "detail").text  # WorldCover legend
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "catalog_page.png"
        drv.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
    finally:
        drv.quit()


def _other_address() -> str | None:
    """This machine's address on its outward interface (a UDP socket's own address; nothing is sent)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_serve_binds_localhost_by_default(catalog_dir):
    """The real server, started as a user starts it: it answers on 127.0.0.1 and refuses connections
    on the machine's other address."""
    import socket
    import subprocess
    import sys
    import time

    from conftest import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "catalog.cli", "serve", "--catalog", str(catalog_dir), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the server did not start within 90 s"
                time.sleep(0.3)
        other = _other_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_serve_command_refuses_other_host_headers(catalog_dir, monkeypatch):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert cli(["catalog", "serve", "--catalog", str(catalog_dir), "--port", "8799"]) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8799
    client = TestClient(served["app"], base_url="http://127.0.0.1:8799")
    assert client.get("/api/tiles?limit=1").status_code == 200
    assert client.get("/api/tiles?limit=1", headers={"host": "localhost:8799"}).status_code == 200
    assert client.get("/api/tiles?limit=1", headers={"host": "attacker.example"}).status_code == 400


def test_a_catalog_build_that_failed_part_way_is_redone(tmp_path, tiny_store, monkeypatch):
    import catalog.build as cb

    out = tmp_path / "cat"

    def boom(reader, out_dir):
        raise OSError("disk full")

    monkeypatch.setattr(cb, "write_quicklooks", boom)
    with pytest.raises(OSError, match="disk full"):
        cb.build_catalog(tiny_store, out, quicklooks="all")
    assert (out / "items.parquet").exists() and not (out / "collection.json").exists()
    monkeypatch.undo()
    res = cb.build_catalog(tiny_store, out, quicklooks="none")  # not blocked by its own leftovers
    assert Path(res["collection"]).exists() and not (out / cb.IN_PROGRESS).exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(cb.CatalogError, match="holds other files"):
        cb.build_catalog(tiny_store, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_a_damaged_chunk_stops_the_catalog_with_a_message_and_the_next_build_succeeds(
    tiny_store, tmp_path, capsys
):
    store = str(tmp_path / "s.zarr")
    shutil.copytree(tiny_store, store)
    shutil.copytree(tiny_store.replace(".zarr", ".build"), str(tmp_path / "s.build"))
    shard = sorted(p for p in (Path(store) / "sentinel2" / "c").rglob("*") if p.is_file())[1]
    raw = bytearray(shard.read_bytes())
    raw[60] ^= 0xFF
    shard.write_bytes(bytes(raw))
    out = str(tmp_path / "cat")
    capsys.readouterr()
    assert cli(["catalog", "build", "--store", store, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "array 'sentinel2'" in err and "mmearth repair" in err and "Traceback" not in err
    assert cli(["repair", "--store", store]) == 0
    assert cli(["catalog", "build", "--store", store, "--out", out]) == 0
    assert validate_catalog(out) == CorpusReader(store).n_tiles == 16
