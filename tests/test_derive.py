"""`mmearth derive`: centre crop, stratified subset, new split and fewer modalities, without re-export."""

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr

from flows.cli import main as cli
from mmearth_data.derive import DeriveError, parse_split, stratified_subset
from mmearth_data.store import strings
from mmearth_data.validate import validate_store


def test_centre_crop_keeps_values_georeferencing_and_validity(small_store, tmp_path):
    out = str(tmp_path / "c.zarr")
    assert cli(["derive", "--store", small_store, "--out", out, "--crop", "32"]) == 0
    rep = validate_store(out, deep=True)
    assert rep["valid"], rep["problems"]
    a, b = zarr.open_group(small_store, mode="r"), zarr.open_group(out, mode="r")
    keep = np.flatnonzero(np.asarray(a["complete"][:]))
    assert b.attrs["tile_size"] == 32 and b["sentinel2"].shape[-1] == 32
    s2a, s2b = np.asarray(a["sentinel2"][:])[keep], np.asarray(b["sentinel2"][:])
    assert np.array_equal(s2b, s2a[..., 16:48, 16:48])
    ta, tb = np.asarray(a["transform"][:])[keep], np.asarray(b["transform"][:])
    np.testing.assert_allclose(tb[:, 2], ta[:, 2] + 160)  # origin 16 px east
    np.testing.assert_allclose(tb[:, 5], ta[:, 5] - 160)  # and 16 px south
    assert list(strings(b["tile_id"][:])) == list(strings(a["tile_id"][:])[keep])
    d = b.attrs["derived"]
    assert d["from"] == os.path.abspath(small_store) and d["derivation"] == {"crop": 32, "seed": 0}
    assert "build" not in b.attrs  # `mmearth build` / `repair` cannot take it for the source


def test_subset_split_and_modalities(small_store, tmp_path):
    out = str(tmp_path / "s.zarr")
    split = "train=0.5,val=0.25,test=0.25"
    args = ["derive", "--store", small_store, "--out", out, "--subset", "20", "--split", split,
            "--modalities", "sentinel2,sentinel1,biome", "--seed", "3"]  # fmt: skip
    assert cli(args) == 0
    assert validate_store(out, deep=True)["valid"]
    g = zarr.open_group(out, mode="r")
    assert g.attrs["n_tiles"] == 20 and g.attrs["modalities"] == ["sentinel2", "sentinel1", "biome"]
    strata = Counter(zip(np.asarray(g["biome"][:]).tolist(), np.asarray(g["year"][:]).tolist(), strict=True))
    assert max(strata.values()) - min(strata.values()) <= 1
    split = strings(g["split"][:])
    blocks = {}
    for la, lo, s in zip(np.floor(g["lat"][:]), np.floor(g["lon"][:]), split, strict=True):
        assert blocks.setdefault((la, lo), s) == s  # a 1-degree block keeps one split


def test_stratified_subset_balances_and_fills_from_larger_strata():
    biome = np.array([1] * 10 + [2] * 2 + [3] * 6)
    year = np.full(18, 2020)
    idx = stratified_subset(biome, year, 12, seed=1)
    counts = Counter(biome[idx].tolist())
    assert len(idx) == 12 and counts[2] == 2 and abs(counts[1] - counts[3]) <= 1
    assert np.array_equal(idx, stratified_subset(biome, year, 12, seed=1))
    assert not np.array_equal(idx, stratified_subset(biome, year, 12, seed=2))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--crop", "100"], "--crop 100"),
        (["--subset", "1000"], "--subset 1000"),
        (["--modalities", "sentinel1"], "must keep sentinel2"),
        (["--modalities", "sentinel2,foo"], "foo not in"),
        (["--split", "train=0.9,val=0.2"], "sum to"),
    ],
)
def test_bad_derivations_exit_2_and_write_nothing(small_store, tmp_path, capsys, extra, message):
    out = tmp_path / "bad.zarr"
    capsys.readouterr()
    assert cli(["derive", "--store", small_store, "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_an_existing_out_is_never_overwritten(small_store, tmp_path, capsys):
    out = tmp_path / "x.zarr"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["derive", "--store", small_store, "--out", str(out), "--crop", "32"]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(DeriveError):
        parse_split("train=abc")
    assert Path(small_store).exists()
