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


def test_torchgeo_reads_the_export(export):
    pytest.importorskip("torchgeo")
    from torchgeo.datasets import MMEarth

    store, folder, root = export
    ds = MMEarth(root, subset="MMEarth100k")
    stats = _strict(f"{folder}/{NAME}_band_stats.json")
    info = _strict(f"{folder}/{NAME}_tile_info.json")
    with h5py.File(f"{folder}/{NAME}.h5", "r") as f:
        for k in range(min(3, len(ds))):
            s = ds[k]
            row = ds.indices[k]
            level = info[s["tile_id"]]["S2_type"]
            mean = np.array(stats[f"sentinel2_{level}"]["mean"])[:, None, None]
            std = np.array(stats[f"sentinel2_{level}"]["std"])[:, None, None]
            raw = f["sentinel2"][row].astype(np.float64)
            back = s["image_sentinel2"].numpy() * std + mean
            valid = raw != 0
            np.testing.assert_allclose(back[valid], raw[valid], rtol=1e-4, atol=0.5)
            assert s["image_sentinel1_asc"].shape[0] == 4 and s["image_aster"].shape[0] == 2
