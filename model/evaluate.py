"""Linear probing and fine-tuning on downstream tasks:
``python -m model.evaluate --tasks data/tasks.zarr --run runs/x`` (or ``--tasks geobench:m-eurosat``).

Data flow: a task source, either a task store (``mmearth tasks build``: Sentinel-2 normalised with the
pretraining corpus's statistics, the run's ``--store`` or ``--store``; tasks ``fields``, ``objects``,
``boundaries``) or a GEO-Bench dataset (:mod:`model.geobench`: normalised with its own band statistics)
-> read batch by batch -> the frozen encoder (the run's weights, or a random initialisation with
``--random-init``) -> final-stage features, streamed: only the pooled vector of each sample is kept, and
for segmentation a fixed grid of at most 8 x 8 upsampled pixel features per sample (the linear map is
fitted on at most 20 000 of the train pixels) -> a linear classifier
whose L2 strength is chosen on the val split, scored on test -> metrics as GEO-Bench reports them:
accuracy (single-label), micro F1 (multi-label), mIoU (segmentation).

``--fraction`` trains on a share of the train split (label efficiency; a GEO-Bench dataset's own
``<f>x_train`` partition when it ships one). ``--seeds K`` repeats each with K draws and reports mean and
standard deviation: below 100 % a seed draws the train subset, at 100 % it draws a bootstrap resample of
the train split (so the spread is the probe's sensitivity to its training sample, not zero), and with
``--random-init`` it also draws the encoder's initialisation. ``--finetune`` trains the whole encoder with
a linear head instead (MMEarth-train's recipe written out in :data:`FINETUNE_RECIPE`: AdamW, blr 5e-4
scaled by batch / 256, weight decay 0.05, layer-wise lr decay, warmup then cosine, label smoothing 0.1 for
single-label tasks; epochs default to a CPU-sized 8 instead of its 100). Writes a JSON file and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmearth_data.argtypes import cli_terms
from mmearth_data.registry import get
from mmearth_data.store import CorpusReader, TaskStore
from model.data import normaliser_for
from model.encoder import MaskedConvNeXtV2
from model.geobench import GeoBenchDataset, GeoBenchError
from model.pretrain import CheckpointError, lr_at, read_state, read_weights

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
METRIC_OF = {"single-label": "accuracy", "multi-label": "micro_f1", "segmentation": "miou"}
# MMEarth-train's main_finetune defaults (epochs 100 there; batch 64; layer decay 1.0 there, i.e. none)
FINETUNE_RECIPE = {"blr": 5e-4, "batch": 64, "weight_decay": 0.05, "warmup_share": 0.2, "min_lr": 1e-6,
                   "smoothing": 0.1, "layer_decay": 0.9, "epochs": 8}  # fmt: skip
SEG_PIXELS = 8  # segmentation probe: an 8 x 8 grid of pixels per sample at most
SEG_FIT_ROWS = 20_000  # segmentation probe: pixels the linear map is fitted on at most (a seeded draw)


@dataclass
class Task:
    """One labelled task of a source: its name, label kind and number of outputs."""

    name: str
    kind: str  # single-label | multi-label | segmentation
    n_out: int
    class_weight: tuple[float, ...] | None = None

    @property
    def metric(self) -> str:
        return METRIC_OF[self.kind]


class StoreSource:
    """The task store of ``mmearth tasks build``: centre crops of its Sentinel-2, normalised with the
    pretraining corpus's statistics; tasks ``fields``, ``objects`` and ``boundaries``."""

    TASKS = (
        Task("fields", "single-label", 4),
        Task("objects", "multi-label", 4),
        Task("boundaries", "segmentation", 2, class_weight=(1.0, 8.0)),  # boundary pixels are rare
    )

    def __init__(self, path: str, stats: dict, img: int, in_chans: int):
        self.name = path
        self.store = TaskStore(path)
        self.m = get("sentinel2")
        self.norm = normaliser_for(self.m, stats)
        S = self.store.tile_size
        self.o, self.img = (S - img) // 2, img
        self.split = self.store.column("split")
        self.bands = (
            self.m.model_band_index
            if in_chans == len(self.m.model_band_index)
            else list(range(self.m.n_bands))
        )  # runs from before model_bands read all 13 bands
        self.level = self.store.column("level_l2a").astype(np.int64)
        self.tasks = self.TASKS

    def __len__(self) -> int:
        return len(self.split)

    def train_subset(self, fraction: float) -> np.ndarray | None:
        return None

    def read(self, idx: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o, img = self.o, self.img
        sel = (idx, slice(None), slice(o, o + img), slice(o, o + img))
        raw = self.store.select("sentinel2", sel)
        x = self.norm.apply(raw, self.level[idx])
        x[raw == self.m.fill] = 0.0
        x = np.ascontiguousarray(x[:, self.bands])
        seg = self.store.select("boundaries", sel[:1] + sel[2:])
        y = {
            "fields": torch.from_numpy(self.store.select("fields", (idx,)).astype(np.int64)),
            "objects": torch.from_numpy(self.store.select("objects", (idx,)).astype(np.float32)),
            "boundaries": torch.from_numpy(seg.astype(np.int64)),
        }
        return torch.from_numpy(x), y


class GeoBenchSource:
    """A GEO-Bench dataset (``geobench:<name>``) read through :mod:`model.geobench`; one task."""

    def __init__(self, name: str, root: str | None, in_chans: int):
        self.ds = GeoBenchDataset.open(name, root)
        if in_chans != len(self.ds.source):
            raise GeoBenchError(
                f"the encoder reads {in_chans} bands; GEO-Bench datasets are read in the 12 model bands"
            )
        self.name = f"geobench:{name}"
        names = self.ds.split_names()
        self.samples = [s for k in ("train", "val", "test") for s in names[k]]
        self.split = np.array([k for k in ("train", "val", "test") for _ in names[k]])
        self.index = {s: i for i, s in enumerate(self.samples)}
        self.tasks = (Task(self.name, self.ds.kind, self.ds.n_classes),)

    def __len__(self) -> int:
        return len(self.samples)

    def train_subset(self, fraction: float) -> np.ndarray | None:
        """GEO-Bench's own partition for ``fraction`` when the dataset ships one."""
        names = self.ds.split_names(fraction).get("train") if fraction < 1 else None
        return np.sort([self.index[s] for s in names if s in self.index]) if names else None

    def read(self, idx: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = [self.ds.read(self.samples[i]) for i in idx]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))
        kind = self.ds.kind
        y = (
            torch.tensor([p[1] for p in pairs], dtype=torch.int64)
            if kind == "single-label"
            else torch.from_numpy(np.stack([p[1] for p in pairs]))
        )
        return x, {self.name: y}


