"""The store contract, on a small store built by the same functions the flow runs."""

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr
from pyproj import Transformer

from mmearth_data.build import BuildConfig, build_in_process
from mmearth_data.registry import get, stored_modalities
from mmearth_data.store import CorpusReader, StoreError, StoreWriter, codec_names, open_corpus, strings
from mmearth_data.validate import validate_store

from conftest import SMALL


def test_small_store_is_valid(small_store):
    report = validate_store(small_store)
    assert report["valid"], report["problems"]
    s = report["summary"]
    assert s["complete"] == 56
    counts = [c for row in s["biome_x_year"].values() for c in row.values()]
    assert counts == [1] * 56


def test_xarray_opens_it_with_named_dims_and_bands(small_store):
    ds = xr.open_zarr(small_store, consolidated=False)
    assert ds["sentinel2"].dims == ("tile", "sentinel2_band", "y", "x")
    assert ds["sentinel2"].shape == (56, 13, 64, 64)
    assert list(ds["sentinel2_band"].values)[7:9] == ["B8", "B8A"]
    assert ds["biome"].dims == ("tile",)
    assert np.issubdtype(ds["s2_date"].dtype, np.datetime64)
    assert set(ds["s2_product"].values.tolist()) <= {"L1C", "L2A"}


def inner_codecs(array) -> list[str]:
    """Codec names inside the sharding codec, Blosc with its compressor (``blosc:zstd``)."""
    assert array.metadata.to_dict()["codecs"][0]["name"] == "sharding_indexed"
    blosc = [c.cname.value for c in array.metadata.codecs[0].codecs if type(c).__name__ == "BloscCodec"]
    return [f"blosc:{blosc[0]}" if n == "blosc" else n for n in codec_names(array)]


def test_layout_chunks_whole_tiles_in_sharded_compressed_arrays(small_store):
    g = zarr.open_group(small_store, mode="r")
    a = g["sentinel2"]
    assert a.chunks == (4, 13, 64, 64) and a.shards == (16, 13, 64, 64)
    # compact (default): the registry's codec per modality (Pcodec for the DEM, Blosc/Zstd elsewhere,
    # Sentinel-2 included); every chunk ends in a CRC32C
    assert inner_codecs(g["dem"]) == ["numcodecs.pcodec", "crc32c"]
    assert inner_codecs(g["sentinel2"]) == ["bytes", "blosc:zstd", "crc32c"]
    assert g.attrs["compression"]["codecs"]["sentinel2"] == "blosc"
    for name in ("sentinel1", "sentinel2_masks", "canopy_height", "era5", "biome", "lat", "complete"):
        assert inner_codecs(g[name]) == ["bytes", "blosc:zstd", "crc32c"], name
    assert g.attrs["compression"]["mode"] == "compact"
    assert g.attrs["compression"]["codecs"]["dem"] == "pcodec"
    attrs = g.attrs
    assert attrs["schema_version"] == "1.2" and attrs["tile_size"] == 64
    assert "sentinel2" in attrs["registry"] and attrs["build"]["source"]["source"] == "offline"


def test_statistics_are_no_data_aware_and_split_by_level(small_store):
    r = CorpusReader(small_store)
    st = r.statistics
    assert set(st["sentinel2"]) == {"L1C", "L2A"}
    l1c, l2a = st["sentinel2"]["L1C"], st["sentinel2"]["L2A"]
    assert l2a["B10"]["count"] == 0 and l1c["B10"]["count"] > 0  # B10 is fill in L2A
    s2 = np.asarray(r.group["sentinel2"][:]).astype(np.float64)
    prod = r.tiles()["s2_product"].to_numpy()
    b4 = s2[prod == "L2A", 3]
    assert np.isclose(l2a["B4"]["mean"], b4[b4 != 0].mean())
    assert np.isclose(l2a["B4"]["std"], b4[b4 != 0].std(), rtol=1e-6)
    s1 = st["sentinel1"]["VV_asc"]
    assert np.isfinite(s1["mean"]) and s1["min"] < s1["mean"] < s1["max"]
    assert sum(st["dynamic_world"]["class_counts"].values()) == 56 * 64 * 64


