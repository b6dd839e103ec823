"""Step time and samples/s of MP-MAE pretraining (atto, all 11 targets), CPU here and CUDA when present.

    python bench/train.py [--steps 6] [--batch-size 32]          # CPU: 56 px / patch 8 and 112 px / patch 16
    python bench/train.py --device cuda --batch-size 256 --workers 8

Each configuration trains on a store built for it (64 px tiles for 56 px crops, 128 px tiles for 112 px
crops) through the real loader (``model.data.StreamingCorpus`` + DataLoader), and reports the median
step time, samples/s and the share of the step spent waiting for data. On CUDA it uses bf16 autocast;
the target there is that the loader keeps the GPU busy >= 90 % of the time with at most 8 workers.
On CPU the reference is MMEarth-train's dense FCMAE (atto, 112 px, patch 16, batch 32): ~4.8 s/step
on this 2-core machine. Ends with ``bench: train <metric>=<value> target=<value> ok|short``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from mmearth_data.build import BuildConfig, build_in_process
from model.data import StreamingCorpus
from model.mpmae import MPMAE, select_pretext

MMEARTH_CPU_STEP_S = 4.8  # MMEarth-train, atto, 112 px, patch 16, batch 32, this machine


def build(tile_size: int, n: int) -> str:
    store = f"{tempfile.mkdtemp(prefix='bench-train-')}/s.zarr"
    cfg = BuildConfig(store=store, n_tiles=n, tile_size=tile_size, seed=9)
    build_in_process(cfg)
    return store


def measure(store, img, patch, batch, steps, device, workers, decoder) -> dict:
    targets = select_pretext("all")
    torch.manual_seed(0)
    model = MPMAE(targets, "atto", patch, decoder=decoder).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    ds = StreamingCorpus(store, targets, img, split=None, seed=0, shuffle_buffer=max(256, batch))
    dl = DataLoader(
        ds,
        batch_size=batch,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
    it = iter(dl)
    cuda = device.type == "cuda"
    ctx = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if cuda
        else (lambda: torch.autocast("cpu", enabled=False))
    )
    times, waits = [], []
    for step in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        b = next(it)
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        with ctx():
            loss, _ = model(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step >= 2:
            times.append(t2 - t0)
            waits.append(t1 - t0)
    step_s = statistics.median(times)
    return {"step_s": step_s, "samples_s": batch / step_s, "wait": sum(waits) / sum(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 256 on CUDA")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workers", type=int, default=None, help="default: 0 on CPU, 8 on CUDA")
    ap.add_argument("--tiles", type=int, default=None, help="tiles per store (default: 128 CPU, 2048 CUDA)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (256 if cuda else 32)
    workers = args.workers if args.workers is not None else (8 if cuda else 0)
    tiles = args.tiles or (2048 if cuda else 128)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    configs = [(64, 56, 8, "shared"), (128, 112, 16, "shared"), (128, 112, 16, "per-modality")]
    stores = {}
    rows = []
    for tile, img, patch, decoder in configs:
        if tile not in stores:
            stores[tile] = build(tile, tiles)
        r = measure(stores[tile], img, patch, batch, args.steps, device, workers, decoder)
        rows.append((img, patch, decoder, r))
    print(f"| {name}: atto, all targets, batch {batch}, {workers} workers | step s | samples/s | data wait |")
    print("|---|---:|---:|---:|")
    for img, patch, decoder, r in rows:
        print(
            f"| {img} px, patch {patch}, {decoder} decoder | {r['step_s']:.3f} | {r['samples_s']:.1f} "
            f"| {100 * r['wait']:.0f} % |"
        )
    if cuda:
        busy = 1 - max(r["wait"] for *_, r in rows)
        print(f"bench: train gpu_busy={busy:.2f} target=0.9 {'ok' if busy >= 0.9 else 'short'}")
    else:
        step = rows[1][3]["step_s"]
        speed = MMEARTH_CPU_STEP_S / step
        print(f"bench: train cpu_speedup_vs_mmearth={speed:.1f} target=1 {'ok' if speed >= 1 else 'short'}")


if __name__ == "__main__":
    main()
