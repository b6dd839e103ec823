"""GEO-Bench datasets read from GEO-Bench's own file layout (a fixture written by the committed
``tests/data/geobench/make_fixture.py``, in its own process) and evaluated like the offline tasks."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from model.geobench import S2_NAMES, GeoBenchDataset, GeoBenchError

FIXTURE = Path(__file__).parent / "data" / "geobench"
sys.path.insert(0, str(FIXTURE))
import make_fixture as fx  # noqa: E402  (values only; its geobench stand-ins stay in the subprocess)


@pytest.fixture(scope="module")
def geobench_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("geobench")
    subprocess.run([sys.executable, str(FIXTURE / "make_fixture.py"), str(root)], check=True)
    return str(root)


def _expected(band: str, sample: int, size: int, extra: float = 0.0) -> np.ndarray:
    r = np.arange(size)
    return (fx.value(band, sample, r, r) + extra - fx.STATS_MEAN) / fx.stats_std(band)


def test_bands_by_name_in_the_encoder_order(geobench_root):
    ds = GeoBenchDataset.open("m-eurosat", geobench_root)
    assert ds.kind == "single-label" and ds.n_classes == 3 and ds.class_names == ["a", "b", "c"]
    assert ds.path.parent.name == "classification_v1.0"
    x, y = ds.read("m-eurosat_004")
    assert x.shape == (12, 32, 32) and x.dtype == np.float32 and y == 4 % 3
    for i, b in enumerate(S2_NAMES):  # B10 is left out, B8 stays B8 and B8A stays B8A
        extra = 40 * y if b == "B4" else 0.0
        np.testing.assert_allclose(x[i], _expected(S2_NAMES[b], 4, 32, extra), rtol=1e-6, err_msg=b)
    i8, i8a = list(S2_NAMES).index("B8"), list(S2_NAMES).index("B8A")
    assert not np.allclose(x[i8], x[i8a])


def test_so2sat_fills_b1_and_b9_from_their_neighbours(geobench_root):
    ds = GeoBenchDataset.open("m-so2sat", geobench_root)
    assert ds.filled == {"B1": "B2", "B9": "B8A"}
    x, _ = ds.read("m-so2sat_002")
    names = list(S2_NAMES)
    np.testing.assert_array_equal(x[names.index("B1")], x[names.index("B2")])
    np.testing.assert_array_equal(x[names.index("B9")], x[names.index("B8A")])
    np.testing.assert_allclose(x[names.index("B9")], _expected(S2_NAMES["B8A"], 2, 32), rtol=1e-6)


def test_multilabel_coarse_bands_and_time_series(geobench_root):
    ds = GeoBenchDataset.open("m-bigearthnet", geobench_root)
    x, y = ds.read("m-bigearthnet_003")
    assert ds.kind == "multi-label" and x.shape == (12, 32, 32)  # 20 m bands resampled to the 10 m grid
    np.testing.assert_array_equal(y, [1, 1, 1, 1, 0])
    np.testing.assert_allclose(x[list(S2_NAMES).index("B2")], _expected(S2_NAMES["B2"], 3, 32), rtol=1e-6)
    b5 = x[list(S2_NAMES).index("B5")]
    assert abs(b5.mean() - _expected(S2_NAMES["B5"], 3, 16).mean()) < 0.02  # bilinear keeps the level

    seg = GeoBenchDataset.open("m-cashew-plantation", geobench_root)
    x, y = seg.read("m-cashew-plantation_002")
    assert seg.kind == "segmentation" and y.shape == (32, 32) and set(np.unique(y)) == {0, 1, 2}
    assert y.dtype == np.int64 and (y[:, :6] == 2).all()
    # the first of the two dates (the second is brighter by DATE_STEP)
    np.testing.assert_allclose(x[1], _expected(S2_NAMES["B2"], 2, 32), rtol=1e-6)


def test_partitions_and_errors(geobench_root, tmp_path, monkeypatch):
    ds = GeoBenchDataset.open("m-eurosat", geobench_root)
    full, half = ds.split_names(), ds.split_names(0.5)
    assert len(full["train"]) == 6 and len(half["train"]) == 3 and half["test"] == full["test"]
    assert ds.split_names(0.2) == {}  # no such partition shipped: the caller draws its own
    monkeypatch.setenv("GEO_BENCH_DIR", str(tmp_path))
    with pytest.raises(GeoBenchError, match="GEO_BENCH_DIR"):
        GeoBenchDataset.open("m-eurosat")
    monkeypatch.setenv("GEO_BENCH_DIR", geobench_root)
    assert GeoBenchDataset.open("m-eurosat").path == ds.path  # the environment variable is the default


def test_a_sample_file_cannot_run_code(geobench_root, tmp_path):
    import shutil

    d = tmp_path / "classification_v1.0" / "m-eurosat"
    shutil.copytree(Path(geobench_root) / "classification_v1.0" / "m-eurosat", d)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(marker)],))

    with h5py.File(d / "m-eurosat_000.hdf5", "r+") as f:
        f.attrs["pickle"] = str(pickle.dumps({"bands_order": [], "label": Evil()}))
    ds = GeoBenchDataset.open("m-eurosat", tmp_path)
    with pytest.raises(GeoBenchError, match="subprocess.call is not part of GEO-Bench"):
        ds.read("m-eurosat_000")
    assert not marker.exists()


def test_evaluate_geobench_tasks(geobench_root, small_store, tmp_path):
    from model.evaluate import main as evaluate_main
    from model.pretrain import main as pretrain_main

    run = str(tmp_path / "run")
    args = ["--store", small_store, "--out", run, "--img-size", "32", "--batch-size", "4", "--steps", "1"]
    assert pretrain_main(["--no-progress", "--model", "atto", "--workers", "0", *args]) == 0
    res = tmp_path / "gb.json"
    tasks = "geobench:m-eurosat,geobench:m-bigearthnet,geobench:m-cashew-plantation"
    assert evaluate_main(["--tasks", tasks, "--run", run, "--geobench-dir", geobench_root, "--seeds", "2",
                          "--fraction", "0.5,1", "--json", str(res)]) == 0  # fmt: skip
    rows = json.loads(res.read_text())["rows"]
    assert [(r["task"], r["metric"], r["fraction"]) for r in rows] == [
        ("geobench:m-eurosat", "accuracy", 0.5),
        ("geobench:m-eurosat", "accuracy", 1.0),
        ("geobench:m-bigearthnet", "micro_f1", 0.5),
        ("geobench:m-bigearthnet", "micro_f1", 1.0),
        ("geobench:m-cashew-plantation", "miou", 0.5),
        ("geobench:m-cashew-plantation", "miou", 1.0),
    ]
    assert all(0.0 <= r["mean"] <= 1.0 for r in rows)
    ft = tmp_path / "ft.json"
    seg = ["--tasks", "geobench:m-cashew-plantation", "--run", run, "--geobench-dir", geobench_root]
    assert evaluate_main([*seg, "--finetune", "--epochs", "1", "--seeds", "1", "--json", str(ft)]) == 0
    assert json.loads(ft.read_text())["rows"][0]["protocol"] == "finetune"
    assert (
        evaluate_main(["--tasks", "geobench:m-nowhere", "--run", run, "--geobench-dir", geobench_root]) == 2
    )
