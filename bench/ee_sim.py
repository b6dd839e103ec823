"""The Earth Engine path at full rate, against a simulated transport with real latency.

    python bench/ee_sim.py [--tiles 960] [--latency 1.0] [--cap 40]

Runs the real flow (Prefect, shards on threads, the earthengine source building and serialising real
``ee`` expressions offline) against :class:`SimulatedTransport` answering every request after
``--latency`` seconds, under the default cap of 40 requests in flight. Each tile takes two requests
(tile values with the one scene search, pixels of exactly the chosen scenes), so the cap-limited
maximum is ``cap / (2 * latency)`` tiles/s; the plan's RESOLVE labels come before, in batches of
1000 candidate locations (their requests are counted apart and per tile). Also replays
MMEarth's per-tile sequence: about 15 blocking calls (getInfo chains for scene choice, dates, S1
search, ERA5, labels) and one download, one after the other. Targets: >= 90 % of the cap-limited
maximum, and >= 10x the replay. Ends with ``bench: ee_sim cap_efficiency=<v> target=0.9 ok|short``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from flows.build_corpus import run_build  # noqa: E402
from mmearth_data.build import BuildConfig  # noqa: E402
from mmearth_data.registry import stored_modalities  # noqa: E402
from mmearth_data.sources.earthengine import (  # noqa: E402
    EEConfig,
    decode_values,
    pixels_request,
    register_transport,
    tile_values_expression,
)
from mmearth_data.testing.ee_fake import SimulatedTransport  # noqa: E402


def replay_mmearth(sim: SimulatedTransport, tiles: list, calls_per_tile: int = 15) -> float:
    """Tiles/s of a sequential per-tile chain: ``calls_per_tile`` blocking calls, then one download."""
    cfg = EEConfig()
    t0 = time.perf_counter()
    for t in tiles:
        expr = tile_values_expression(t, cfg)
        for _ in range(calls_per_tile):
            sim.compute_value(expr, t.tile_id)
        scene = decode_values(sim.values_answer(t.tile_id))
        sim.compute_pixels(pixels_request(t, stored_modalities(), scene), t.tile_id)
    return len(tiles) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=960)
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--cap", type=int, default=40)
    ap.add_argument("--replay-tiles", type=int, default=2)
    args = ap.parse_args()
    sim = SimulatedTransport(latency_s=args.latency)
    register_transport("bench", sim)
    store = f"{tempfile.mkdtemp(prefix='bench-ee-')}/ee.zarr"
    opts = {"transport": "bench", "max_in_flight": args.cap}
    cfg = BuildConfig(
        store=store,
        n_tiles=args.tiles,
        tile_size=128,
        source="earthengine",
        shard_tiles=64,
        source_options=opts,
    )
    t0 = time.perf_counter()
    summary = run_build(cfg, show_progress=False)
    wall = time.perf_counter() - t0
    export_s = sim.last_end - sim.first_start
    ours = args.tiles / export_s
    cap_max = args.cap / (2 * args.latency)
    from mmearth_data.sampling import SampleConfig, sample_plan
    from mmearth_data.sources.base import TileRequest

    plan = sample_plan(SampleConfig(args.replay_tiles, (2019,), 1, 128, 0))
    reqs = [TileRequest.from_row(r, 128) for _, r in plan.iterrows()][: args.replay_tiles]
    replay = replay_mmearth(SimulatedTransport(latency_s=args.latency), reqs)
    title = (
        f"Earth Engine simulation: {args.tiles} tiles of 128 px, latency {args.latency:g} s, cap {args.cap}"
    )
    print(f"| {title} | value |")
    print("|---|---:|")
    print(f"| tile requests sent (values + pixels, retries included) | {sim.total} |")
    print(f"| tile requests per tile | {sim.total / args.tiles:.2f} |")
    print(f"| RESOLVE labelling requests (locations labelled) | {sim.label_requests} ({sim.label_points}) |")
    print(f"| labelling requests per tile | {sim.label_requests / args.tiles:.3f} |")
    print(f"| peak requests in flight | {sim.peak} |")
    print(f"| seconds from first request to last answer | {export_s:.1f} |")
    print(f"| tiles/s achieved | {ours:.2f} |")
    print(f"| tiles/s cap-limited maximum (cap / 2 requests / latency) | {cap_max:.2f} |")
    print(f"| share of the maximum | {ours / cap_max:.0%} |")
    print(f"| MMEarth-style replay (15 blocking calls + 1 download per tile), tiles/s | {replay:.3f} |")
    print(f"| speed-up over the replay | {ours / replay:.0f}x |")
    print(f"| flow wall seconds (incl. Prefect start, plan, statistics) | {wall:.1f} |")
    print(f"| complete tiles | {summary['complete']}/{args.tiles} |")
    eff = ours / cap_max
    ok = eff >= 0.9 and ours / replay >= 10
    print(f"bench: ee_sim cap_efficiency={eff:.2f} target=0.9 {'ok' if ok else 'short'}")


if __name__ == "__main__":
    main()
