"""The Earth Engine source at its transport boundary: retries and their classification (HttpErrors
and the EEExceptions ``ee.data`` really raises, with the service's texts), the cap on requests in
flight, ``ee``'s own retries off and a connection pool as large as the cap, auth errors, RESOLVE
labelling of the plan, and the whole flow against a simulated transport that answers in
computePixels' and computeValue's formats, checks every request as the service would, and fails on a
script."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mmearth_data.build import BuildConfig, BuildInputError, check_config, prepare
from mmearth_data.registry import stored_modalities
from mmearth_data.sampling import SampleConfig, primaries, sample_plan, stratum_counts
from mmearth_data.sources import earthengine
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
from mmearth_data.store import CorpusReader
from mmearth_data.testing.ee_fake import EE_MESSAGES, SimulatedTransport, ee_exception, http_error
from mmearth_data.validate import validate_store

MODS = stored_modalities()


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


@pytest.mark.parametrize(
    "key,retry",
    [("quota", True), ("concurrent", True), ("internal", True), ("unavailable", True), ("deadline", True),
     ("timed_out", True), ("user_memory", False), ("invalid", False), ("bad_band", False),
     ("too_large", False)],
)  # fmt: skip
def test_ee_exceptions_are_classified_by_the_services_texts(key, retry):
    err = ee_exception(EE_MESSAGES[key])
    assert type(err).__name__ == "EEException" and not hasattr(err, "resp")
    assert retryable(err) is retry, EE_MESSAGES[key]


def test_ee_retries_are_off_and_the_pool_holds_the_cap(monkeypatch):
    import ee

    seen = {}
    monkeypatch.setattr(earthengine, "credentials", lambda cfg: (object(), "test"))
    monkeypatch.setattr(ee, "Initialize", lambda *a, **k: seen.update(k))
    monkeypatch.setattr(ee.data, "setMaxRetries", lambda n: seen.update(max_retries=n))
    t = earthengine.EETransport(EEConfig(project="p", max_in_flight=40))
    assert seen["max_retries"] == 0 and seen["http_transport"] is t.http
    assert seen["url"] == earthengine.HIGH_VOLUME_URL and seen["project"] == "p"
    adapter = t.http.session.get_adapter("https://earthengine-highvolume.googleapis.com")
    assert adapter.poolmanager.connection_pool_kw["maxsize"] == 40


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
    assert r.extra["s2_id"] and set(r.extra["s1_ids"]) == {"asc", "desc"}
    assert r.arrays["sentinel1"].dtype == np.float16 and r.arrays["era5"].shape == (12,)


def _requests(n: int):
    from mmearth_data.sampling import SampleConfig, sample_plan
    from mmearth_data.sources.base import TileRequest

    plan = sample_plan(SampleConfig(n, (2019,), 0, 64, 0))
    return [TileRequest.from_row(row, 64) for _, row in plan.iterrows()][:n]


@pytest.mark.parametrize("ee_errors", [False, True])
def test_every_failure_kind_becomes_an_accounted_failure(ee_errors):
    reqs = _requests(9)
    kinds = ["no_scene", "malformed", "missing_band", "http_500_always", "http_400", "http_429_twice",
             "timeout_once", None, None]  # fmt: skip
    plan = {r.tile_id: k for r, k in zip(reqs, kinds, strict=True) if k}
    register_transport("kinds", sim := SimulatedTransport(plan=plan, ee_errors=ee_errors))
    cfg = EEConfig(transport="kinds", max_retries=3, backoff_base_s=0.0)
    got = EarthEngineSource(cfg, sleep=lambda s: None).fetch(reqs, MODS)
    by = {r.tile_id: r for r in got}
    stage = {tid: (x.stage, x.reason) for tid, x in by.items() if isinstance(x, TileFailure)}
    ids = {k: r.tile_id for r, k in zip(reqs, kinds, strict=True) if k}
    assert (
        stage[ids["no_scene"]][0] == "sentinel2"
        and "scene of 2019 covers the tile" in stage[ids["no_scene"]][1]
    )
    assert stage[ids["malformed"]][0] == "decode" and "not a structured" in stage[ids["malformed"]][1]
    assert stage[ids["missing_band"]][0] == "decode" and "missing" in stage[ids["missing_band"]][1]
    kind = "EEException" if ee_errors else "HTTP 500"
    assert stage[ids["http_500_always"]] == ("values", f"{kind}: {EE_MESSAGES['internal']}")
    assert stage[ids["http_400"]][0] == "pixels" and "did not match any bands" in stage[ids["http_400"]][1]
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
    with pytest.raises(BuildInputError, match="`project`"):  # the library's term; the CLI's is --project
        check_config(cfg)
    cfg = BuildConfig(store=store, n_tiles=8, source="earthengine", source_options={"project": "p"})
    with pytest.raises(BuildInputError, match="no Earth Engine credentials"):
        check_config(cfg)
    bad = BuildConfig(store=store, n_tiles=8, source="earthengine",
                      source_options={"project": "p", "key_file": str(tmp_path / "none.json")})  # fmt: skip
    with pytest.raises(BuildInputError, match="does not exist"):
        check_config(bad)
    key = tmp_path / "key.json"
    key.write_text("{not json")
    bad = BuildConfig(store=store, n_tiles=8, source="earthengine",
                      source_options={"project": "p", "key_file": str(key)})  # fmt: skip
    with pytest.raises(BuildInputError, match="not a service-account key file"):
        check_config(bad)
    assert not Path(store).exists()
    with pytest.raises(EEAuthError):
        from mmearth_data.sources.earthengine import resolve_project

        resolve_project(EEConfig())


def test_resolve_labels_are_asked_in_batches_and_decoded(monkeypatch):
    monkeypatch.setattr(earthengine, "LABEL_BATCH", 50)
    register_transport("labels", sim := SimulatedTransport(label_failures=2))
    src = EarthEngineSource(EEConfig(transport="labels", backoff_base_s=0.0), sleep=lambda s: None)
    plan = primaries(sample_plan(SampleConfig(140, (2019,), 3, 64, 0)))
    lat, lon = plan["lat"].to_numpy(), plan["lon"].to_numpy()
    got = src.label_locations(lat, lon)
    assert got.shape == (140, 3) and sim.label_points == 140
    assert sim.label_requests == 3 + 2  # three batches, two 503s retried
    inside = got[:, 0] > 0
    agree = (got[inside, 0] == plan["biome"].to_numpy()[inside]).mean()
    assert 0.7 < agree < 1.0  # the simulated RESOLVE disagrees with the proxy map on some points
    assert ((got[:, 0] >= 1) & (got[:, 0] <= 14) | (got[:, 0] == -1)).all()
    register_transport("labels-down", SimulatedTransport(label_failures=100))
    down = EarthEngineSource(
        EEConfig(transport="labels-down", backoff_base_s=0.0, max_retries=2), sleep=lambda s: None
    )
    with pytest.raises(SourceError, match="labelling 140 locations .* failed .*unavailable"):
        down.label_locations(lat, lon)


def test_plan_strata_are_resolves_not_the_proxy_maps():
    register_transport("plan-labels", SimulatedTransport(label_noise=0.3, label_outside=0.05))
    src = EarthEngineSource(EEConfig(transport="plan-labels"))
    plan = sample_plan(SampleConfig(112, (2019, 2020), 5, 64, 1), labeler=src.label_locations)
    p = primaries(plan)
    again = src.label_locations(plan["lat"].to_numpy(), plan["lon"].to_numpy())
    assert (plan["biome"].to_numpy() == again[:, 0]).all()  # every planned tile carries RESOLVE's biome
    assert (plan["ecoregion"].to_numpy() == again[:, 1]).all()
    counts = stratum_counts(plan)
    assert counts.to_numpy().min() == counts.to_numpy().max() == 4  # balanced on RESOLVE's labels
    assert len(p) == 112 and plan.attrs["labels"]["outside"] > 0 and plan.attrs["labels"]["other_biome"] > 0
    proxy = sample_plan(SampleConfig(112, (2019, 2020), 5, 64, 1))
    assert set(proxy["tile_id"]) != set(plan["tile_id"])


def test_flow_against_the_simulated_transport(tmp_path, prefect_harness):
    from flows.build_corpus import run_build

    # 15 answers of 429 can exhaust the retries (5 attempts) of at most 3 tiles, however the threads
    # interleave: the bound below holds by construction, not by timing
    sim = SimulatedTransport(latency_s=0.002, failure_share=0.25, burst_429=15, seed=1, label_failures=3)
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
    planned = {sim_id for (sim_id, kind) in sim.calls if kind != "labels"}
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
    assert max(v for (_, kind), v in sim.calls.items() if kind != "labels") <= 4 + 1
    assert sim.peak <= 6
    # no secret anywhere in what the build wrote
    for f in Path(tmp_path).rglob("*"):
        if f.is_file() and f.suffix in (".json", ".parquet", "") and f.stat().st_size < 5_000_000:
            assert secret.encode() not in f.read_bytes(), f
    attrs = json.dumps(CorpusReader(store).attrs)
    assert "my-ee-project" in attrs and secret not in attrs
    # biome labels are RESOLVE's (the plan's, labelled once and cached), and so are the stored ones
    reader = CorpusReader(store)
    tiles = reader.tiles()
    import geopandas as gpd

    plan = gpd.read_parquet(tmp_path / "ee.build" / "plan.parquet").set_index("tile_id")
    assert (tiles["biome"].to_numpy() == plan.loc[tiles["tile_id"], "biome"].to_numpy()).all()
    assert (tmp_path / "ee.build" / "labels.parquet").exists() and reader.attrs["build"]["plan_labels"][
        "outside"
    ] >= 0
    # provenance of every tile: the scene ids the values answers named, the Sentinel-1 passes
    for _, row in tiles.iterrows():
        answer = sim._answers[row["tile_id"]]
        assert row["s2_id"] == answer["s2_id"] and row["cloud_score_source"] == "cloud_score_plus"
        assert row["cloud_fraction"] == pytest.approx(answer["s2_cloud"] / 100, rel=1e-5)
        for orbit in ("asc", "desc"):
            ids = answer[f"s1_{orbit}"]["ids"]
            assert row[f"s1_ids_{orbit}"] == ",".join(ids)
            assert np.isnan(row[f"s1_gap_days_{orbit}"]) == (not ids)
    calls_before = dict(sim.calls)
    prepare(cfg)  # a resume plans from the cached labels: no labelling request
    assert sum(v for (t, k), v in sim.calls.items() if k == "labels") == sum(
        v for (t, k), v in calls_before.items() if k == "labels"
    )


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
    # one at a time: once queued, lower priorities go first (the slot is held until all seven are queued,
    # so the order does not depend on how fast the threads start)
    lim = Limiter(1)
    order.clear()
    release = threading.Event()

    def holder():
        with lim.slot((0,)):
            order.append(0)
            release.wait(10)

    first = threading.Thread(target=holder)
    first.start()
    threads = [threading.Thread(target=work, args=(20 - k,)) for k in range(7)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(lim._waiting) < 7 and time.monotonic() < deadline:
        time.sleep(0.005)
    release.set()
    for t in [first, *threads]:
        t.join()
    assert order == [0, 14, 15, 16, 17, 18, 19, 20]


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


# --- ee-check ------------------------------------------------------------------------------------------
def test_ee_check_runs_its_physical_checks_end_to_end_on_the_offline_world(tmp_path):
    from mmearth_data.ee_check import run_ee_check

    lines = []
    checks, info = run_ee_check({"seed": 1}, simulate=True, keep=str(tmp_path), say=lines.append)
    assert len(lines) == 4 and all(line.startswith("(simulated)") for line in lines)
    assert len(checks) == 6 and all(c.passed for c in checks), checks
    tiles = CorpusReader(info["store"]).tiles()
    assert len(tiles) == 4 and tiles["complete"].all() and (tiles["s2_id"] != "").all()
    # the catalog carries the provenance (validated against the item schema on the way)
    import pyarrow.parquet as pq
    from stac_geoparquet.arrow import stac_table_to_items

    from catalog.build import build_catalog

    build_catalog(info["store"], str(tmp_path / "cat"), quicklooks="none")
    items = stac_table_to_items(pq.read_table(tmp_path / "cat" / "items.parquet"))
    props = {it["id"]: it["properties"] for it in items}
    for _, row in tiles.iterrows():
        p = props[row["tile_id"]]
        assert p["mmearth:s2_id"] == row["s2_id"] and p["mmearth:cloud_score_source"] == "cloud_score_plus"
        for orbit in ("asc", "desc"):
            ids = row[f"s1_ids_{orbit}"]
            assert p[f"mmearth:s1_ids_{orbit}"] == (ids.split(",") if ids else None)
            if ids:
                assert p[f"mmearth:s1_gap_days_{orbit}"] == pytest.approx(
                    row[f"s1_gap_days_{orbit}"], abs=0.01
                )


def test_ee_check_fails_on_swapped_polarisations_and_flat_slope():
    from dataclasses import replace

    from mmearth_data.ee_check import CHECK_TILES, check_tiles, physical_checks
    from mmearth_data.sources.offline import OfflineSource
    from mmearth_data.world import get_world

    w = get_world()
    reqs = [replace(q, biome=int(w.biome([q.lat], [q.lon])[0]), ecoregion=1) for q in check_tiles()]
    res = OfflineSource(seed=1).fetch(reqs, MODS)
    tiles = {
        name: {"request": q, "arrays": dict(r.arrays), "s2_product": r.s2_product,
               "s1_ids": {o: "id" if on else "" for o, on in r.extra["s1_orbits"].items()}}
        for name, q, r in zip(CHECK_TILES, reqs, res, strict=True)
    }  # fmt: skip
    assert [c.name for c in physical_checks(tiles) if not c.passed] == []
    for t in tiles.values():  # VV data stored as VH and the other way round
        s1 = t["arrays"]["sentinel1"].copy()
        s1[[0, 1, 4, 5]] = s1[[1, 0, 5, 4]]
        t["arrays"]["sentinel1"] = s1
    dem = tiles["mountains"]["arrays"]["dem"].copy()
    dem[1] = dem[1][::-1, ::-1]  # slope from another place
    tiles["mountains"]["arrays"]["dem"] = dem
    failed = {c.name for c in physical_checks(tiles) if not c.passed}
    assert any(n.startswith("VV above VH") for n in failed) and any(n.startswith("slope") for n in failed)


def test_ee_check_without_network_or_credentials_exits_2_before_writing(tmp_path, monkeypatch, capsys):
    from flows.cli import main
    from mmearth_data.ee_check import EECheckError, reach

    with pytest.raises(EECheckError, match="cannot reach Earth Engine at 127.0.0.1:9"):
        reach("127.0.0.1", 9, timeout_s=2)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    for var in ("EE_SERVICE_ACCOUNT_KEY", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(var, raising=False)
    assert main(["ee-check", "--project", "p"]) == 2
    assert "no Earth Engine credentials" in capsys.readouterr().err
    monkeypatch.setattr(earthengine, "credentials", lambda cfg: (object(), "test"))
    monkeypatch.setattr("mmearth_data.ee_check.HOST_OVERRIDE", ("127.0.0.1", 9))
    t0 = time.perf_counter()
    assert main(["ee-check", "--project", "p", "--keep", str(tmp_path / "kept")]) == 2
    err = capsys.readouterr().err  # the source's own check or ee-check's probe, whichever asks first
    assert "cannot reach" in err and "earth" in err.lower() and time.perf_counter() - t0 < 30
    assert not (tmp_path / "kept").exists()


def test_eecu_is_summed_from_the_profile_table():
    from mmearth_data.ee_check import eecu_from_profile

    text = (
        " EECU·s PeakMem Count  Description\n"
        "  1.250    812k    16  Algorithm Image.reduceRegion\n"
        "  0.410    2.1M    48  Loading assets: COPERNICUS/S2_SR_HARMONIZED/(...)\n"
        "  0.020    120k   300  (plumbing)\n"
    )
    assert eecu_from_profile(text) == pytest.approx(1.68)
    assert eecu_from_profile("no profile here") is None


def test_build_without_network_exits_2_before_writing(tmp_path, monkeypatch, capsys):
    import socket

    from flows.cli import main

    monkeypatch.setattr(earthengine, "credentials", lambda cfg: (object(), "test"))
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    asked = []

    def unreachable(addr, timeout=None):
        asked.append(addr)
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    store = tmp_path / "ee.zarr"
    t0 = time.perf_counter()
    assert (
        main(["build", "--source", "earthengine", "--project", "p", "--tiles", "8", "--store", str(store)])
        == 2
    )
    err = capsys.readouterr().err
    assert "cannot reach earthengine-highvolume.googleapis.com" in err and "nothing was written" in err
    assert time.perf_counter() - t0 < 10 and asked[0] == ("earthengine-highvolume.googleapis.com", 443)
    assert list(tmp_path.iterdir()) == []  # no store, no .build folder
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")  # the proxy is what must answer
    asked.clear()
    assert (
        main(["build", "--source", "earthengine", "--project", "p", "--tiles", "8", "--store", str(store)])
        == 2
    )
    assert asked[0] == ("proxy.local", 3128) and "through the proxy" in capsys.readouterr().err


def test_no_planted_secret_reaches_any_output(tmp_path, prefect_harness, monkeypatch, capfd):
    """Secrets in the environment and the key file's path and contents appear in no file the build,
    the catalog or pretraining writes (store, artifacts, catalog, checkpoints, TensorBoard, Prefect's
    home) and in nothing printed."""
    import os

    from catalog.build import build_catalog
    from flows.build_corpus import run_build
    from model.pretrain import main as pretrain_main

    marker = "PLANTED-SECRET-7f3a9c"
    key = tmp_path / f"key-{marker}.json"
    key.write_text(json.dumps({"type": "service_account", "private_key": f"-----{marker}-----",
                               "client_email": f"{marker}@p.iam.gserviceaccount.com"}))  # fmt: skip
    monkeypatch.setenv("EE_SERVICE_ACCOUNT_KEY", str(key))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("MMEARTH_TEST_TOKEN", marker)
    register_transport("secret-sim", SimulatedTransport(latency_s=0.0, seed=2))
    opts = {"transport": "secret-sim", "key_file": str(key), "project": "p", "backoff_base_s": 0.001}
    store = str(tmp_path / "out" / "s.zarr")
    cfg = BuildConfig(store=store, n_tiles=16, tile_size=64, seed=4, shard_tiles=16, source="earthengine",
                      source_options=opts)  # fmt: skip
    assert run_build(cfg, workers=1, show_progress=False)["complete"] == 16
    build_catalog(store, tmp_path / "out" / "catalog", quicklooks="all")
    args = ["--store", store, "--out", str(tmp_path / "out" / "run"), "--img-size", "32", "--batch-size", "4"]
    assert pretrain_main(["--no-progress", "--workers", "0", "--steps", "1", *args]) == 0
    printed = capfd.readouterr()
    assert marker not in printed.out + printed.err
    roots = [tmp_path / "out", Path(os.environ["PREFECT_HOME"])]
    scanned = 0
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file():
                scanned += 1
                assert marker.encode() not in f.read_bytes(), f
    assert scanned > 50
