"""How much of the ``fields`` label the imagery carries: a supervised network trained from scratch beside
the linear probes of ``bench/paper.py``.

    python bench/ceiling.py [--tasks TASK_STORE] [--run RUN] [--epochs 30] [--seeds 3]

(by default the task store and S2-only run that ``bench/paper.py`` leaves in ``data/paper``).

The paper's ordering can only show on a task that leaves room above a random encoder's linear probe: if
the imagery itself held little more of the label than random features do, no pretraining could open
gaps larger than the probes' spreads. This measures the room. Inputs are exactly the probes' (the task
store's Sentinel-2 centre crops at the run's image size, the run's 12 model bands, normalised with the
run's corpus statistics: :class:`model.evaluate.StoreSource`). The supervised model is a plain 6-layer
CNN (3 x 3 convolutions with batch norm, 32-64-128 channels, two max-pools, global average pooling; 0.3 M
parameters), not the atto encoder, whose from-scratch training costs about 4 x as much per epoch on a
CPU: AdamW with a one-cycle schedule (peak lr 2e-3, weight decay 0.05), batch 32, random flips and
quarter turns, the epoch chosen on val, scored on test; one seed per initialisation and batch order.

The baseline runs in the same process on the same inputs: the linear probes of ``model.evaluate``, of
the run's pretrained encoder and of the same encoder randomly initialised (the paper table's random-init
column), at 100 % of the labels with the same number of seeds. Beside them the same linear probe (same
bootstrap seeds, same L2 grid chosen on val) of :func:`hand_statistics`, 60 numbers per tile that need
no training: each band's mean and standard deviation and its mean absolute gradient at 1, 2 and 4 px
divided by that standard deviation. What this row reads is what a linear probe could read from pooled
features that kept the tile's contrast and its scale; an encoder probing below it has not put those into
its pooled features. ``--epochs 0`` leaves the supervised network out.

Ends with ``bench: ceiling fields_headroom=<supervised - random-init probe> target=0.1 ok|short``: the
acceptance of the paper's experiment asks for two gaps (S2-only over random init, all-modality over
S2-only), each larger than two spreads of about 0.01-0.03, so a task with less than 0.1 above random init
could not show the ordering whatever pretraining learnt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmearth_data.store import CorpusReader  # noqa: E402
from model.evaluate import StoreSource, Task, evaluate, load_encoder, probe_task, train_indices  # noqa: E402
from model.pretrain import CheckpointError  # noqa: E402

TARGET_HEADROOM = 0.1


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
    )  # fmt: skip


def plain_cnn(in_chans: int, n_out: int) -> nn.Module:
    return nn.Sequential(
        _block(in_chans, 32), nn.MaxPool2d(2), _block(32, 64), nn.MaxPool2d(2), _block(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, n_out),
    )  # fmt: skip


def load_split(source: StoreSource) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    """All of the task store's inputs and ``fields`` labels (2000 tiles of 56 px: about 300 MB)."""
    idx = np.arange(len(source))
    xs, ys = [], []
    for i in range(0, len(idx), 256):
        x, y = source.read(idx[i : i + 256])
        xs.append(x)
        ys.append(y["fields"])
    split = np.asarray(source.split)
    return torch.cat(xs), torch.cat(ys), {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}


