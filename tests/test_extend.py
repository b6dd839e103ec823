"""``mmearth build --extend``: a complete store grows by new tiles (more per stratum, new years) without
any of its full shards rewritten; statistics, history and validation follow."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import zarr

from mmearth_data.build import BuildConfig, BuildInputError, OtherBuildError, build_in_process
from mmearth_data.crash import ENV
from mmearth_data.store import CorpusReader
from mmearth_data.validate import validate_store

BASE = dict(n_tiles=40, tile_size=32, shard_tiles=16, chunk_tiles=4, seed=5, years=(2018, 2019))
EXT = BASE | {"n_tiles": 72, "years": (2021,)}  # 32 more tiles, all in a new year


def _digests(path: str) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime in ns) of every file under ``path``."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            out[os.path.relpath(p, path)] = (digest, os.stat(p).st_mtime_ns)
    return out


def _shard_files(digests: dict, shard: int) -> dict:
    """Files of shard ``shard`` of every per-tile array (``<array>/c/<shard>/...``)."""
    return {k: v for k, v in digests.items() if k.split(os.sep)[1:3] == ["c", str(shard)]}


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ext") / "s.zarr")
    build_in_process(BuildConfig(store=path, **BASE))
    before = _digests(path)
    stats_before = dict(zarr.open_group(path, mode="r").attrs["statistics"])
    tail_before = CorpusReader(path).read(["tile_id", "sentinel2", "checksum"], 32, 40)
    summary = build_in_process(BuildConfig(store=path, **EXT, extend=True))
    return path, before, stats_before, summary, tail_before


def test_extend_adds_tiles_in_new_years_and_keeps_every_full_shard(extended):
    path, before, stats_before, summary, tail_before = extended
    after = _digests(path)
    assert summary["complete"] == 72 and summary["n_tiles"] == 72
    for shard in (0, 1):  # the full shards of the 40-tile store: byte for byte and untouched
        old = _shard_files(before, shard)
        assert old and _shard_files(after, shard) == old
    r = CorpusReader(path)
    tiles = r.tiles()
    assert len(tiles) == 72 and tiles["complete"].all()
    assert tiles["tile_id"].is_unique, "an extension drew a grid cell the store holds already"
    assert set(tiles["year"][:40]) == {2018, 2019} and set(tiles["year"][40:]) == {2021}
    # the tiles of the partial third shard (32..39) are kept as they were
    tail = r.read(["tile_id", "sentinel2", "checksum"], 32, 40)
    for name, values in tail_before.items():
        np.testing.assert_array_equal(tail[name], values, err_msg=name)
    old = zarr.open_group(path, mode="r")
    assert r.attrs["build"]["config"]["years"] == [2018, 2019, 2021]
    assert r.attrs["build"]["config"]["n_tiles"] == 72
    # statistics cover the new tiles
    s2_old = stats_before["sentinel2"]["L2A"]["B4"]["count"] + stats_before["sentinel2"]["L1C"]["B4"]["count"]
    s2_new = r.statistics["sentinel2"]["L2A"]["B4"]["count"] + r.statistics["sentinel2"]["L1C"]["B4"]["count"]
    assert s2_new > s2_old
    hist = r.attrs["history"]
    assert [h["action"] for h in hist] == ["create", "extend"]
    assert hist[1]["tiles"] == [40, 72] and hist[1]["added"] == 32 and hist[1]["years"] == [2021]
    assert hist[1]["finished"] and hist[1]["complete"] == 32 and hist[1]["source"]["source"] == "offline"
    assert old["sentinel2"].shape[0] == 72
    report = validate_store(path)
    assert report["valid"], report["problems"]
    assert [h["action"] for h in report["summary"]["history"]] == ["create", "extend"]


def test_extend_again_with_the_same_command_changes_nothing(extended):
    path, *_ = extended
    before = _digests(path)
    summary = build_in_process(BuildConfig(store=path, **EXT, extend=True))
    assert summary["shards_exported"] == 0 and summary["complete"] == 72
    changed = {k for k, v in _digests(path).items() if before.get(k) != v}
    assert changed <= {"zarr.json"}, changed  # the statistics are written again, nothing else


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_tiles=30), "holds 72 tiles already"),
        (dict(n_tiles=72, years=(2022,)), "adds no tiles to hold them"),
    ],
)
def test_bad_extension_requests_say_what_to_do(extended, change, message):
    path, *_ = extended
    before = _digests(path)
    with pytest.raises(BuildInputError, match=message):
        build_in_process(BuildConfig(store=path, **(BASE | change), extend=True))
    assert _digests(path) == before


def test_extension_of_another_build_or_of_nothing_is_refused(extended, tmp_path):
    path, *_ = extended
    with pytest.raises(OtherBuildError, match="repeat those options"):
        build_in_process(BuildConfig(store=path, **(BASE | {"n_tiles": 90, "seed": 6}), extend=True))
    with pytest.raises(BuildInputError, match="no corpus store"):
        build_in_process(BuildConfig(store=str(tmp_path / "none.zarr"), **BASE, extend=True))


def test_extension_killed_while_resizing_resumes_to_the_same_store(tmp_path):
    """SIGKILL after some arrays are resized; the same command finishes the extension and the store
    equals one extended without interruption (history timestamps aside)."""
    ext = BASE | {"n_tiles": 64}
    stores = {name: str(tmp_path / f"{name}.zarr") for name in ("killed", "clean")}
    build_in_process(BuildConfig(store=stores["clean"], **BASE))
    # the same store under another name (this process holds the clean one's build lock)
    shutil.copytree(stores["clean"], stores["killed"])
    no_lock = shutil.ignore_patterns("lock")
    shutil.copytree(tmp_path / "clean.build", tmp_path / "killed.build", ignore=no_lock)
    script = (
        "from mmearth_data.build import BuildConfig, build_in_process; "
        f"build_in_process(BuildConfig(store={stores['killed']!r}, **{ext!r}, extend=True))"
    )
    killed = subprocess.run(
        [sys.executable, "-c", script], env=os.environ | {ENV: "extend-resized:7"}, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    rerun = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    build_in_process(BuildConfig(store=stores["clean"], **ext, extend=True))
    a, b = CorpusReader(stores["killed"]), CorpusReader(stores["clean"])
    assert a.n_tiles == b.n_tiles == 64
    for name in ["complete", "tile_id", "checksum", *[m.name for m in a.modalities]]:
        np.testing.assert_array_equal(a.read([name], 0, 64)[name], b.read([name], 0, 64)[name], err_msg=name)
    assert len(a.attrs["history"]) == 2
