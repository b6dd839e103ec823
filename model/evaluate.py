"""Linear probing on downstream tasks: ``python -m model.evaluate --tasks data/tasks.zarr --run runs/x``.

Data flow: a task store (``mmearth tasks build``) -> Sentinel-2 normalised with the pretraining corpus's
statistics (the run's ``--store``, or ``--store``) -> the frozen encoder (the run's weights, or a random
initialisation with ``--random-init``) -> final-stage features, streamed batch by batch: pooled per
tile for classification, per patch for segmentation -> a linear classifier whose L2 strength is chosen
on the val split, scored on test -> metrics as GEO-Bench reports them: accuracy (single-label),
micro F1 (multi-label), mIoU (segmentation). ``--fraction`` trains on a share of the train split
(label efficiency), ``--seeds K`` repeats each with K draws of that share and reports mean and
standard deviation. ``--finetune`` trains the whole encoder with a linear head instead (MMEarth-train's
recipe written out in :data:`FINETUNE_RECIPE`: AdamW, blr 5e-4 scaled by batch / 256, weight decay
0.05, layer-wise lr decay, warmup then cosine, label smoothing 0.1 for single-label tasks; epochs
default to a CPU-sized 8 instead of its 100). Writes a JSON file and prints a table.
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
from model.pretrain import lr_at

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
METRICS = {"fields": "accuracy", "objects": "micro_f1", "boundaries": "miou"}
# MMEarth-train's main_finetune defaults (epochs 100 there; batch 64; layer decay 1.0 there, i.e. none)
FINETUNE_RECIPE = {"blr": 5e-4, "batch": 64, "weight_decay": 0.05, "warmup_share": 0.2, "min_lr": 1e-6,
                   "smoothing": 0.1, "layer_decay": 0.9, "epochs": 8}  # fmt: skip


def task_inputs(tasks: str, stats: dict, img: int, in_chans: int) -> dict:
    """Normalised Sentinel-2 centre crops (``x``) and labels of every tile of the task store."""
    g = zarr.open_group(tasks, mode="r")
    m = get("sentinel2")
    norm = normaliser_for(m, stats)
    S = int(g.attrs["tile_size"])
    o = (S - img) // 2
    raw = np.asarray(g["sentinel2"][:])
    x = norm.apply(raw, np.asarray(g["level_l2a"][:]).astype(np.int64))
    x[raw == m.fill] = 0.0
    bands = m.model_band_index if in_chans == len(m.model_band_index) else list(range(m.n_bands))
    x = x[:, bands, o : o + img, o : o + img]  # runs from before model_bands read all 13 bands
    seg = np.asarray(g["boundaries"][:])[:, o : o + img, o : o + img]
    return {
        "x": torch.from_numpy(np.ascontiguousarray(x)),
        "split": strings(g["split"][:]),
        "fields": torch.from_numpy(np.asarray(g["fields"][:]).astype(np.int64)),
        "objects": torch.from_numpy(np.asarray(g["objects"][:]).astype(np.float32)),
        "boundaries": torch.from_numpy(seg.astype(np.int64)),
    }


@torch.no_grad()
def task_features(enc: MaskedConvNeXtV2, data: dict, batch: int = 64) -> dict:
    """``data`` with the frozen encoder's features added: pooled per tile and per patch, computed batch
    by batch."""
    enc.eval()
    pooled, patches = [], []
    for a in range(0, len(data["x"]), batch):
        f = enc(data["x"][a : a + batch])
        pooled.append(f.mean(dim=(-2, -1)))
        patches.append(f)
    return data | {"pooled": torch.cat(pooled), "patches": torch.cat(patches)}


N_OUT = {"fields": 4, "objects": 4, "boundaries": 2}
BOUNDARY_WEIGHT = (1.0, 8.0)  # boundary pixels are rare


def task_loss(task: str, smoothing: float = 0.0):
    """The loss of a task's logits: cross-entropy (single-label, optionally label-smoothed), binary
    cross-entropy (multi-label), class-weighted cross-entropy (segmentation)."""
    if task == "fields":
        return lambda z, y: F.cross_entropy(z, y, label_smoothing=smoothing)
    if task == "objects":
        return F.binary_cross_entropy_with_logits
    weight = torch.tensor(BOUNDARY_WEIGHT)
    return lambda z, y: F.cross_entropy(z, y, weight=weight)


def split_indices(split: np.ndarray, fraction: float, seed: int):
    """(train, val, test) tile indices, the train ones a seeded draw of ``fraction`` of them, and the
    generator that drew them."""
    tr, va, te = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
    rng = np.random.default_rng(seed)
    tr = np.sort(rng.choice(tr, max(4, int(round(fraction * len(tr)))), replace=False))
    return tr, va, te, rng


def fit_linear(x, y, loss_fn, n_out: int, l2: float, steps: int = 150):
    """A linear map on standardised features fitted by L-BFGS with an L2 penalty; returns the logits
    function."""
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
    tr, va, te, _ = split_indices(feats["split"], fraction, seed)

    def xy(idx):
        if task == "boundaries":
            return _seg_xy(feats["patches"][idx], feats["boundaries"][idx])
        return feats["pooled"][idx], feats[task][idx]

    loss, n_out = task_loss(task), N_OUT[task]
    (xtr, ytr), (xva, yva), (xte, yte) = xy(tr), xy(va), xy(te)
    best = max(L2_GRID, key=lambda l2: metric(task, fit_linear(xtr, ytr, loss, n_out, l2)(xva), yva))
    return metric(task, fit_linear(xtr, ytr, loss, n_out, best)(xte), yte)


def layer_id(name: str, depths: list[int]) -> int:
    """Depth of an encoder parameter for layer-wise lr decay, given the stages' block counts: stem 0,
    then one per block (downsampling counts with the stage's first block); anything else (the head)
    ``sum(depths) + 2``."""
    if name.startswith("stem."):
        return 0
    if name.startswith("stages."):
        parts = name.split(".")
        stage = int(parts[1])
        block = int(parts[3]) if parts[2] == "blocks" else 0
        return 1 + sum(depths[:stage]) + block
    return sum(depths) + 2


def finetune_task(enc_state: dict, make_encoder, task: str, data: dict, fraction: float, seed: int,
                  epochs: int) -> float:  # fmt: skip
    """Fine-tune a fresh copy of the encoder (weights ``enc_state``) with a linear head on ``task``;
    the test score of the epoch that scored best on val."""
    r = FINETUNE_RECIPE
    tr, va, te, rng = split_indices(data["split"], fraction, seed)
    torch.manual_seed(seed)
    enc = make_encoder()
    enc.load_state_dict(enc_state)
    depths = [len(s.blocks) for s in enc.stages]
    n_layers = layer_id("head", depths)
    n_out = N_OUT[task]
    head = (
        torch.nn.Conv2d(enc.out_dim, n_out, 1)
        if task == "boundaries"
        else torch.nn.Linear(enc.out_dim, n_out)
    )
    torch.nn.init.trunc_normal_(head.weight, std=2e-5)  # MMEarth-train: head_init_scale 0.001
    torch.nn.init.zeros_(head.bias)
    lr = r["blr"] * r["batch"] / 256
    groups = {}
    for name, p in [(f"enc.{k}", v) for k, v in enc.named_parameters()] + [
        (f"head.{k}", v) for k, v in head.named_parameters()
    ]:
        lid = layer_id(name[4:], depths) if name.startswith("enc.") else n_layers
        decay = 0.0 if p.ndim <= 1 else r["weight_decay"]
        key = (lid, decay)
        groups.setdefault(
            key, {"params": [], "weight_decay": decay, "lr_scale": r["layer_decay"] ** (n_layers - lid)}
        )
        groups[key]["params"].append(p)
    opt = torch.optim.AdamW(list(groups.values()), lr=lr)
    steps_per_epoch = max(1, -(-len(tr) // r["batch"]))
    total, warm = epochs * steps_per_epoch, max(1, int(r["warmup_share"] * epochs * steps_per_epoch))

    def forward(idx, train: bool):
        enc.train(train)
        head.train(train)
        f = enc(data["x"][idx])
        if task == "boundaries":
            return F.interpolate(
                head(f), size=data["boundaries"].shape[-2:], mode="bilinear", align_corners=False
            )
        return head(f.mean(dim=(-2, -1)))

    loss_fn = task_loss(task, r["smoothing"])

    def score(idx):
        with torch.no_grad():
            z = torch.cat([forward(idx[a : a + 128], False) for a in range(0, len(idx), 128)])
        y = data[task][idx]
        return metric(
            task,
            z if task != "boundaries" else z.permute(0, 2, 3, 1).reshape(-1, n_out),
            y.reshape(-1) if task == "boundaries" else y,
        )

    step, best_val, best_test = 0, -1.0, 0.0
    for _ in range(epochs):
        order = rng.permutation(tr)
        for a in range(0, len(order), r["batch"]):
            idx = np.sort(order[a : a + r["batch"]])
            cur = lr_at(step, total, warm, lr, r["min_lr"])
            for g in opt.param_groups:
                g["lr"] = cur * g["lr_scale"]
            loss = loss_fn(forward(idx, True), data[task][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        v = score(va)
        if v > best_val:
            best_val, best_test = v, score(te)
    return best_test


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
             random_init: bool = False, img: int | None = None, finetune: bool = False,
             epochs: int = FINETUNE_RECIPE["epochs"]) -> dict:  # fmt: skip
    enc, args = load_encoder(run, random_init)
    stats = CorpusReader(store or args["store"]).statistics
    img = img or args["img_size"]
    data = task_inputs(tasks, stats, img, enc.in_chans)
    if not finetune:
        data = task_features(enc, data)
    state = {k: v.clone() for k, v in enc.state_dict().items()}

    def make_encoder():
        return MaskedConvNeXtV2(enc.size, in_chans=enc.in_chans, patch_size=enc.patch_size)

    rows = []
    for task in ("fields", "objects", "boundaries"):
        for frac in fractions:
            if finetune:
                vals = [finetune_task(state, make_encoder, task, data, frac, s, epochs) for s in range(seeds)]
            else:
                vals = [probe_task(data, task, frac, s) for s in range(seeds)]
            rows.append(
                {"task": task, "encoder": "random" if random_init else run, "fraction": frac,
                 "protocol": "finetune" if finetune else "linear", "metric": METRICS[task],
                 "mean": float(np.mean(vals)), "std": float(np.std(vals)), "seeds": seeds}
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
    ap.add_argument(
        "--finetune", action="store_true", help="fine-tune the whole encoder (default: linear probe)"
    )
    ap.add_argument("--epochs", type=int, default=FINETUNE_RECIPE["epochs"], help="fine-tuning epochs")
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
    out = evaluate(
        a.tasks, a.run, a.store, fractions, a.seeds, a.random_init, finetune=a.finetune, epochs=a.epochs
    )
    print("| task | metric | protocol | encoder | fraction | mean | std | seeds |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in out["rows"]:
        print(f"| {r['task']} | {r['metric']} | {r['protocol']} | {r['encoder']} | {r['fraction']:g} | "
              f"{r['mean']:.3f} | {r['std']:.3f} | {r['seeds']} |")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