def hand_statistics(x: torch.Tensor, scales: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """(N, C, H, W) -> (N, C * (2 + len(scales))): per band its mean, its standard deviation and, at each
    scale (the image average-pooled by it), the mean absolute difference of neighbouring pixels across
    rows and columns divided by the standard deviation (how much of the band's variation sits at that
    scale: many small parcels put it at the finest scales, a few large ones at the coarser)."""
    sd = x.std(dim=(2, 3)) + 1e-6
    out = [x.mean(dim=(2, 3)), sd]
    for k in scales:
        z = F.avg_pool2d(x, k) if k > 1 else x
        grad = (z[..., 1:, :] - z[..., :-1, :]).abs().mean(dim=(2, 3))
        grad = grad + (z[..., :, 1:] - z[..., :, :-1]).abs().mean(dim=(2, 3))
        out.append(grad / sd)
    return torch.cat(out, 1)


def hand_probe(x: torch.Tensor, y: torch.Tensor, source: StoreSource, seeds: int) -> list[float]:
    """Test accuracy of ``model.evaluate``'s linear probe on :func:`hand_statistics` at 100 % of the
    labels, one bootstrap resample of the train split per seed, as the encoders' probes."""
    feats = {"pooled": hand_statistics(x), "fields": y}
    task = Task("fields", "single-label", int(y.max()) + 1)
    split = np.asarray(source.split)
    return [probe_task(feats, task, split, train_indices(source, 1.0, s), s) for s in range(seeds)]


def supervised(x: torch.Tensor, y: torch.Tensor, parts: dict[str, np.ndarray], epochs: int, seed: int,
               batch: int = 32, log=print) -> dict:  # fmt: skip
    """Train :func:`plain_cnn` on ``train``; (val, test) accuracy at the epoch with the best val."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = plain_cnn(x.shape[1], int(y.max()) + 1)
    train = parts["train"].copy()
    steps = epochs * -(-len(train) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)

    def accuracy(rows: np.ndarray) -> float:
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(x[rows[i : i + 256]]).argmax(1) for i in range(0, len(rows), 256)])
        net.train()
        return float((pred == y[rows]).float().mean())

    best = {"val": -1.0, "test": 0.0, "epoch": -1}
    t0 = time.perf_counter()
    for ep in range(epochs):
        rng.shuffle(train)
        for i in range(0, len(train), batch):
            rows = train[i : i + batch]
            xb = torch.rot90(x[rows], int(rng.integers(4)), (2, 3))
            if rng.random() < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(net(xb), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val, test = accuracy(parts["val"]), accuracy(parts["test"])
        if val >= best["val"]:
            best = {"val": val, "test": test, "epoch": ep}
        log(f"  seed {seed} epoch {ep + 1}/{epochs}: loss {loss.item():.3f} val {val:.3f} test {test:.3f} "
            f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tasks",
        default="data/paper/tasks_2000_64.zarr",
        help="task store of `mmearth tasks build` (default: bench/paper.py's)",
    )
    ap.add_argument(
        "--run",
        default="data/paper/run_s2_700",
        help="a pretraining run: its inputs, statistics and encoder (default: bench/paper.py's S2-only run)",
    )
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.epochs < 0 or args.seeds < 1:
        ap.error("--epochs: give 0 (no supervised network) or more; --seeds: give at least 1")
    if not Path(args.tasks).exists():
        ap.error(f"--tasks {args.tasks}: no task store there; run bench/paper.py or `mmearth tasks build`")
    t0 = time.perf_counter()
    try:
        enc, run_args = load_encoder(args.run, random_init=True)
    except CheckpointError as e:
        ap.error(f"--run {args.run}: {e}")
    source = StoreSource(args.tasks, CorpusReader(run_args["store"]).statistics, run_args["img_size"],
                         enc.in_chans)  # fmt: skip
    x, y, parts = load_split(source)
    print(f"{args.tasks}: {len(y)} tiles ({', '.join(f'{k} {len(v)}' for k, v in parts.items())}), "
          f"input {tuple(x.shape[1:])}")  # fmt: skip
    sup = [supervised(x, y, parts, args.epochs, s) for s in range(args.seeds)] if args.epochs else []
    t_sup = time.perf_counter() - t0
    hand = np.array(hand_probe(x, y, source, args.seeds))
    probes = {}
    for name, random_init in (("random init", True), ("pretrained", False)):
        res = evaluate(args.tasks, args.run, fractions=(1.0,), seeds=args.seeds, random_init=random_init,
                       only=["fields"])  # fmt: skip
        probes[name] = res["rows"][0]
    print(f"\n`fields` accuracy on test, 100 % of the labels, {args.seeds} seeds (chance 0.25)\n")
    print("| model | protocol | mean | std | values |\n|---|---|---:|---:|---|")
    test = np.array([b["test"] for b in sup])
    if sup:
        print(f"| plain CNN, from scratch | supervised, {args.epochs} epochs, epoch chosen on val (epochs "
              f"{', '.join(str(b['epoch'] + 1) for b in sup)}) | {test.mean():.3f} | {test.std():.3f} | "
              f"{', '.join(f'{v:.3f}' for v in test)} |")  # fmt: skip
    print(f"| hand-made statistics (band means, stds, gradient / std at 1, 2, 4 px) | linear probe | "
          f"{hand.mean():.3f} | {hand.std():.3f} | {', '.join(f'{v:.3f}' for v in hand)} |")  # fmt: skip
    for name, row in probes.items():
        print(f"| atto, {name} ({args.run}) | linear probe | {row['mean']:.3f} | {row['std']:.3f} | "
              f"{', '.join(f'{v:.3f}' for v in row['values'])} |")  # fmt: skip
    top, what = (test.mean(), "supervised plain CNN") if sup else (hand.mean(), "hand-made statistics' probe")
    headroom = float(top - probes["random init"]["mean"])
    print(f"\ntime {time.perf_counter() - t0:.0f} s (supervised {t_sup:.0f} s)")
    print(f"bench: ceiling fields_headroom={headroom:.3f} target={TARGET_HEADROOM} ({what} {top:.3f} "
          f"against the baseline, a linear probe of random-init atto {probes['random init']['mean']:.3f}, "
          f"same inputs, in-process{f'; hand-made statistics {hand.mean():.3f}' if sup else ''}) "
          f"{'ok' if headroom >= TARGET_HEADROOM else 'short'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
