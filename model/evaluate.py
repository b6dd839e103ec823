"""Linear probing on downstream tasks: ``python -m model.evaluate --tasks data/tasks.zarr --run runs/x``.

Data flow: a task store (``mmearth tasks build``) -> Sentinel-2 normalised with the pretraining corpus's
statistics (the run's ``--store``, or ``--store``) -> the frozen encoder (the run's weights, or a random
initialisation with ``--random-init``) -> final-stage features, streamed batch by batch: pooled per
tile for classification, per patch for segmentation -> a linear classifier whose L2 strength is chosen
on the val split, scored on test -> metrics as GEO-Bench reports them: accuracy (single-label),
micro F1 (multi-label), mIoU (segmentation). ``--fraction`` trains on a share of the train split
(label efficiency), ``--seeds K`` repeats each with K draws of that share and reports mean and
standard deviation. Writes a JSON file and prints a table. Fine-tuning is not implemented yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from safetensors.torch import load_file

from mmearth_data.registry import get
from mmearth_data.store import CorpusReader, strings
from model.data import normaliser_for
from model.encoder import MaskedConvNeXtV2

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
METRICS = {"fields": "accuracy", "objects": "micro_f1", "boundaries": "miou"}


class EvalError(ValueError):
    """Inputs that cannot be evaluated as given."""


@torch.no_grad()
def task_features(enc: MaskedConvNeXtV2, tasks: str, stats: dict, img: int, batch: int = 64) -> dict:
    """Pooled and per-patch features of every tile of the task store (centre crops of ``img`` px)."""
    g = zarr.open_group(tasks, mode="r")
    m = get("sentinel2")
    norm = normaliser_for(m, stats)
    n, S = int(g.attrs["n_tiles"]), int(g.attrs["tile_size"])
    o = (S - img) // 2
    level = np.asarray(g["level_l2a"][:]).astype(np.int64)
    pooled, patches = [], []
    enc.eval()
    for a in range(0, n, batch):
        raw = np.asarray(g["sentinel2"][a : a + batch])
        x = norm.apply(raw, level[a : a + batch])
        x[raw == m.fill] = 0.0
        bands = m.model_band_index if enc.in_chans == len(m.model_band_index) else list(range(m.n_bands))
        x = x[:, bands, o : o + img, o : o + img]  # runs from before model_bands read all 13 bands
        f = enc(torch.from_numpy(np.ascontiguousarray(x)))
        pooled.append(f.mean(dim=(-2, -1)))
        patches.append(f)
    seg = np.asarray(g["boundaries"][:])[:, o : o + img, o : o + img]
    return {
        "pooled": torch.cat(pooled),
        "patches": torch.cat(patches),
        "split": strings(g["split"][:]),
        "fields": torch.from_numpy(np.asarray(g["fields"][:]).astype(np.int64)),
        "objects": torch.from_numpy(np.asarray(g["objects"][:]).astype(np.float32)),
        "boundaries": torch.from_numpy(seg.astype(np.int64)),
    }


def _fit(x, y, loss_fn, n_out: int, l2: float, steps: int = 150):
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], n_out, requires_grad=True)
    b = torch.zeros(n_out, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(((x - mu) / sd) @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: ((z - mu) / sd) @ w + b


def _seg_xy(feats: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel features by bilinear upsampling of the patch features (a linear segmentation probe),
    subsampled every 4th pixel in each direction to keep the fit small."""
    up = F.interpolate(feats, size=masks.shape[-2:], mode="bilinear", align_corners=False)[..., ::4, ::4]
    return up.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), masks[..., ::4, ::4].reshape(-1)


def metric(task: str, logits: torch.Tensor, y: torch.Tensor) -> float:
    if task == "fields":
        return float((logits.argmax(1) == y).float().mean())
    if task == "objects":  # micro F1
        p = logits > 0
        t = y > 0.5
        tp, fp, fn = (p & t).sum(), (p & ~t).sum(), (~p & t).sum()
        return float(2 * tp / max(int(2 * tp + fp + fn), 1))
    pred = logits.argmax(1)  # mIoU over background and boundary
    ious = [
        float(((pred == c) & (y == c)).sum()) / max(float(((pred == c) | (y == c)).sum()), 1.0)
        for c in (0, 1)
    ]
    return float(np.mean(ious))


