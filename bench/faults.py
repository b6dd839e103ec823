"""Build throughput under injected transient faults (0 %, 10 %, 30 %), offline source, in one process.

    python bench/faults.py [--tiles 256] [--tile-size 64]

Each row builds a fresh store of ``--tiles`` tiles through ``build_in_process`` with
``--faults transient=<rate>`` and reports tiles/s, the share of tile requests that were retried and
the throughput relative to the fault-free row. A transient failure of the offline source is answered
before any tile is generated, so a retry costs one more request round, not one more tile: the loss of
throughput should stay well under the retried share. The baseline is the same build without faults.

Ends with ``bench: faults throughput_at_30pct=<ratio to 0 %> target=>=0.7 ok|short``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mmearth_data.build import BuildConfig, build_dir, build_in_process


def one(rate: float, tiles: int, size: int) -> dict:
    store = f"{tempfile.mkdtemp(prefix='bench-faults-')}/s.zarr"
    opts = {"faults": f"transient={rate},seed=1"} if rate else {}
    t0 = time.perf_counter()
    s = build_in_process(BuildConfig(store=store, n_tiles=tiles, tile_size=size, seed=4, source_options=opts))
    dt = time.perf_counter() - t0
    failures = json.loads((Path(build_dir(store)) / "failures.json").read_text())
    retried = sum(1 for f in failures if f.get("action") == "retried")
    return {"rate": rate, "seconds": dt, "tiles_per_s": tiles / dt, "complete": s["complete"],
            "retried_share": retried / (tiles + retried)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--tile-size", type=int, default=64)
    a = ap.parse_args()
    one(0.0, 32, a.tile_size)  # warm-up (imports, world layers), not reported
    rows = [one(r, a.tiles, a.tile_size) for r in (0.0, 0.1, 0.3)]
    base = rows[0]["tiles_per_s"]
    print("| transient faults | seconds | tiles/s | retried share of requests | vs 0 % | complete |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rate']:.0%} | {r['seconds']:.1f} | {r['tiles_per_s']:.1f} | {r['retried_share']:.1%} | "
              f"{r['tiles_per_s'] / base:.2f} | {r['complete']}/{a.tiles} |")  # fmt: skip
    ratio = rows[-1]["tiles_per_s"] / base
    print(f"bench: faults throughput_at_30pct={ratio:.2f} target=>=0.7 {'ok' if ratio >= 0.7 else 'short'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
