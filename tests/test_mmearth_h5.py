"""The export to MMEarth's HDF5 layout holds the store's values in MMEarth's order, dtypes and no-data
values, and torchgeo's MMEarth reader (when installed) reads it."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from mmearth_data.mmearth_h5 import N_ECOREGIONS, S2_ORDER, export_mmearth_h5
from mmearth_data.registry import get
from mmearth_data.store import strings

NAME = "data_100k_v001"


@pytest.fixture(scope="module")
def export(small_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("h5")
    return small_store, export_mmearth_h5(small_store, str(out), NAME), str(out)


def _strict(path):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c} in {path}")

    return json.loads(Path(path).read_text(), parse_constant=bad)


def test_values_order_and_no_data_follow_mmearth(export):
    store, folder, _ = export
    g = zarr.open_group(store, mode="r")
    complete = np.asarray(g["complete"][:])
    rows = np.flatnonzero(complete)
    with h5py.File(f"{folder}/{NAME}.h5", "r") as f:
        assert [r[0].decode() for r in f["metadata"][:]] == list(strings(g["tile_id"][:])[rows])
        s2 = np.asarray(g["sentinel2"][:])[rows]
        bands = get("sentinel2").bands
        assert f["sentinel2"].dtype == np.uint16 and f["sentinel2"].shape[1] == 13
        assert f["sentinel2"].chunks[0] == 1 and f["sentinel2"].compression == "gzip"
        for j, b in enumerate(S2_ORDER):  # B8A before B8, as MMEarth stores them
            assert np.array_equal(f["sentinel2"][:, j], s2[:, bands.index(b)]), b
        s1 = np.asarray(g["sentinel1"][:])[rows].astype(np.float32)
        got = f["sentinel1"][:]
        assert np.array_equal(np.isneginf(got), np.isnan(s1)) and np.array_equal(
            got[~np.isnan(s1)], s1[~np.isnan(s1)]
        )
        wc = np.asarray(g["esa_worldcover"][:])[rows]
        assert np.array_equal(f["esa_worldcover"][:], np.where(wc == 0, 255, wc))
        eco = np.asarray(g["ecoregion"][:])[rows]
        onehot = f["eco_region"][:]
        assert onehot.shape == (len(rows), N_ECOREGIONS) and np.array_equal(
            onehot.sum(1), (eco > 0).astype(int)
        )
        assert np.array_equal(onehot.argmax(1)[eco > 0] + 1, eco[eco > 0])
        assert np.array_equal(f["biome"][:].argmax(1) + 1, np.asarray(g["biome"][:])[rows])
    info = _strict(f"{folder}/{NAME}_tile_info.json")
    stats = _strict(f"{folder}/{NAME}_band_stats.json")
    splits = _strict(f"{folder}/{NAME}_splits.json")
    assert len(info) == len(rows) and {"S2_DATE", "S2_type", "CRS", "lat", "lon"} <= set(
        next(iter(info.values()))
    )
    assert len(stats["sentinel2_l1c"]["mean"]) == 13 and len(stats["sentinel1"]["std"]) == 8
    assert sorted(sum(splits.values(), [])) == list(range(len(rows)))


def test_torchgeo_reads_every_modality_back(export):
    """torchgeo's MMEarth reader returns our store's values for every modality (after MMEarth's
    encodings: per-band z-scores, 0-based classes, one-hot labels, no-data values)."""
    pytest.importorskip("torchgeo")
    from torchgeo.datasets import MMEarth

    store, folder, root = export
    ds = MMEarth(root, subset="MMEarth100k")
    stats = _strict(f"{folder}/{NAME}_band_stats.json")
    info = _strict(f"{folder}/{NAME}_tile_info.json")
    g = zarr.open_group(store, mode="r")
    rows = np.flatnonzero(np.asarray(g["complete"][:]))
    ids = strings(g["tile_id"][:])

    def denorm(x, key, idx=slice(None)):
        mean, std = np.array(stats[key]["mean"])[idx], np.array(stats[key]["std"])[idx]
        shape = (-1,) + (1,) * (x.ndim - 1)
        return x.numpy().astype(np.float64) * std.reshape(shape) + mean.reshape(shape)

    s2_bands = get("sentinel2").bands
    checked = 0
    for k in range(0, len(ds), max(1, len(ds) // 4)):
        s = ds[k]
        i = rows[ds.indices[k]]
        assert s["tile_id"] == ids[i]
        lv = info[s["tile_id"]]["S2_type"]
        raw = np.asarray(g["sentinel2"][i])[[s2_bands.index(b) for b in S2_ORDER]].astype(np.float64)
        valid = raw != 0
        np.testing.assert_allclose(
            denorm(s["image_sentinel2"], f"sentinel2_{lv}")[valid], raw[valid], atol=0.05
        )
        s1 = np.asarray(g["sentinel1"][i]).astype(np.float64)
        for key, half in (("image_sentinel1_asc", slice(0, 4)), ("image_sentinel1_desc", slice(4, 8))):
            got, want = denorm(s[key], "sentinel1", half), s1[half]
            assert np.array_equal(np.isnan(got), np.isnan(want)), key
            np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], atol=1e-3)
        dem = np.asarray(g["dem"][i]).astype(np.float64)
        got = denorm(s["image_aster"], "aster")
        assert np.array_equal(np.isnan(got), np.isnan(dem))
        np.testing.assert_allclose(got[~np.isnan(dem)], dem[~np.isnan(dem)], rtol=1e-5, atol=1e-3)
        ch = np.asarray(g["canopy_height"][i]).view(np.int8)
        np.testing.assert_allclose(denorm(s["image_canopy_height_eth"], "canopy_height_eth"), ch, atol=1e-3)
        era5 = np.asarray(g["era5"][i]).astype(np.float64)
        np.testing.assert_allclose(denorm(s["era5"], "era5"), era5, rtol=1e-5, atol=1e-6)
        dw = np.asarray(g["dynamic_world"][i]).astype(np.float64)
        got = s["mask_dynamic_world"].numpy()
        assert np.array_equal(np.isnan(got), dw == 0) and np.array_equal(got[dw > 0], dw[dw > 0] - 1)
        wc = np.asarray(g["esa_worldcover"][i])
        codes = list(get("esa_worldcover").classes)
        want = np.where(wc == 0, 255, np.searchsorted(codes, wc))
        assert np.array_equal(s["mask_esa_worldcover"].numpy(), want)
        masks = np.asarray(g["sentinel2_masks"][i]).astype(np.int64)
        mb = get("sentinel2_masks").bands
        for key, band, fill in (
            ("mask_sentinel2_cloudmask", "QA60", 65535),
            ("mask_sentinel2_cloudprod", "MSK_CLDPRB", 65535),
            ("mask_sentinel2_scl", "SCL", 255),
        ):
            want = masks[mb.index(band)]
            assert np.array_equal(s[key].numpy()[0], np.where(want == 255, fill, want)), key  # fmt: skip
        # torchgeo hands out the first entry of the one-hot vectors ("biome" is one band to it)
        assert int(s["biome"][0]) == int(np.asarray(g["biome"][i]) == 1)
        assert int(s["eco_region"][0]) == int(np.asarray(g["ecoregion"][i]) == 1)
        assert s["crs"] == f"EPSG:{int(np.asarray(g['epsg'][i]))}"
        assert s["lat"] == pytest.approx(float(np.asarray(g["lat"][i])))
        checked += 1
    assert checked >= 3


def test_export_h5_command_refuses_to_overwrite(small_store, tmp_path, capsys):
    from flows.cli import main

    out = str(tmp_path / "x")
    assert main(["export-h5", "--store", small_store, "--out", out, "--name", "data_1M_v001_64"]) == 0
    h5 = Path(out) / "data_1M_v001_64" / "data_1M_v001_64.h5"
    before = h5.read_bytes()
    capsys.readouterr()
    assert main(["export-h5", "--store", small_store, "--out", out, "--name", "data_1M_v001_64"]) == 2
    assert "already exists" in capsys.readouterr().err and h5.read_bytes() == before
    assert main(["export-h5", "--store", str(tmp_path / "none.zarr"), "--out", out]) == 2
    assert "not a corpus store" in capsys.readouterr().err
    assert not list(Path(out).glob(".*partial"))