def probe_task(feats: dict, task: str, fraction: float, seed: int) -> float:
    split = feats["split"]
    tr, va, te = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
    rng = np.random.default_rng(seed)
    tr = np.sort(rng.choice(tr, max(4, int(round(fraction * len(tr)))), replace=False))

    def xy(idx):
        if task == "boundaries":
            return _seg_xy(feats["patches"][idx], feats["boundaries"][idx])
        return feats["pooled"][idx], feats[task][idx]

    if task == "fields":
        loss, n_out = F.cross_entropy, 4
    elif task == "objects":
        loss, n_out = F.binary_cross_entropy_with_logits, 4
    else:
        weight = torch.tensor([1.0, 8.0])  # boundaries are rare

        def loss(z, y):
            return F.cross_entropy(z, y, weight=weight)

        n_out = 2
    (xtr, ytr), (xva, yva), (xte, yte) = xy(tr), xy(va), xy(te)
    best = max(L2_GRID, key=lambda l2: metric(task, _fit(xtr, ytr, loss, n_out, l2)(xva), yva))
    return metric(task, _fit(xtr, ytr, loss, n_out, best)(xte), yte)


def load_encoder(run: str | None, random_init: bool, seed: int = 0) -> tuple[MaskedConvNeXtV2, dict]:
    state = torch.load(Path(run) / "state.pt", map_location="cpu", weights_only=True)
    args = json.loads(state["args"])
    weights = load_file(str(Path(run) / "model.safetensors"))
    enc_w = {k[len("encoder.") :]: v for k, v in weights.items() if k.startswith("encoder.")}
    torch.manual_seed(seed)
    enc = MaskedConvNeXtV2(
        args["model"], in_chans=enc_w["stem.conv.weight"].shape[1], patch_size=args["patch_size"]
    )
    if not random_init:
        enc.load_state_dict(enc_w)
    return enc, args


def evaluate(tasks: str, run: str, store: str | None = None, fractions=(1.0,), seeds: int = 3,
             random_init: bool = False, img: int | None = None) -> dict:  # fmt: skip
    enc, args = load_encoder(run, random_init)
    stats = CorpusReader(store or args["store"]).statistics
    img = img or args["img_size"]
    feats = task_features(enc, tasks, stats, img)
    rows = []
    for task in ("fields", "objects", "boundaries"):
        for frac in fractions:
            vals = [probe_task(feats, task, frac, s) for s in range(seeds)]
            rows.append(
                {"task": task, "encoder": "random" if random_init else run, "fraction": frac,
                 "metric": METRICS[task], "mean": float(np.mean(vals)), "std": float(np.std(vals)),
                 "seeds": seeds}
            )  # fmt: skip
    return {"tasks": tasks, "run": run, "model": args["model"], "img_size": img, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", required=True, help="task store from `mmearth tasks build`")
    ap.add_argument("--run", required=True, help="pretraining run directory")
    ap.add_argument("--store", help="corpus whose statistics normalise the input (default: the run's)")
    ap.add_argument("--fraction", default="1", help="shares of the train labels, e.g. 0.01,0.05,0.5,1")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--random-init", action="store_true", help="the same encoder, randomly initialised")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    try:
        fractions = tuple(float(f) for f in a.fraction.split(","))
        if not all(0 < f <= 1 for f in fractions) or a.seeds < 1:
            raise ValueError
    except ValueError:
        print("error: --fraction takes shares in (0, 1], --seeds a positive number", file=sys.stderr)
        return 2
    if not (Path(a.run) / "state.pt").exists():
        print(f"error: {a.run} holds no pretraining run (state.pt missing)", file=sys.stderr)
        return 2
    out = evaluate(a.tasks, a.run, a.store, fractions, a.seeds, a.random_init)
    print("| task | metric | encoder | fraction | mean | std | seeds |\n|---|---|---|---:|---:|---:|---:|")
    for r in out["rows"]:
        print(f"| {r['task']} | {r['metric']} | {r['encoder']} | {r['fraction']:g} | {r['mean']:.3f} | "
              f"{r['std']:.3f} | {r['seeds']} |")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
