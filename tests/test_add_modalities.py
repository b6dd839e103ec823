"""``mmearth build --extend --modalities``: modalities added to a complete store's tiles, each tile's new
values built from the Sentinel-2 scene it was built from, without any existing file rewritten."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from mmearth_data.build import BuildConfig, BuildInputError, build_in_process
from mmearth_data.crash import ENV
from mmearth_data.store import CorpusReader, strings
from mmearth_data.validate import validate_store
from tests.test_extend import _digests

OLD = ("sentinel2", "sentinel1", "dem", "era5", "biome")
NEW = ("canopy_height", "dynamic_world")
BASE = dict(n_tiles=40, tile_size=32, shard_tiles=16, chunk_tiles=4, seed=5, years=(2018, 2019))
BASE |= {"modalities": OLD}
ADD = BASE | {"modalities": OLD + NEW}


@pytest.fixture(scope="module")
def added(tmp_path_factory):
    root = tmp_path_factory.mktemp("add")
    path, full = str(root / "s.zarr"), str(root / "full.zarr")
    build_in_process(BuildConfig(store=path, **BASE))
    before = _digests(path)
    summary = build_in_process(BuildConfig(store=path, **ADD, extend=True))
    build_in_process(BuildConfig(store=full, **ADD))  # the same tiles built with every modality at once
    return path, full, before, summary


def test_added_modalities_equal_a_build_that_had_them_and_no_file_is_rewritten(added):
    path, full, before, summary = added
    assert summary["complete"] == 40 and summary["failed_attempts"] == 0
    after = _digests(path)
    # every file of the store before (bar the root's metadata, which lists the new arrays) is untouched
    changed = {k for k, v in before.items() if after.get(k) != v}
    assert changed == {"zarr.json"}, changed
    made = {k.split(os.sep)[0] for k in set(after) - set(before)}
    arrays = {f"{p}{m}{q}" for m in NEW for p, q in (("", ""), ("", "_present"), ("", "_complete"),
                                                     ("checksum_", ""), ("", "_band"))}  # fmt: skip
    assert made == arrays, made
    a, b = CorpusReader(path), CorpusReader(full)
    assert [m.name for m in a.modalities] == list(OLD + NEW)
    for name in ["tile_id", "s2_date", *NEW, *[f"{m}_present" for m in NEW], *OLD]:
        np.testing.assert_array_equal(a.read([name], 0, 40)[name], b.read([name], 0, 40)[name], err_msg=name)
    assert a.tiles()["complete"].all()
    for m in NEW:  # statistics cover the new modalities
        assert a.statistics[m] == b.statistics[m]
    hist = a.attrs["history"]
    assert [h["action"] for h in hist] == ["create", "add-modalities"]
    assert hist[1]["modalities"] == list(NEW) and hist[1]["added"] == 0 and hist[1]["complete"] == 40
    report = validate_store(path, deep=True)
    assert report["valid"], report["problems"]
    assert report["summary"]["history"][1]["modalities"] == list(NEW)


def test_adding_again_with_the_same_command_changes_nothing(added):
    path, *_ = added
    before = _digests(path)
    summary = build_in_process(BuildConfig(store=path, **ADD, extend=True))
    assert summary["shards_exported"] == 0 and summary["complete"] == 40
    changed = {k for k, v in _digests(path).items() if before.get(k) != v}
    assert changed <= {"zarr.json"}, changed


def test_deep_validation_checks_an_added_modality_against_its_own_checksums(added, tmp_path):
    path, *_ = added
    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(path, copy)
    import zarr

    g = zarr.open_group(copy, mode="r+")
    g["canopy_height"][3] = np.asarray(g["canopy_height"][3]) + 1  # values changed behind the checksum
    report = validate_store(copy, deep=True)
    assert not report["valid"]
    assert [(d["index"], d["array"]) for d in report["damaged"]] == [(3, "canopy_height")]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(modalities=("sentinel2", "canopy_height")), "leaves out sentinel1, dem, era5, biome"),
        (dict(modalities=OLD + NEW, n_tiles=64), "add the modalities with `n_tiles` 40 first"),
    ],
)
def test_bad_modality_extensions_say_what_to_do(tmp_path, change, message):
    path = str(tmp_path / "s.zarr")
    build_in_process(BuildConfig(store=path, **BASE))
    before = _digests(path)
    with pytest.raises(BuildInputError, match=message):
        build_in_process(BuildConfig(store=path, **(BASE | change), extend=True))
    assert _digests(path) == before


def test_tiles_added_after_a_modality_hold_it_too(added, tmp_path):
    path, *_ = added
    copy = str(tmp_path / "grown.zarr")
    shutil.copytree(path, copy)
    shutil.copytree(path.replace(".zarr", ".build"), copy.replace(".zarr", ".build"),
                    ignore=shutil.ignore_patterns("lock"))  # fmt: skip
    build_in_process(BuildConfig(store=copy, **(ADD | {"n_tiles": 56, "years": (2020,)}), extend=True))
    r = CorpusReader(copy)
    tiles = r.tiles()
    assert len(tiles) == 56 and tiles["complete"].all()
    assert tiles["canopy_height_present"][40:].any()
    report = validate_store(copy, deep=True)
    assert report["valid"], report["problems"]


def test_adding_killed_mid_shard_resumes_to_the_same_store(added, tmp_path):
    """SIGKILL after some of a shard's new arrays are written; the same command finishes and the
    store holds what an uninterrupted addition wrote."""
    path, *_ = added
    killed = str(tmp_path / "killed.zarr")
    build = "from mmearth_data.build import BuildConfig, build_in_process; build_in_process(BuildConfig"
    subprocess.run([sys.executable, "-c", f"{build}(store={killed!r}, **{BASE!r}))"], check=True)
    script = f"{build}(store={killed!r}, **{ADD!r}, extend=True))"  # (this process takes no build lock)
    run = subprocess.run([sys.executable, "-c", script], env=os.environ | {ENV: "shard-array:5"},
                         capture_output=True)  # fmt: skip
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert not CorpusReader(killed).tiles()["complete"].all()
    rerun = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    a, b = CorpusReader(killed), CorpusReader(path)
    for name in ["complete", *NEW, *[f"checksum_{m}" for m in NEW], *[f"{m}_complete" for m in NEW]]:
        np.testing.assert_array_equal(a.read([name], 0, 40)[name], b.read([name], 0, 40)[name], err_msg=name)
    assert [h["action"] for h in a.attrs["history"]] == ["create", "add-modalities"]


def test_earth_engine_tiles_get_their_new_modalities_from_their_own_scenes(tmp_path):
    """Against the simulated service: each fill request pins its tile to the stored scene id (the
    simulator answers only for the scene it holds); a tile whose scene is gone is left unfilled with
    the reason, and the store says it is incomplete."""
    import json

    import zarr

    from mmearth_data.sources.earthengine import register_transport
    from mmearth_data.testing.ee_fake import SimulatedTransport, pinned_scene_id, strict_json

    pins: list[str | None] = []

    class Recording(SimulatedTransport):
        def compute_value(self, expression, tile_id):
            if not tile_id.startswith("resolve-labels"):
                pins.append(pinned_scene_id(strict_json(expression.serialize(for_cloud_api=True))))
            return super().compute_value(expression, tile_id)

    register_transport("add-sim", Recording(latency_s=0.0, failure_share=0.0, seed=2))
    opts = {"transport": "add-sim", "backoff_base_s": 0.0, "project": "p"}
    common = dict(n_tiles=24, tile_size=32, shard_tiles=8, seed=3, source="earthengine", source_options=opts)
    store = str(tmp_path / "ee.zarr")
    build_in_process(BuildConfig(store=store, **common, modalities=OLD))
    assert pins and set(pins) == {None}  # the first build chooses its scenes
    g = zarr.open_group(store, mode="r+")
    ids = list(strings(g["s2_id"][0:8]))
    ids[5] = "20190101T000000_20190101T000000_T00XXX"  # a scene the archive no longer holds
    g["s2_id"][0:8] = np.array(ids, dtype=object)
    pins.clear()
    summary = build_in_process(BuildConfig(store=store, **common, modalities=OLD + NEW, extend=True))
    tiles = CorpusReader(store).tiles()
    assert sorted(pins) == sorted(tiles["s2_id"])  # every fill request named its tile's own scene
    assert summary["complete"] == 23
    r = CorpusReader(store)
    flags = r.read(["canopy_height_complete"], 0, 24)["canopy_height_complete"]
    assert not flags[5] and flags.sum() == 23
    failures = json.loads((tmp_path / "ee.build" / "failures.json").read_text())
    assert [f["tile_id"] for f in failures] == [tiles["tile_id"][5]]
    assert "no longer in" in failures[0]["reason"] and failures[0]["action"] == "left unfilled"
    report = validate_store(store)
    assert not report["valid"] and any("1 of 24 tiles are not complete" in p for p in report["problems"])
