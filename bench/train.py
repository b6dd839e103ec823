"""Step time and samples/s of MP-MAE pretraining (atto, all 11 targets), CPU here and CUDA when present.

    python bench/train.py [--steps 6] [--batch-size 32]          # CPU: 56 px / patch 8 and 112 px / patch 16
    python bench/train.py --device cuda --batch-size 256 --workers 8

Each configuration trains on a store built for it (64 px tiles for 56 px crops, 128 px tiles for 112 px
crops) through the real loader (``model.data.StreamingCorpus`` + DataLoader), and reports the step time
(min, median, max), samples/s and the share of the step spent waiting for data, under each
``--precision`` (default: bf16 autocast on CUDA; fp32 and bf16 side by side on CPU). On CUDA the target
is that the loader keeps the GPU busy >= 90 % of the time with at most 8 workers.
On CPU the baseline runs in the same process on the same batches, steps interleaved with ours
(112 px, patch 16): our MP-MAE configured the way MMEarth-train computes (:class:`MMEarthTrainStyle`:
the input masked once and the encoder run dense, the shared decoder evaluated once per target), and
the same with the decoder evaluated once ("fixed": a one-line change on their side). Both are our
model's code in their computation pattern, not MMEarth-train itself (MinkowskiEngine does not build
here). Ends with ``bench: train step_ratio_vs_mmearth_train=<ours / theirs> target=0.55 ok|short``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from mmearth_data.build import BuildConfig, build_in_process
from model.data import BatchNormaliser, StreamingCorpus
from model.mpmae import MPMAE, select_pretext
from model.pretrain import autocast

TARGET_RATIO = 0.55  # our default step time over MMEarth-train's


class MMEarthTrainStyle(MPMAE):
    """MP-MAE computed as MMEarth-train computes it: Sentinel-2 masked once at the input and the encoder
    run dense (no re-masking inside), and the shared decoder run once per target (``once=False``) or
    once for all (``once=True``). Same parameters and losses as ours."""

    def __init__(self, *args, once: bool = False, **kw):
        super().__init__(*args, decoder="shared", **kw)
        self.once = once

    def forward(self, batch, mask=None, generator=None):
        from model.mpmae import pixel_loss, random_mask, tile_loss

        s2 = batch["sentinel2"]
        B, _, H, _ = s2.shape
        p = self.patch_size
        if mask is None:
            mask = random_mask(B, H // p, self.mask_ratio, generator).to(s2.device)
        pix_mask = mask.repeat_interleave(p, -2).repeat_interleave(p, -1)
        x = torch.nan_to_num(s2, nan=0.0) * (1 - pix_mask[:, None].to(s2.dtype))
        feats = self.encoder(x, None)
        dec_once = self.decoders["shared"](feats, mask) if self.once else None
        total = feats.new_zeros(())
        for t in self.targets:
            dec = dec_once if dec_once is not None else self.decoders["shared"](feats, mask)
            pred = self.heads[t.name](dec)
            if t.pixel:
                loss, n = pixel_loss(t, pred, batch[t.name], pix_mask, p, batch.get("cloud"))
            else:
                loss, n = tile_loss(t, pred, batch[t.name])
            s = self.log_vars[t.name]
            total = total + (torch.exp(-s) * loss + s if n else s * 0.0)
        return total, {}


def interleaved(store: str, batch: int, steps: int) -> dict[str, list[float]]:
    """Step times (s) of ours and the two MMEarth-train-style baselines at 112 px / patch 16, taking
    turns on the same batches after one warm-up step each."""
    targets = select_pretext("all")
    models = {}
    for name, cls, kw in (
        ("ours", MPMAE, {"decoder": "shared"}),
        ("mmearth_train", MMEarthTrainStyle, {"once": False}),
        ("mmearth_train_fixed", MMEarthTrainStyle, {"once": True}),
    ):
        torch.manual_seed(0)
        m = cls(targets, "atto", 16, **kw)
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05))
    ds = StreamingCorpus(store, targets, 112, split=None, seed=0, shuffle_buffer=max(256, batch))
    it = iter(DataLoader(ds, batch_size=batch))
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(steps + 1):
        b = next(it)
        for name, (m, opt) in models.items():
            t = time.perf_counter()
            loss, _ = m(b, generator=torch.Generator().manual_seed(step))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:
                times[name].append(time.perf_counter() - t)
    return times


def build(tile_size: int, n: int) -> str:
    store = f"{tempfile.mkdtemp(prefix='bench-train-')}/s.zarr"
    cfg = BuildConfig(store=store, n_tiles=n, tile_size=tile_size, seed=9)
    build_in_process(cfg)
    return store


def measure(
    store, img, patch, batch, steps, device, workers, decoder,
    channels_last=False, compile=False, precision="fp32",
) -> dict:  # fmt: skip
    targets = select_pretext("all")
    torch.manual_seed(0)
    model = MPMAE(targets, "atto", patch, decoder=decoder).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    ds = StreamingCorpus(store, targets, img, split=None, seed=0, shuffle_buffer=max(256, batch), raw=True)
    normalise = BatchNormaliser(ds)  # as pretraining does (--normalise device)
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
    times, waits = [], []
    for step in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        b = next(it)
        b = normalise({k: v.to(device, non_blocking=True) for k, v in b.items()})
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        if channels_last:
            b = {
                k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in b.items()
            }
        with autocast(precision, device):
            loss, _ = step_model(b)
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
    return {"step_s": step_s, "min_s": min(times), "max_s": max(times), "samples_s": batch / step_s,
            "wait": sum(waits) / sum(times)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 256 on CUDA")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument(
        "--workers", default=None, help="DataLoader workers, a comma list (default: 0 on CPU, 1,4,8 on CUDA)"
    )
    ap.add_argument("--channels-last", action="store_true", help="model and inputs in channels-last layout")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument(
        "--precision", default=None,
        help="autocast of the forward pass, a comma list of bf16 and fp32 (default: bf16 on CUDA, fp32,bf16 "
        "on CPU: bf16 pays on CPUs with native bf16 instructions, AVX512-BF16 or AMX)",
    )  # fmt: skip
    ap.add_argument("--tiles", type=int, default=None, help="tiles per store (default: 128 CPU, 2048 CUDA)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (256 if cuda else 32)
    worker_list = [int(w) for w in (args.workers or ("1,4,8" if cuda else "0")).split(",")]
    tiles = args.tiles or (2048 if cuda else 128)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    configs = [(64, 56, 8, "shared"), (128, 112, 16, "shared"), (128, 112, 16, "per-modality")]
    stores = {}
    rows = []
    precisions = (args.precision or ("bf16" if cuda else "fp32,bf16")).split(",")
    for workers in worker_list:
        for tile, img, patch, decoder in configs:
            if tile not in stores:
                stores[tile] = build(tile, tiles)
            for precision in precisions:
                r = measure(stores[tile], img, patch, batch, args.steps, device, workers, decoder,
                            args.channels_last, args.compile, precision)  # fmt: skip
                rows.append((workers, img, patch, decoder, precision, r))
    extras = ", ".join(x for x, on in (("channels-last", args.channels_last),
                                       ("torch.compile", args.compile)) if on)  # fmt: skip
    print(
        f"| {name}: atto, all targets, batch {batch}{', ' + extras if extras else ''} | precision | workers "
        "| min | median | max step s | samples/s | data wait |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for workers, img, patch, decoder, precision, r in rows:
        print(
            f"| {img} px, patch {patch}, {decoder} decoder | {precision} | {workers} | {r['min_s']:.3f} | "
            f"{r['step_s']:.3f} | {r['max_s']:.3f} | {r['samples_s']:.1f} | {100 * r['wait']:.0f} % |"
        )
    if cuda:
        most = max(worker_list)
        busy = 1 - max(r["wait"] for w, *_, r in rows if w == most)
        print(
            f"bench: train gpu_busy={busy:.2f} target=0.9 workers={most} {'ok' if busy >= 0.9 else 'short'}"
        )
    else:
        t = interleaved(stores[128], batch, args.steps)
        med = {k: statistics.median(v) for k, v in t.items()}
        print(f"\n| 112 px, patch 16, batch {batch}, steps interleaved | min | median | max step s |")
        print("|---|---:|---:|---:|")
        labels = {
            "ours": "ours (sparse-masked encoder, shared decoder once)",
            "mmearth_train": "MMEarth-train's computation (dense, decoder once per target)",
            "mmearth_train_fixed": "the same with the decoder once (fixed)",
        }
        for k, v in t.items():
            print(f"| {labels[k]} | {min(v):.3f} | {med[k]:.3f} | {max(v):.3f} |")
        ratio = med["ours"] / med["mmearth_train"]
        fixed = med["ours"] / med["mmearth_train_fixed"]
        print(
            f"bench: train step_ratio_vs_mmearth_train={ratio:.2f} target={TARGET_RATIO} "
            f"step_ratio_vs_fixed={fixed:.2f} baseline=MMEarthTrainStyle(in-process) "
            f"{'ok' if ratio <= TARGET_RATIO else 'short'}"
        )


if __name__ == "__main__":
    main()
