"""The Earth Engine source at its boundary: the expressions it builds (golden files, built offline from
earthengine-api's shipped algorithm table), its retry and cap logic, auth errors, and the whole flow
against a simulated transport that answers in computePixels' and computeValue's formats and fails on
a script."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mmearth_data.build import BuildConfig, BuildInputError, check_config, prepare
from mmearth_data.registry import stored_modalities
from mmearth_data.sources.base import SourceError, TileFailure, TileResult
from mmearth_data.sources.earthengine import (
    EarthEngineSource,
    EEAuthError,
    EEConfig,
    Limiter,
    PermanentError,
    register_transport,
    request_bytes,
    retryable,
    with_retries,
)
from mmearth_data.sources.ee_fake import SimulatedTransport, http_error
from mmearth_data.sources.ee_offline import offline_ee
from mmearth_data.store import CorpusReader
from mmearth_data.validate import validate_store

GOLDEN = Path(__file__).resolve().parent / "data" / "ee_golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402

MODS = stored_modalities()


@pytest.mark.parametrize("name", sorted(make_golden.LOCATIONS))
def test_requests_match_the_golden_files(name):
    with offline_ee():
        got = make_golden.dumps(make_golden.golden(name))
    want = (GOLDEN / f"{name}.json").read_text()
    assert got == want, (
        f"the recipe changed: run tests/data/ee_golden/make_golden.py and review the diff of {name}.json"
    )


def _text(name: str) -> str:
    return (GOLDEN / f"{name}.json").read_text()


def test_golden_requests_say_what_the_recipe_says():
    amazon = json.loads(_text("amazon_2019_l2a"))
    sahara = _text("sahara_2017_l1c")
    assert '"COPERNICUS/S2_SR_HARMONIZED"' in _text("amazon_2019_l2a")
    assert '"COPERNICUS/S2_HARMONIZED"' in sahara and "S2_SR_HARMONIZED" not in sahara
    assert '"CLOUDY_PIXEL_PERCENTAGE"' in sahara and '"2017-01-01"' in sahara and '"2018-01-01"' in sahara
    px = amazon["pixels"]
    t = amazon["tile"]
    assert px["fileFormat"] == "NUMPY_NDARRAY"
    assert px["grid"]["crsCode"] == f"EPSG:{t['epsg']}"
    assert px["grid"]["dimensions"] == {"width": 128, "height": 128}
    assert px["grid"]["affineTransform"]["translateX"] == t["transform"][2]
    assert px["grid"]["affineTransform"]["scaleY"] == -10.0
    assert len(px["bandIds"]) == sum(m.n_bands for m in MODS if m.kind == "pixel")
    assert px["bandIds"][:2] == ["sentinel2__B1", "sentinel2__B2"]
    text = _text("amazon_2019_l2a")
    tokens = ['"COPERNICUS/S1_GRD"', '"IW"', '"ASCENDING"', '"DESCENDING"', '"bilinear"', '"Terrain.slope"',
              '"ECMWF/ERA5_LAND/MONTHLY_AGGR"', '"GOOGLE/DYNAMICWORLD/V1"', '"ESA/WorldCover/v100"',
              '"RESOLVE/ECOREGIONS/2017"', '"BIOME_NUM"', '"ECO_ID"', '"QA60"']  # fmt: skip
    for token in tokens:
        assert token in text, token
    assert '"Collection.randomColumn"' in _text("alps_2020_random_scene")
    assert "randomColumn" not in text
    assert json.loads(_text("siberia_2018_tile64"))["pixels"]["grid"]["dimensions"]["width"] == 64


def test_request_size_is_kept_under_the_limit():
    assert request_bytes(MODS, 128) < 48 * 2**20
    src = EarthEngineSource(EEConfig(transport="unused"))
    with pytest.raises(SourceError, match="48 MB"):
        src.check(1024, MODS)


@pytest.mark.parametrize(
    "err,retry",
    [
        (http_error(429), True),
        (http_error(500), True),
        (http_error(503), True),
        (http_error(400), False),
        (http_error(403), False),
        (http_error(404), False),
        (TimeoutError("read timed out"), True),
        (ConnectionResetError(), True),
        (PermanentError("malformed"), False),
        (Exception("Too many concurrent aggregations."), True),
        (Exception("Image.load: Image asset 'x' not found."), False),
    ],
)
def test_which_failures_are_retried(err, retry):
    assert retryable(err) is retry


def test_backoff_is_bounded_exponential_with_jitter():
    cfg = EEConfig(max_retries=5, backoff_base_s=1.0, backoff_cap_s=8.0)
    waits = []
    calls = []

    def always_429():
        calls.append(1)
        raise http_error(429)

    with pytest.raises(Exception, match="429"):
        with_retries(always_429, cfg, Limiter(4), waits.append, random.Random(0))
    assert len(calls) == cfg.max_retries + 1 and len(waits) == cfg.max_retries
    nominal = [1, 2, 4, 8, 8]
    assert all(0.5 * n <= w < 1.5 * n for w, n in zip(waits, nominal, strict=True))
    calls.clear()

    def bad_request():
        calls.append(1)
        raise http_error(400)

    with pytest.raises(Exception, match="400"):
        with_retries(bad_request, cfg, Limiter(4), waits.append, random.Random(0))
    assert len(calls) == 1


def test_cap_on_requests_in_flight_is_never_exceeded():
    register_transport("cap-test", sim := SimulatedTransport(latency_s=0.05))
    src = EarthEngineSource(EEConfig(transport="cap-test", max_in_flight=5))
    src.limiter = Limiter(5)
    reqs = _requests(24)
    got = src.fetch(reqs, MODS)
    assert all(isinstance(r, TileResult) for r in got)
    assert sim.peak <= 5 and src.limiter.peak <= 5 and sim.peak >= 4
    r = got[0]
    assert r.arrays["sentinel2"].shape == (13, 64, 64) and r.arrays["sentinel2"].dtype == np.uint16
    assert r.arrays["sentinel1"].dtype == np.float16 and r.arrays["era5"].shape == (12,)


def _requests(n: int):
    from mmearth_data.sampling import SampleConfig, sample_plan
    from mmearth_data.sources.base import TileRequest

    plan = sample_plan(SampleConfig(n, (2019,), 0, 64, 0))
    return [TileRequest.from_row(row, 64) for _, row in plan.iterrows()][:n]


def test_every_failure_kind_becomes_an_accounted_failure():
    reqs = _requests(9)
    kinds = ["no_scene", "malformed", "missing_band", "http_500_always", "http_400", "http_429_twice",
             "timeout_once", None, None]  # fmt: skip
    plan = {r.tile_id: k for r, k in zip(reqs, kinds, strict=True) if k}
    register_transport("kinds", sim := SimulatedTransport(plan=plan))
    cfg = EEConfig(transport="kinds", max_retries=3, backoff_base_s=0.0)
    got = EarthEngineSource(cfg, sleep=lambda s: None).fetch(reqs, MODS)
    by = {r.tile_id: r for r in got}
    stage = {tid: (x.stage, x.reason) for tid, x in by.items() if isinstance(x, TileFailure)}
    ids = {k: r.tile_id for r, k in zip(reqs, kinds, strict=True) if k}
    assert stage[ids["no_scene"]][0] == "sentinel2" and "no scene" in stage[ids["no_scene"]][1]
    assert stage[ids["malformed"]][0] == "decode" and "not a structured" in stage[ids["malformed"]][1]
    assert stage[ids["missing_band"]][0] == "decode" and "missing" in stage[ids["missing_band"]][1]
    assert stage[ids["http_500_always"]] == ("values", "HTTP 500: Internal error")
    assert stage[ids["http_400"]][0] == "pixels" and stage[ids["http_400"]][1].startswith("HTTP 400")
    for ok in ("http_429_twice", "timeout_once"):
        assert isinstance(by[ids[ok]], TileResult), ok
    assert sim.calls[(ids["http_500_always"], "values")] == cfg.max_retries + 1  # bounded
    assert sim.calls[(ids["http_400"], "pixels")] == 1  # never retried
    assert sim.calls[(ids["http_429_twice"], "values")] == 3
    assert len(got) == len(reqs)


def test_missing_project_or_credentials_is_a_clear_input_error(tmp_path, monkeypatch):
    for var in (
        "EE_PROJECT",
        "GOOGLE_CLOUD_PROJECT",
        "EE_SERVICE_ACCOUNT_KEY",
        "GOOGLE_APPLICATION_CREDENTIALS",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no earthengine token, no gcloud ADC
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    store = str(tmp_path / "s.zarr")
    cfg = BuildConfig(store=store, n_tiles=8, source="earthengine")
    with pytest.raises(BuildInputError, match="--project"):
        check_config(cfg)
    cfg = BuildConfig(store=store, n_tiles=8, source="earthengine", source_options={"project": "p"})
    with pytest.raises(BuildInputError, match="no Earth Engine credentials"):
        check_config(cfg)
    bad = BuildConfig(store=store, n_tiles=8, source="earthengine",
                      source_options={"project": "p", "key_file": str(tmp_path / "none.json")})  # fmt: skip
    with pytest.raises(BuildInputError, match="does not exist"):
        check_config(bad)
    assert not Path(store).exists()
    with pytest.raises(EEAuthError):
        from mmearth_data.sources.earthengine import resolve_project

        resolve_project(EEConfig())


def test_flow_against_the_simulated_transport(tmp_path, prefect_harness):
    from flows.build_corpus import run_build

    sim = SimulatedTransport(latency_s=0.002, failure_share=0.25, burst_429=25, seed=1)
    register_transport("flow-sim", sim)
    secret = "/very/secret/key-file.json"
    opts = {"transport": "flow-sim", "backoff_base_s": 0.001, "max_retries": 4, "max_in_flight": 6,
            "key_file": secret, "project": "my-ee-project"}  # fmt: skip
    store = str(tmp_path / "ee.zarr")
    cfg = BuildConfig(store=store, n_tiles=48, tile_size=64, seed=4, shard_tiles=16, reserve=3,
                      source="earthengine", source_options=opts)  # fmt: skip
    summary = run_build(cfg, workers=3, show_progress=False)
    assert summary["complete"] == 48
    report = validate_store(store)
    assert report["valid"], report
    failures = json.loads((tmp_path / "ee.build" / "failures.json").read_text())
    failed_ids = {f["tile_id"] for f in failures}
    planned = {sim_id for (sim_id, _kind) in sim.calls}
    permanent = {t for t in planned if sim.failure_of(t) in
                 ("no_scene", "malformed", "missing_band", "http_500_always", "http_400")}  # fmt: skip
    # every failure accounted for: the scripted permanent ones, plus tiles whose retries the 429 burst
    # exhausted (bounded retries), nothing else
    burst = {f["tile_id"] for f in failures if f["reason"].startswith("HTTP 429")}
    assert permanent and failed_ids == permanent | burst
    assert len(burst) <= 3
    assert summary["failed_attempts"] == len(failures) and 1 <= summary["backfilled"] <= len(failures)
    stored = set(CorpusReader(store).tiles()["tile_id"])
    assert not stored & failed_ids
    assert max(sim.calls.values()) <= 4 + 1
    assert sim.peak <= 6
    # no secret anywhere in what the build wrote
    for f in Path(tmp_path).rglob("*"):
        if f.is_file() and f.suffix in (".json", ".parquet", "") and f.stat().st_size < 5_000_000:
            assert secret.encode() not in f.read_bytes(), f
    attrs = json.dumps(CorpusReader(store).attrs)
    assert "my-ee-project" in attrs and secret not in attrs


def test_prepare_records_the_recipe_not_the_credentials(tmp_path):
    register_transport("prep", SimulatedTransport())
    store = str(tmp_path / "p.zarr")
    opts = {"transport": "prep", "key_file": "/k.json", "max_gap_days": 12}
    prepare(BuildConfig(store=store, n_tiles=8, tile_size=64, source="earthengine", source_options=opts))
    src = CorpusReader(store).attrs["build"]["source"]
    assert src["source"] == "earthengine" and src["max_gap_days"] == 12 and "key_file" not in src


def test_limiter_counts_under_threads():
    lim = Limiter(3)
    seen = []

    order = []

    def work(k):
        with lim.slot((k,)):
            seen.append(lim.in_flight)
            order.append(k)
            time.sleep(0.03)

    threads = [threading.Thread(target=work, args=(20 - k,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(seen) <= 3 and lim.peak == 3 and lim.requests == 20
    # one at a time: once queued, lower priorities go first
    lim = Limiter(1)
    order.clear()
    threads = [threading.Thread(target=work, args=(20 - k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order[1:] == sorted(order[1:]) and len(order) == 8


def test_cli_keeps_the_key_path_out_of_the_flow_parameters(monkeypatch):
    from flows.cli import build_parser, ee_options

    monkeypatch.delenv("EE_SERVICE_ACCOUNT_KEY", raising=False)
    args = build_parser().parse_args(
        ["build", "--source", "earthengine", "--tiles", "4", "--store", "x.zarr", "--project", "p",
         "--ee-key", "/secret/key.json"]
    )  # fmt: skip
    opts = ee_options(args)
    assert "/secret/key.json" not in json.dumps(opts) and opts["project"] == "p"
    import os

    assert os.environ["EE_SERVICE_ACCOUNT_KEY"] == "/secret/key.json"