def open_source(spec: str, stats_of: Callable[[], dict], img: int, in_chans: int, geobench_dir: str | None):
    if spec.startswith("geobench:"):
        return GeoBenchSource(spec.split(":", 1)[1], geobench_dir, in_chans)
    return StoreSource(spec, stats_of(), img, in_chans)


def _grid(n: int) -> torch.Tensor:
    """Normalised centre coordinates of every s-th pixel of ``n`` (at most SEG_PIXELS of them), in
    ``grid_sample``'s ``align_corners=False`` convention, and the pixel indices."""
    s = max(1, -(-n // SEG_PIXELS))
    idx = torch.arange(s // 2, n, s)
    return (2 * idx.float() + 1) / n - 1, idx


@torch.no_grad()
def stream_features(
    enc: MaskedConvNeXtV2, source, batch: int = 32, stage: int | None = None, tasks: list[Task] | None = None
) -> dict:
    """Read ``source`` batch by batch through the frozen encoder; keep each sample's pooled features and
    the labels of ``tasks`` (default: the source's), and for segmentation tasks the features bilinearly
    upsampled to a grid of pixels (sampled at those pixels directly, never upsampled whole) with their
    labels. Features of the final stage, or of ``stage`` (0-based)."""
    enc.eval()
    tasks = source.tasks if tasks is None else tasks
    seg = [t for t in tasks if t.kind == "segmentation"]
    pooled, pix = [], []
    labels: dict[str, list] = {t.name: [] for t in tasks}
    for a in range(0, len(source), batch):
        x, y = source.read(np.arange(a, min(a + batch, len(source))))
        f = enc(x, stages=None if stage is None else stage + 1)
        pooled.append(f.mean(dim=(-2, -1)))
        if seg:
            (gy, ry), (gx, rx) = _grid(x.shape[-2]), _grid(x.shape[-1])
            grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None].expand(len(f), -1, -1, -1)
            pix.append(
                F.grid_sample(f, grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
            )
        for t in tasks:
            labels[t.name].append(
                y[t.name][:, ry][:, :, rx].flatten(1) if t.kind == "segmentation" else y[t.name]
            )
    out = {"pooled": torch.cat(pooled), **{k: torch.cat(v) for k, v in labels.items()}}
    if seg:
        out["pixels"] = torch.cat(pix)  # [N, pixels, C]
    return out


def task_loss(task: Task, smoothing: float = 0.0):
    """The loss of a task's logits: cross-entropy (single-label, optionally label-smoothed), binary
    cross-entropy (multi-label), cross-entropy with the task's class weights (segmentation)."""
    if task.kind == "single-label":
        return lambda z, y: F.cross_entropy(z, y, label_smoothing=smoothing)
    if task.kind == "multi-label":
        return F.binary_cross_entropy_with_logits
    weight = torch.tensor(task.class_weight) if task.class_weight else None
    return lambda z, y: F.cross_entropy(z, y, weight=weight)


def train_indices(source, fraction: float, seed: int) -> np.ndarray:
    """The train samples of one seed: a bootstrap resample of the train split at 100 %, else the source's
    own partition for ``fraction`` (GEO-Bench) or a seeded draw of that share."""
    tr = np.flatnonzero(source.split == "train")
    rng = np.random.default_rng(seed)
    if fraction >= 1:
        return np.sort(rng.choice(tr, len(tr), replace=True))
    own = source.train_subset(fraction)
    if own is not None and len(own):
        return own
    return np.sort(rng.choice(tr, max(4, int(round(fraction * len(tr)))), replace=False))


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


def metric(task: Task, logits: torch.Tensor, y: torch.Tensor) -> float:
    if task.kind == "single-label":
        return float((logits.argmax(1) == y).float().mean())
    if task.kind == "multi-label":  # micro F1
        p = logits > 0
        t = y > 0.5
        tp, fp, fn = (p & t).sum(), (p & ~t).sum(), (~p & t).sum()
        return float(2 * tp / max(int(2 * tp + fp + fn), 1))
    pred = logits.argmax(1)  # mIoU over the classes present in prediction or truth
    ious = [
        float(((pred == c) & (y == c)).sum()) / float(((pred == c) | (y == c)).sum())
        for c in range(task.n_out)
        if bool(((pred == c) | (y == c)).any())
    ]
    return float(np.mean(ious)) if ious else 0.0


def probe_task(feats: dict, task: Task, split: np.ndarray, train: np.ndarray, seed: int = 0) -> float:
    va, te = np.flatnonzero(split == "val"), np.flatnonzero(split == "test")

    def xy(idx):
        if task.kind == "segmentation":
            return feats["pixels"][idx].reshape(-1, feats["pixels"].shape[-1]), feats[task.name][idx].reshape(
                -1
            )
        return feats["pooled"][idx], feats[task.name][idx]

    loss = task_loss(task)
    (xtr, ytr), (xva, yva), (xte, yte) = xy(train), xy(va), xy(te)
    if len(ytr) > SEG_FIT_ROWS:  # segmentation: fit on a seeded draw of the train pixels
        keep = torch.from_numpy(
            np.sort(np.random.default_rng(seed).choice(len(ytr), SEG_FIT_ROWS, replace=False))
        )
        xtr, ytr = xtr[keep], ytr[keep]
    best = max(L2_GRID, key=lambda l2: metric(task, fit_linear(xtr, ytr, loss, task.n_out, l2)(xva), yva))
    return metric(task, fit_linear(xtr, ytr, loss, task.n_out, best)(xte), yte)


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


def finetune_task(
    enc: MaskedConvNeXtV2, source, task: Task, train: np.ndarray, seed: int, epochs: int
) -> float:
    """Fine-tune ``enc`` (a fresh copy, changed in place) with a linear head on ``task``; the test score of
    the epoch that scored best on val."""
    r = FINETUNE_RECIPE
    va, te = np.flatnonzero(source.split == "val"), np.flatnonzero(source.split == "test")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    depths = [len(s.blocks) for s in enc.stages]
    n_layers = layer_id("head", depths)
    seg = task.kind == "segmentation"
    head = torch.nn.Conv2d(enc.out_dim, task.n_out, 1) if seg else torch.nn.Linear(enc.out_dim, task.n_out)
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
    steps_per_epoch = max(1, -(-len(train) // r["batch"]))
    total, warm = epochs * steps_per_epoch, max(1, int(r["warmup_share"] * epochs * steps_per_epoch))

    def forward(x, training: bool):
        enc.train(training)
        head.train(training)
        f = enc(x)
        if seg:
            return F.interpolate(head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return head(f.mean(dim=(-2, -1)))

    loss_fn = task_loss(task, r["smoothing"])

    def score(idx):
        zs, ys = [], []
        with torch.no_grad():
            for a in range(0, len(idx), 64):
                x, y = source.read(idx[a : a + 64])
                z = forward(x, False)
                zs.append(z.permute(0, 2, 3, 1).reshape(-1, task.n_out) if seg else z)
                ys.append(y[task.name].reshape(-1) if seg else y[task.name])
        return metric(task, torch.cat(zs), torch.cat(ys))

    step, best_val, best_test = 0, -1.0, 0.0
    for epoch in range(epochs):
        order = rng.permutation(train)
        t0, losses = time.time(), []
        for a in range(0, len(order), r["batch"]):
            x, y = source.read(np.sort(order[a : a + r["batch"]]))
            cur = lr_at(step, total, warm, lr, r["min_lr"])
            for g in opt.param_groups:
                g["lr"] = cur * g["lr_scale"]
            loss = loss_fn(forward(x, True), y[task.name])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())  # read once per epoch: no device sync per step
            step += 1
        v = score(va)
        if v > best_val:
            best_val, best_test = v, score(te)
        # fine-tuning takes minutes per epoch on a CPU: one line per epoch shows it moving
        mean_loss = float(torch.stack(losses).mean())
        line = f"finetune {task.name} seed {seed}: epoch {epoch + 1}/{epochs} loss {mean_loss:.4f}"
        print(f"{line} val {task.metric} {v:.3f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return best_test


class EvaluationError(ValueError):
    """A request ``evaluate`` cannot carry out as given (a stage the encoder lacks, a task no source has);
    raised before any work."""


def load_encoder(run: str | None, random_init: bool, seed: int = 0) -> tuple[MaskedConvNeXtV2, dict]:
    state = read_state(Path(run) / "state.pt")
    try:
        args = json.loads(state["args"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(
            f"{run}/state.pt holds no run arguments; it was not written by model.pretrain"
        ) from None
    weights = read_weights(Path(run) / "model.safetensors")
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
             epochs: int = FINETUNE_RECIPE["epochs"], geobench_dir: str | None = None,
             stage: int | None = None, only: Sequence[str] | None = None) -> dict:  # fmt: skip
    """Every task of every source in ``tasks`` (comma-separated task stores and ``geobench:<name>``) at
    every fraction, ``seeds`` times; rows of mean, standard deviation and the seeds' values. ``stage``:
    probe that stage's features instead of the final stage's (linear probing only). ``only``: the
    names of the tasks to evaluate (default: every task of each source)."""
    enc0, args = load_encoder(run, random_init)
    if stage is not None and (finetune or not 0 <= stage < len(enc0.stages)):
        raise EvaluationError(
            f"stage {stage}: give a stage in 0..{len(enc0.stages) - 1} of this encoder, for linear probing "
            "(fine-tuning trains the whole encoder)"
        )
    img = img or args["img_size"]

    def stats_of():
        return CorpusReader(store or args["store"]).statistics

    def encoder(seed: int) -> MaskedConvNeXtV2:  # random init: one initialisation per seed
        return load_encoder(run, True, seed)[0] if random_init else enc0

    sources = [
        open_source(spec, stats_of, img, enc0.in_chans, geobench_dir) for spec in tasks.split(",") if spec
    ]
    names = [t.name for src in sources for t in src.tasks]
    unknown = [n for n in only or () if n not in names]
    if unknown:  # checked before any work, against every source
        raise EvaluationError(
            f"--only {','.join(unknown)}: no such task; the sources have {', '.join(names)}"
        )
    rows = []
    for source in sources:
        chosen = [t for t in source.tasks if not only or t.name in only]
        feats: dict[int, dict] = {}
        for task in chosen:
            for frac in fractions:
                vals = []
                for s in range(seeds):
                    train = train_indices(source, frac, s)
                    if finetune:
                        enc = encoder(s)
                        fresh = MaskedConvNeXtV2(enc.size, in_chans=enc.in_chans, patch_size=enc.patch_size)
                        fresh.load_state_dict(enc.state_dict())
                        vals.append(finetune_task(fresh, source, task, train, s, epochs))
                    else:
                        key = s if random_init else 0
                        if key not in feats:
                            feats[key] = stream_features(encoder(s), source, stage=stage, tasks=chosen)
                        vals.append(probe_task(feats[key], task, source.split, train, s))
                rows.append(
                    {"task": task.name, "encoder": "random" if random_init else run, "fraction": frac,
                     "protocol": "finetune" if finetune else "linear", "metric": task.metric,
                     "mean": float(np.mean(vals)), "std": float(np.std(vals)), "seeds": seeds,
                     "values": [float(v) for v in vals],
                     "stage": len(enc0.stages) - 1 if stage is None else stage}
                )  # fmt: skip
    return {"tasks": tasks, "run": run, "model": args["model"], "img_size": img, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tasks", required=True,
        help="task store from `mmearth tasks build`, or geobench:<dataset> (comma-separated for several)",
    )  # fmt: skip
    ap.add_argument("--run", required=True, help="pretraining run directory")
    ap.add_argument(
        "--store", help="corpus whose statistics normalise a task store's input (default: the run's)"
    )
    ap.add_argument(
        "--geobench-dir", help="GEO-Bench root (default: $GEO_BENCH_DIR, else ~/dataset/geobench)"
    )
    ap.add_argument("--fraction", default="1", help="shares of the train labels, e.g. 0.01,0.05,0.5,1")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--random-init", action="store_true", help="the same encoder, randomly initialised")
    ap.add_argument(
        "--finetune", action="store_true", help="fine-tune the whole encoder (default: linear probe)"
    )
    ap.add_argument("--epochs", type=int, default=FINETUNE_RECIPE["epochs"], help="fine-tuning epochs")
    ap.add_argument("--stage", type=int, help="probe this encoder stage's features (0-based; default: final)")
    ap.add_argument("--only", help="evaluate only these tasks, comma-separated (default: every task)")
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
    try:
        out = evaluate(a.tasks, a.run, a.store, fractions, a.seeds, a.random_init, finetune=a.finetune,
                       epochs=a.epochs, geobench_dir=a.geobench_dir, stage=a.stage,
                       only=[t for t in (a.only or "").split(",") if t])  # fmt: skip
    except (GeoBenchError, CheckpointError, EvaluationError) as err:
        print(f"error: {cli_terms(err)}", file=sys.stderr)
        return 2
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