def test_rioxarray_writes_a_geotiff_whose_footprint_holds_the_tile(small_store, tmp_path):
    r = open_corpus(small_store)
    meta = r.tiles()
    for i in (0, 17, 55):
        da = r.tile_dataarray(i, "sentinel2")
        path = tmp_path / f"tile{i}.tif"
        da.rio.to_raster(path)
        with rasterio.open(path) as src:
            assert src.count == 13 and src.crs.to_epsg() == int(meta.epsg[i])
            x, y = Transformer.from_crs(4326, src.crs, always_xy=True).transform(meta.lon[i], meta.lat[i])
            b = src.bounds
            assert b.left < x < b.right and b.bottom < y < b.top
            np.testing.assert_array_equal(src.read(), np.asarray(r.group["sentinel2"][i]))


def test_same_seed_gives_byte_identical_store(small_store, tmp_path):
    other = str(tmp_path / "again.zarr")
    build_in_process(BuildConfig(store=other, **SMALL))
    a, b = zarr.open_group(small_store, mode="r"), zarr.open_group(other, mode="r")
    for m in stored_modalities():
        assert np.asarray(a[m.name][:]).tobytes() == np.asarray(b[m.name][:]).tobytes(), m.name
    assert a.attrs["statistics"] == b.attrs["statistics"]


def test_incomplete_shard_is_redone_and_ends_identical(small_store, tmp_path):
    import shutil

    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(small_store, copy)
    w = StoreWriter(copy)
    assert w.incomplete_shards() == []
    before = np.asarray(w.group["sentinel2"][16:32]).copy()
    w.group["sentinel2"][16:20] = 0  # a half-written shard ...
    w.group["complete"][16:20] = False  # ... whose tiles were never marked complete
    assert w.incomplete_shards() == [1]
    cfg = BuildConfig(store=copy, **SMALL)
    summary = build_in_process(cfg)
    assert summary["shards_exported"] == 1 and summary["complete"] == 56
    np.testing.assert_array_equal(np.asarray(w.group["sentinel2"][16:32]), before)


def test_reader_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a corpus store"):
        CorpusReader(str(tmp_path))
    report = validate_store(str(tmp_path / "nothing.zarr"))
    assert not report["valid"] and "nothing there" in report["problems"][0]


def test_validate_reports_broken_stores(small_store, tmp_path):
    import shutil

    copy = str(tmp_path / "broken.zarr")
    shutil.copytree(small_store, copy)
    g = zarr.open_group(copy, mode="r+")
    g["complete"][0:2] = False
    attrs = dict(g.attrs)
    del attrs["statistics"]["dem"]
    g.attrs.put(attrs)
    report = validate_store(copy)
    assert not report["valid"]
    text = " ".join(report["problems"])
    assert "2 of 56 tiles are not complete" in text and "statistics for dem missing" in text


def test_portable_store_uses_core_codecs_and_holds_the_same_arrays(tmp_path):
    opts = dict(n_tiles=8, tile_size=32, shard_tiles=8, chunk_tiles=4, years=(2020,), seed=3)
    compact, portable = str(tmp_path / "c.zarr"), str(tmp_path / "p.zarr")
    build_in_process(BuildConfig(store=compact, **opts))
    build_in_process(BuildConfig(store=portable, compression="portable", **opts))
    a, b = zarr.open_group(compact, mode="r"), zarr.open_group(portable, mode="r")
    assert b.attrs["compression"]["mode"] == "portable"
    for m in stored_modalities():
        assert inner_codecs(b[m.name]) == ["bytes", "blosc:zstd", "crc32c"], m.name
        assert np.asarray(a[m.name][:]).tobytes() == np.asarray(b[m.name][:]).tobytes(), m.name
    assert validate_store(portable)["valid"]


def test_store_on_an_fsspec_url():
    url = "memory://corpus/tiny.zarr"
    summary = build_in_process(
        BuildConfig(store=url, n_tiles=8, tile_size=32, shard_tiles=8, chunk_tiles=4, years=(2020,))
    )
    assert summary["complete"] == 8
    r = CorpusReader(url)
    assert r.read(["sentinel2"], 0, 8)["sentinel2"].shape == (8, 13, 32, 32)
    assert validate_store(url)["valid"]


def test_validate_refuses_a_lossy_codec(small_store, tmp_path):
    import json
    import shutil

    copy = tmp_path / "lossy.zarr"
    shutil.copytree(small_store, copy)
    meta_path = copy / "dem" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    inner.insert(0, {"name": "numcodecs.bitround", "configuration": {"keepbits": 10}})
    meta_path.write_text(json.dumps(meta))
    report = validate_store(str(copy))
    assert not report["valid"]
    assert any("dem: codec numcodecs.bitround is not lossless" in p for p in report["problems"])
    assert validate_store(small_store)["summary"]["codecs"]["dem"] == ["numcodecs.pcodec"]


