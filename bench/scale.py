"""Scale-out: the same offline corpus built serially, on the flow's process pool and on a Dask
LocalCluster; and the planner at MMEarth's scale (1.2M tiles, time and peak memory).

    python bench/scale.py [--tiles 256] [--tile-size 64] [--workers 2] [--plan-tiles 1200000]

Every build writes the same corpus (checked byte for byte against the serial one, history times
aside). Rates are over the whole flow (plan, export, statistics), without the Prefect server's start,
which the three share. The planner runs in a process of its own so that its peak resident memory is
its own. Ends with ``bench: scale dask_vs_serial=<x> target=<t> ok|short`` (baseline: the serial
in-process build of the same corpus, this process); target: 0.75 x the worker count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from flows.build_corpus import build_corpus, prefect_api, task_runner_for  # noqa: E402
from mmearth_data.build import BuildConfig, build_in_process  # noqa: E402

PLAN_SCRIPT = """
import io, json, resource, sys, time
from mmearth_data.sampling import SampleConfig, sample_plan
n = int(sys.argv[1])
t0 = time.perf_counter()
plan = sample_plan(SampleConfig(n, (2017, 2018, 2019, 2020), 0, 128, 2))
t1 = time.perf_counter()
buf = io.BytesIO()
plan.to_parquet(buf)
t2 = time.perf_counter()
print(json.dumps({"rows": len(plan), "plan_s": t1 - t0, "parquet_s": t2 - t1, "parquet_mb": buf.tell() / 1e6,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def files(path: str) -> dict[str, bytes]:
    out = {}
    for d, _, fs in os.walk(path):
        for f in fs:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    root = json.loads(out["zarr.json"])
    for h in root["attributes"].get("history", []):
        h["started"] = h["finished"] = None
    out["zarr.json"] = json.dumps(root, sort_keys=True).encode()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--tile-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--plan-tiles", type=int, default=1_200_000, help="0: skip the planner row")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    opts = dict(n_tiles=args.tiles, tile_size=args.tile_size, shard_tiles=16, seed=1)
    rates, same = {}, {}
    serial = f"{tmp}/serial.zarr"
    s = build_in_process(BuildConfig(store=serial, **opts))
    rates["serial, in process (baseline)"] = s["tiles_exported"] / s["seconds"]
    reference = files(serial)
    with prefect_api():
        for label, kw in (
            (f"Prefect flow, process pool of {args.workers}", {"workers": args.workers}),
            (f"Prefect flow, Dask LocalCluster of {args.workers}", {"dask_workers": args.workers}),
        ):
            cfg = BuildConfig(store=f"{tmp}/{len(rates)}.zarr", **opts)
            runner = task_runner_for(cfg, **kw)
            r = build_corpus.with_options(task_runner=runner)(cfg, show_progress=False)
            rates[label] = r["tiles_exported"] / r["seconds"]
            same[label] = files(cfg.store) == reference
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.tiles} tiles of {args.tile_size} px\n"
    )
    print("| build | tiles/s | vs serial | store identical to serial |\n|---|---:|---:|---|")
    base = rates["serial, in process (baseline)"]
    for label, rate in rates.items():
        ident = "-" if label not in same else ("yes" if same[label] else "NO")
        print(f"| {label} | {rate:.1f} | {rate / base:.2f} | {ident} |")
    if args.plan_tiles:
        t0 = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-c", PLAN_SCRIPT, str(args.plan_tiles)],
            capture_output=True,
            text=True,
            check=True,
        )
        p = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"\n| planner, {args.plan_tiles:,} tiles x 3 candidates | value |\n|---|---:|")
        print(f"| sample plan | {p['plan_s']:.0f} s |")
        print(f"| plan.parquet ({p['parquet_mb']:.0f} MB) | {p['parquet_s']:.0f} s |")
        print(f"| peak resident memory | {p['peak_gb']:.2f} GB |")
        print(f"| wall incl. start | {time.perf_counter() - t0:.0f} s |")
    shutil.rmtree(tmp, ignore_errors=True)
    dask = rates[f"Prefect flow, Dask LocalCluster of {args.workers}"] / base
    target = 0.75 * args.workers
    ok = dask >= target and all(same.values())
    print(
        f"bench: scale dask_vs_serial={dask:.2f} target={target:g} (baseline: serial in-process build, same "
        f"corpus) {'ok' if ok else 'short'}"
    )


if __name__ == "__main__":
    main()
