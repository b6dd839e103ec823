"""The Prefect flow end to end: shards as tasks, backfill from alternates, bounded retries."""

import numpy as np
import zarr

from flows.build_corpus import run_build
from mmearth_data import build
from mmearth_data.build import BuildConfig
from mmearth_data.sampling import SampleConfig, sample_plan
from mmearth_data.sources.base import TileFailure
from mmearth_data.sources.offline import OfflineSource
from mmearth_data.validate import validate_store


class FlakySource(OfflineSource):
    """Offline source that has no scene for some tiles (by id hash) and fails its first call."""

    calls = 0
    fail: set = set()

    def fetch(self, tiles, modalities):
        FlakySource.calls += 1
        if FlakySource.calls == 1:
            raise ConnectionError("transient outage")
        out = []
        for t in tiles:
            if t.tile_id in FlakySource.fail:
                out.append(TileFailure(t.tile_id, "sentinel2", "no scene below the cloud threshold"))
            else:
                out += super().fetch([t], modalities)
        return out


def test_flow_builds_valid_store_with_backfill_and_retries(tmp_path, prefect_harness, monkeypatch):
    monkeypatch.setattr(build, "make_source", lambda name, **kw: FlakySource(seed=kw.get("seed", 0)))
    FlakySource.calls = 0
    plan = sample_plan(SampleConfig(24, (2019, 2020), 0, 32, 2))
    FlakySource.fail = set(plan[(plan["rank"] == 0) & (plan["slot"] % 3 == 0)]["tile_id"])
    cfg = BuildConfig(
        store=str(tmp_path / "f.zarr"), n_tiles=24, tile_size=32, shard_tiles=8, years=(2019, 2020)
    )
    summary = run_build(cfg, workers=1, show_progress=False)
    assert summary["complete"] == 24
    assert summary["shards_exported"] == 3
    assert summary["backfilled"] == len(FlakySource.fail) == 8
    assert summary["failed_attempts"] == 8
    assert "sentinel2: no scene below the cloud threshold" in summary["failure_reasons"]
    assert FlakySource.calls > 3  # the shard whose first call failed was retried by Prefect
    assert validate_store(cfg.store)["valid"]
    ids = np.asarray(zarr.open_group(cfg.store)["tile_id"][:]).tolist()
    assert not FlakySource.fail & set(ids), "a failed tile reached the store"


def test_flow_resumes_without_redoing_complete_shards(tmp_path, prefect_harness):
    cfg = BuildConfig(store=str(tmp_path / "r.zarr"), n_tiles=16, tile_size=32, shard_tiles=8, years=(2020,))
    first = run_build(cfg, workers=1, show_progress=False)
    assert first["shards_exported"] == 2 and not first["resumed"]
    again = run_build(cfg, workers=1, show_progress=False)
    assert again["shards_exported"] == 0 and again["resumed"] and again["complete"] == 16
