"""Scale-out: the build on a Dask cluster, and the corpus in object storage (moto's S3 server on
loopback) from build to training. Every server and cluster is started and stopped here."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import psutil
import pytest

from catalog.build import build_catalog
from catalog.search import Query, search
from flows.build_corpus import run_build
from mmearth_data.build import BuildConfig, BuildInputError, build_in_process
from mmearth_data.store import CorpusReader
from mmearth_data.validate import validate_store

from conftest import free_port, store_files

SECRET = "s3cr3t-planted-key-value-0123456789"


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on 127.0.0.1, a bucket, and the usual AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3").create_bucket(Bucket="corpus")
    try:
        yield env
    finally:
        server.stop()
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()


@pytest.mark.slow
def test_corpus_in_object_storage_builds_validates_catalogs_and_trains(s3, tmp_path):
    import s3fs

    store, cat = "s3://corpus/demo.zarr", "s3://corpus/catalog"
    opts = dict(n_tiles=16, tile_size=32, shard_tiles=8, chunk_tiles=4, seed=2, years=(2019,))
    summary = build_in_process(BuildConfig(store=store, **opts))
    assert summary["complete"] == 16
    report = validate_store(store, deep=True)
    assert report["valid"], report["problems"]
    res = build_catalog(store, cat)
    assert res["n_items"] == 16 and res["collection"] == f"{cat}/collection.json"
    hits = search(cat, Query(year=(2019,), limit=100))
    assert hits.num_rows == 16
    fs = s3fs.S3FileSystem()
    names = {p.split("/", 1)[1] for p in fs.find("corpus")}
    assert {"demo.zarr/zarr.json", "demo.build/plan.parquet", "catalog/collection.json"} <= names
    assert "catalog/items.parquet" in names and any(n.startswith("catalog/quicklooks/") for n in names)

    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "model.pretrain", "--store", store, "--out", str(out), "--img-size", "32",
         "--batch-size", "4", "--steps", "3", "--workers", "2", "--no-progress"],
        env=os.environ | s3, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "model.safetensors").exists()
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) >= 4 and all(np.isfinite(float(r.split(",")[1])) for r in rows[1:])

    # credentials come from the environment and are written nowhere: not into the bucket, the run or
    # the store's attributes
    for key in fs.find("corpus"):
        assert SECRET.encode() not in fs.cat_file(key), key
    for p in out.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


def test_a_missing_bucket_is_named_before_anything_is_written(s3):
    import s3fs

    with pytest.raises(BuildInputError, match="bucket 'no-such-bucket' cannot be found"):
        build_in_process(BuildConfig(store="s3://no-such-bucket/c.zarr", n_tiles=8, tile_size=32))
    assert s3fs.S3FileSystem().ls("corpus") == []


@pytest.mark.slow
def test_dask_local_cluster_build_equals_the_serial_build(tmp_path, prefect_harness):
    opts = dict(n_tiles=48, tile_size=32, shard_tiles=8, chunk_tiles=4, seed=3, years=(2019, 2020))
    serial, dask = str(tmp_path / "serial.zarr"), str(tmp_path / "dask.zarr")
    build_in_process(BuildConfig(store=serial, **opts))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    summary = run_build(BuildConfig(store=dask, **opts), dask_workers=2, show_progress=False)
    assert summary["complete"] == 48 and summary["shards_exported"] == 6
    a, b = store_files(serial), store_files(dask)
    assert sorted(a) == sorted(b)
    assert not [k for k in a if a[k] != b[k]], "the Dask build differs from the serial one"
    assert CorpusReader(dask).statistics == CorpusReader(serial).statistics
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()]
    psutil.wait_procs(left, timeout=10)
    # multiprocessing's resource tracker serves this process until it exits; anything else is left over
    alive = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    alive = [p for p in alive if "resource_tracker" not in " ".join(p.cmdline())]
    assert not alive, [p.cmdline() for p in alive]