def _shard_file(store: str, array: str, shard: int) -> Path:
    """The file of shard ``shard`` of a per-tile array (its first chunk key along every other axis)."""
    files = sorted((Path(store) / array / "c").rglob("*"))
    hits = [
        f for f in files if f.is_file() and f.relative_to(Path(store) / array / "c").parts[0] == str(shard)
    ]
    assert hits, (array, shard)
    return hits[0]


def test_deep_validation_names_damaged_tiles_and_repair_restores_the_store(small_store, tmp_path, capsys):
    import shutil

    from flows.cli import main as cli_main
    from model.data import DataError, StreamingCorpus

    copy = str(tmp_path / "damaged.zarr")
    shutil.copytree(small_store, copy)
    ids = strings(zarr.open_group(copy, mode="r")["tile_id"][:])
    assert cli_main(["validate", "--store", copy, "--deep"]) == 0
    # one flipped byte in the first chunk (tiles 16..19) of Sentinel-2's shard 1
    f = _shard_file(copy, "sentinel2", 1)
    raw = bytearray(f.read_bytes())
    raw[40] ^= 0xFF
    f.write_bytes(bytes(raw))
    # Sentinel-1's shard 2 deleted (reads back as fill); the DEM's shard 3 cut short
    _shard_file(copy, "sentinel1", 2).unlink()
    dem = _shard_file(copy, "dem", 3)
    dem.write_bytes(dem.read_bytes()[: len(dem.read_bytes()) // 2])
    capsys.readouterr()
    assert cli_main(["validate", "--store", copy, "--deep", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    bad = {(d["array"], d["index"]) for d in report["damaged"]}
    assert {("sentinel2", i) for i in range(16, 20)} <= bad
    assert not any(a == "sentinel2" and i >= 20 for a, i in bad)  # only the flipped chunk's tiles
    present1 = np.asarray(zarr.open_group(small_store, mode="r")["sentinel1_present"][32:48])
    assert {("sentinel1", 32 + i) for i in np.flatnonzero(present1)} <= bad
    assert {("dem", i) for i in range(48, 56)} <= bad
    text = " ".join(report["problems"])
    assert ids[16] in text and "sentinel2: 4 damaged tiles" in text and "mmearth repair" in text
    # the loader names the array, the tiles it read (one shard) and the store instead of a raw codec error
    ds = StreamingCorpus(copy, [get("sentinel2")], 32, split=None, epochs=1, shuffle_buffer=1)
    with pytest.raises(DataError, match=r"array 'sentinel2', tiles 16\.\.31 .*mmearth repair"):
        list(ds)
    assert cli_main(["repair", "--store", copy]) == 0
    assert "re-exported" in capsys.readouterr().out
    assert cli_main(["validate", "--store", copy, "--deep"]) == 0
    a, b = zarr.open_group(small_store, mode="r"), zarr.open_group(copy, mode="r")
    for name in a.array_keys():
        x, y = np.asarray(a[name][:]), np.asarray(b[name][:])
        if x.dtype.kind in "OTU":  # strings: compare values, not buffers
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            assert x.tobytes() == y.tobytes(), name
    assert a.attrs["statistics"] == b.attrs["statistics"]
    assert cli_main(["repair", "--store", copy]) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_a_second_build_of_the_same_store_stops_with_a_message(tmp_path, capsys):
    import subprocess
    import sys

    from flows.cli import main as cli_main

    store = str(tmp_path / "locked.zarr")
    hold = (
        "import sys, time; from mmearth_data.build import acquire_build_lock; "
        f"acquire_build_lock({store!r}); print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = cli_main(["build", "--store", store, "--tiles", "8", "--tile-size", "32", "--no-progress"])
        assert code == 2
        err = capsys.readouterr().err
        assert f"another build (pid {holder.pid})" in err and "nothing was changed" in err
        assert not Path(store).exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its holder, however it ends (here SIGKILL)
    again = subprocess.run(
        [sys.executable, "-c", hold.replace("time.sleep(120)", "pass")], capture_output=True, text=True
    )
    assert again.returncode == 0 and again.stdout.strip() == "held"


def test_a_build_killed_while_creating_the_store_or_its_plots_resumes(tmp_path, monkeypatch):
    import mmearth_data.build as b
    from mmearth_data.build import build_dir

    store = str(tmp_path / "s.zarr")
    opts = dict(n_tiles=8, tile_size=32, shard_tiles=8, chunk_tiles=4, years=(2020,), seed=3)
    real = b.create_store

    def killed(url, **kw):  # the process dies part-way through creating the arrays
        zarr.open_group(url, mode="w-", zarr_format=3).create_array("sentinel2", shape=(8,), dtype="uint8")
        raise KeyboardInterrupt

    monkeypatch.setattr(b, "create_store", killed)
    with pytest.raises(KeyboardInterrupt):
        build_in_process(BuildConfig(store=store, **opts))
    assert not Path(store).exists()  # no half-made store at the path
    assert list(tmp_path.glob("s.zarr.creating-*"))
    monkeypatch.setattr(b, "create_store", real)
    assert build_in_process(BuildConfig(store=store, **opts))["complete"] == 8
    assert not list(tmp_path.glob("s.zarr.creating-*")) and validate_store(store)["valid"]
    plots = Path(build_dir(store))
    (plots / "strata.png").unlink()  # killed between writing the plan and its plots
    build_in_process(BuildConfig(store=store, **opts))
    assert (plots / "strata.png").exists() and (plots / "sample_map.png").exists()


def test_injected_faults_are_retried_backfilled_or_rejected_and_nothing_is_lost(tmp_path):
    from collections import Counter

    from mmearth_data.build import TILE_RETRIES, build_dir
    from mmearth_data.sources import make_source
    from mmearth_data.sources.base import TileRequest
    from mmearth_data.store import payload_problem

    store = str(tmp_path / "f.zarr")
    opts = dict(n_tiles=64, tile_size=32, shard_tiles=16, chunk_tiles=4, years=(2019, 2020), seed=5)
    faults = "transient=0.3,permanent=0.05,corrupt=0.1,seed=2"
    summary = build_in_process(BuildConfig(store=store, source_options={"faults": faults}, **opts))
    assert summary["complete"] == 64 and validate_store(store, deep=True)["valid"]
    failures = json.loads((Path(build_dir(store)) / "failures.json").read_text())
    kinds = Counter(f["reason"].split(":")[0] for f in failures)
    assert kinds["transient fault (injected)"] > 10 and kinds["permanent fault (injected)"] >= 1
    assert kinds["corrupt payload rejected"] >= 3
    per_tile = Counter(f["tile_id"] for f in failures if f["reason"].startswith("transient"))
    assert max(per_tile.values()) <= TILE_RETRIES + 1  # retried at most TILE_RETRIES times, then moved on
    assert all(f["action"] in ("retried", "backfilled") for f in failures)
    # no silent drop: a permanently failed or rejected tile is never in the store, and its slot is filled
    written = set(strings(zarr.open_group(store, mode="r")["tile_id"][:]))
    gone = {f["tile_id"] for f in failures if f["action"] == "backfilled"}
    assert not gone & written and summary["backfilled"] >= 1
    # every corruption the injector makes is caught at the store boundary
    from mmearth_data.registry import stored_modalities
    from mmearth_data.sources.faults import CORRUPTIONS, corrupt

    mods = stored_modalities()
    t = TileRequest.at(47.0, 8.0, 2020, 32, biome=4, ecoregion=654)
    good = make_source("offline", seed=5).fetch([t], mods)[0]
    assert payload_problem(good, mods, 32) is None
    for kind in CORRUPTIONS:
        assert payload_problem(corrupt(good, mods, kind), mods, 32) is not None, kind


def _all_files(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_damaged_or_missing_metadata_named_by_validate_restored_by_repair(small_store, tmp_path, capsys):
    import shutil

    from flows.cli import main as cli_main

    copy = str(tmp_path / "meta.zarr")
    shutil.copytree(small_store, copy)
    shutil.copytree(small_store.replace(".zarr", ".build"), str(tmp_path / "meta.build"))
    before = _all_files(copy)
    ids = strings(zarr.open_group(copy, mode="r")["tile_id"][:])
    (Path(copy) / "sentinel1" / "zarr.json").write_text('{"zarr_format": 3, "node_ty')  # cut short
    (Path(copy) / "dem" / "zarr.json").unlink()
    root = Path(copy) / "zarr.json"
    root.write_bytes(root.read_bytes().replace(b'"n_tiles"', b'"n_tiles\x00'))
    capsys.readouterr()
    assert cli_main(["validate", "--store", copy, "--deep", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    arrays = {d["array"] for d in report["damaged"]}
    assert arrays == {"sentinel1", "dem", "zarr.json (root: every array)"}
    assert {d["index"] for d in report["damaged"] if d["array"] == "dem"} == set(range(len(ids)))
    text = " ".join(report["problems"])
    assert "dem/zarr.json missing" in text and "sentinel1/zarr.json JSONDecodeError" in text
    assert ids[0] in text and "mmearth repair" in text
    with pytest.raises(StoreError, match=r"zarr\.json cannot be read .*mmearth repair --store"):
        CorpusReader(copy)
    assert cli_main(["repair", "--store", copy]) == 0
    out = capsys.readouterr().out
    assert "dem/zarr.json" in out and "sentinel1/zarr.json" in out
    assert _all_files(copy) == before  # byte for byte, statistics included
    assert cli_main(["validate", "--store", copy, "--deep"]) == 0


def test_repair_without_a_metadata_copy_changes_nothing(small_store, tmp_path, capsys):
    import shutil

    from flows.cli import main as cli_main

    copy = str(tmp_path / "nocopy.zarr")
    shutil.copytree(small_store, copy)  # its build folder (and the copy in it) stays behind
    (Path(copy) / "dem" / "zarr.json").write_text("{")
    before = _all_files(copy)
    capsys.readouterr()
    assert cli_main(["repair", "--store", copy]) == 2
    err = capsys.readouterr().err
    assert "dem/zarr.json" in err and "no copy" in err and "nothing was changed" in err
    assert _all_files(copy) == before


def test_the_committed_tiny_store_is_valid_and_what_its_script_writes(tiny_store, tmp_path):
    """``tests/data/store/tiny.zarr`` validates (every chunk re-read, every checksum compared) and holds
    exactly the arrays and statistics that ``make_store.py`` writes with today's code; when this fails
    after a change to the layout or the offline world, run ``python tests/data/store/make_store.py``."""
    import importlib.util

    from conftest import TINY_STORE

    report = validate_store(tiny_store, deep=True)
    assert report["valid"], report["problems"]
    spec = importlib.util.spec_from_file_location("make_store", TINY_STORE / "make_store.py")
    make_store = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_store)
    fresh = CorpusReader(str(make_store.make(tmp_path / "fresh")))
    committed = CorpusReader(tiny_store)
    stale = "the committed tiny store is stale: run python tests/data/store/make_store.py"
    assert fresh.array_names == committed.array_names, stale
    for name in sorted(fresh.array_names):
        a, b = fresh.read([name], 0, None)[name], committed.read([name], 0, None)[name]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {stale}"
        if name == "checksum":  # of the arrays below; the committed ones are verified by validate_store
            continue
        assert _same_but_rounding(name, a, b), f"{name}: {stale}"
    # approx compares the keys as well: a statistic added or missing fails too
    assert _flat(fresh.statistics) == pytest.approx(_flat(committed.statistics), rel=1e-6, nan_ok=True), stale
    assert fresh.modalities == committed.modalities, stale


def _same_but_rounding(name: str, a: np.ndarray, b: np.ndarray) -> bool:
    """Equal, except where the offline world's floating point may round differently on another CPU:
    numpy picks its exp/log/sin kernels by instruction set (AVX2, AVX-512), whose results can differ in
    the last bit. So float rasters may differ by a few of their own rounding steps (in a derived band
    such as the DEM's slope, relative to the array's largest value), quantised Sentinel-2 by one count;
    NaN patterns, classes, masks, flags and strings must match exactly."""
    if a.dtype.kind == "f":
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return False
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        ok = ~np.isnan(b64)
        eps = float(np.finfo(a.dtype).eps)
        tol = 4 * eps * np.abs(b64[ok]) + 1e-6 * float(np.abs(b64[ok]).max(initial=0.0))
        return bool((np.abs(a64[ok] - b64[ok]) <= tol).all())
    if name == "sentinel2":
        return bool((np.abs(a.astype(np.int32) - b.astype(np.int32)) <= 1).all())
    return bool(np.array_equal(a, b))


def _flat(tree, prefix: str = "") -> dict:
    """A nested dict of statistics as {"a/b/c": number}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}[{i}]").items()}
    return {prefix: tree}
