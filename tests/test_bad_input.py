"""Bad input, case by case: each ends in exit code 2 with a message naming the problem and the fix, no
traceback, and the store on disk unchanged byte for byte."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch


def _tree_hash(path: str) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(small_store, tmp_path_factory):
    """A copy of the small store, a finished 1-step run, damaged runs, a file and tile lists."""
    from model.pretrain import main as pretrain_main

    root = tmp_path_factory.mktemp("bad")
    store = str(root / "store.zarr")
    shutil.copytree(small_store, store)
    run = root / "run"
    args = ["--store", store, "--out", str(run), "--img-size", "32", "--batch-size", "4", "--steps", "1"]
    assert pretrain_main(["--no-progress", "--workers", "0", *args]) == 0
    trunc = root / "trunc"
    shutil.copytree(run, trunc)
    (trunc / "state.pt").write_bytes((run / "state.pt").read_bytes()[:1000])
    trunc_w = root / "trunc_w"
    shutil.copytree(run, trunc_w)
    (trunc_w / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:1000])
    pickled = root / "pickled"
    shutil.copytree(run, pickled)
    torch.save({"args": "{}", "step": torch.tensor(1), "extra": Path("x")}, pickled / "state.pt")
    for name, meta in (("broken_root", "zarr.json"), ("broken_array", "sentinel2/zarr.json")):
        shutil.copytree(store, root / name)
        (root / name / meta).write_text('{"zarr_format": 3, "node_type": ')  # cut short
    (root / "afile").write_text("x")
    (root / "empty.txt").write_text("")
    return {"root": root, "store": store, "run": str(run), "trunc": str(trunc), "trunc_w": str(trunc_w),
            "pickled": str(pickled), "broken_root": str(root / "broken_root"),
            "broken_array": str(root / "broken_array")}  # fmt: skip


def _main(kind: str):
    if kind == "mmearth":
        from flows.cli import main
    elif kind == "pretrain":
        from model.pretrain import main
    elif kind == "probe":
        from model.probe import main
    else:
        from model.evaluate import main
    return main


S, R = "{store}", "{root}"
CASES = [
    # mmearth build
    (
        "build-proc",
        "mmearth",
        ["build", "--store", "/proc/x.zarr", "--tiles", "8"],
        "cannot write under /proc",
    ),
    ("build-sys", "mmearth", ["build", "--store", "/sys/x.zarr", "--tiles", "8"], "cannot write under /sys"),
    ("build-seed", "mmearth", ["build", "--store", f"{R}/n.zarr", "--tiles", "8", "--seed", "-1"], "--seed"),
    ("build-huge", "mmearth", ["build", "--store", f"{R}/n.zarr", "--tiles", str(10**12)], "from 1 to"),
    ("build-zero", "mmearth", ["build", "--store", f"{R}/n.zarr", "--tiles", "0"], "the number of tiles"),
    (
        "build-reserve",
        "mmearth",
        ["build", "--store", f"{R}/n.zarr", "--tiles", "8", "--reserve", "-1"],
        "the reserve must be",
    ),  # fmt: skip
    ("build-file", "mmearth", ["build", "--store", f"{R}/afile", "--tiles", "8"], "is a file, not a folder"),
    (
        "build-other",
        "mmearth",
        ["build", "--store", S, "--tiles", "56", "--tile-size", "64", "--seed", "9"],
        "another configuration",
    ),  # fmt: skip
    (
        "build-tile-size",
        "mmearth",
        ["build", "--store", f"{R}/n.zarr", "--tiles", "8", "--tile-size", "100"],
        "multiple of 32",
    ),  # fmt: skip
    (
        "build-years",
        "mmearth",
        ["build", "--store", f"{R}/n.zarr", "--tiles", "8", "--years", "1990"],
        "years",
    ),
    (
        "build-years-text",
        "mmearth",
        ["build", "--store", f"{R}/n.zarr", "--tiles", "8", "--years", "x"],
        "use a range like",
    ),  # fmt: skip
    (
        "build-modality",
        "mmearth",
        ["build", "--store", f"{R}/n.zarr", "--tiles", "8", "--modalities", "foo"],
        "unknown modality",
    ),  # fmt: skip
    (
        "build-compression",
        "mmearth",
        ["build", "--store", f"{R}/n.zarr", "--tiles", "8", "--compression", "zip"],
        "compression",
    ),  # fmt: skip
    # mmearth catalog
    ("search-year", "mmearth", ["catalog", "search", "--catalog", R, "--year", "abc"], "use a range like"),
    (
        "search-year-order",
        "mmearth",
        ["catalog", "search", "--catalog", R, "--year", "2020-2017"],
        "2017-2020",
    ),
    ("search-limit", "mmearth", ["catalog", "search", "--catalog", R, "--limit", "-1"], "--limit must be"),
    ("search-cloud", "mmearth", ["catalog", "search", "--catalog", R, "--max-cloud", "nan"], "from 0 to 100"),
    ("serve-port", "mmearth", ["catalog", "serve", "--catalog", R, "--port", "99999"], "from 0 to 65535"),
    (
        "catalog-batch",
        "mmearth",
        ["catalog", "build", "--store", S, "--out", f"{R}/c", "--batch-tiles", "0"],
        "--batch-tiles must be",
    ),  # fmt: skip
    ("validate-nothing", "mmearth", ["validate", "--store", f"{R}/nothing.zarr"], None),
    ("validate-broken-meta", "mmearth", ["validate", "--store", "{broken_root}"], "zarr.json cannot be read"),
    (
        "build-broken-meta",
        "mmearth",
        [
            "build",
            "--store",
            "{broken_array}",
            "--tiles",
            "56",
            "--tile-size",
            "64",
            "--seed",
            "7",
            "--shard-tiles",
            "16",
            "--chunk-tiles",
            "4",
        ],
        "sentinel2/zarr.json cannot be read",
    ),  # fmt: skip
    (
        "pretrain-broken-meta",
        "pretrain",
        ["--store", "{broken_root}", "--out", f"{R}/o"],
        "metadata is damaged",
    ),
    ("repair-not-store", "mmearth", ["repair", "--store", R], "not a corpus store"),
    # pretraining
    ("pretrain-img", "pretrain", ["--store", S, "--out", f"{R}/o", "--img-size", "0"], "--img-size 0"),
    (
        "pretrain-mask",
        "pretrain",
        ["--store", S, "--out", f"{R}/o", "--mask-ratio", "1.5"],
        "--mask-ratio 1.5",
    ),
    ("pretrain-out-file", "pretrain", ["--store", S, "--out", f"{R}/afile"], "is a file"),
    (
        "pretrain-tiles-missing",
        "pretrain",
        ["--store", S, "--out", f"{R}/o", "--tiles", f"{R}/missing.txt"],
        "No such file",
    ),  # fmt: skip
    (
        "pretrain-tiles-empty",
        "pretrain",
        ["--store", S, "--out", f"{R}/o", "--tiles", f"{R}/empty.txt"],
        "lists no tile ids",
    ),  # fmt: skip
    (
        "pretrain-truncated",
        "pretrain",
        ["--store", S, "--out", "{trunc}", "--resume", "--img-size", "32"],
        "not a readable checkpoint",
    ),  # fmt: skip
    (
        "pretrain-pickled",
        "pretrain",
        ["--store", S, "--out", "{pickled}", "--resume", "--img-size", "32"],
        "only weights-only checkpoints are loaded",
    ),  # fmt: skip
    ("pretrain-not-store", "pretrain", ["--store", R, "--out", f"{R}/o"], "not a corpus store"),
    ("pretrain-exists", "pretrain", ["--store", S, "--out", "{run}"], "already holds a run"),
    ("pretrain-steps", "pretrain", ["--store", S, "--out", f"{R}/o", "--steps", "0"], "--steps must be"),
    # probe and evaluation
    ("probe-target", "probe", ["--store", S, "--run", "{run}", "--target", "foo"], "unknown modality 'foo'"),
    (
        "probe-target-pixel",
        "probe",
        ["--store", S, "--run", "{run}", "--target", "dem"],
        "tile-level categorical",
    ),
    ("probe-truncated", "probe", ["--store", S, "--run", "{trunc_w}"], "not a readable safetensors file"),
    ("probe-no-run", "probe", ["--store", S, "--run", R], "state.pt missing"),
    ("evaluate-fraction", "evaluate", ["--tasks", S, "--run", "{run}", "--fraction", "2"], "--fraction"),
    ("evaluate-truncated", "evaluate", ["--tasks", S, "--run", "{trunc}"], "not a readable checkpoint"),
    (
        "evaluate-geobench",
        "evaluate",
        ["--tasks", "geobench:m-none", "--run", "{run}", "--geobench-dir", R],
        "not found under",
    ),  # fmt: skip
]
if importlib.util.find_spec("s3fs") is None:
    CASES.append(
        ("build-s3", "mmearth", ["build", "--store", "s3://b/x.zarr", "--tiles", "8"], "Install s3fs")
    )


@pytest.mark.parametrize("name,kind,argv,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_a_message_and_changes_nothing(world, capsys, name, kind, argv, message):
    argv = [a.format(**world) for a in argv]
    stores = [world[k] for k in ("store", "broken_root", "broken_array")]
    before = [_tree_hash(s) for s in stores]
    files_before = sorted(str(p) for p in Path(world["root"]).iterdir())
    try:
        code = _main(kind)(argv)
    except SystemExit as e:  # argparse: usage and message on stderr
        code = e.code
    out = capsys.readouterr()
    text = out.err + out.out
    assert code == (1 if name.startswith("validate-") else 2), text
    assert "Traceback" not in text and "weights_only=False" not in text
    if message:
        assert message in text, text
    assert [_tree_hash(s) for s in stores] == before
    assert sorted(str(p) for p in Path(world["root"]).iterdir()) == files_before  # nothing new beside it
