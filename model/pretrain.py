"""Pretrain MP-MAE on a corpus store: ``python -m model.pretrain --store data/demo.zarr --out runs/demo``.

Runs on CPU or CUDA (bf16 autocast on GPU by default, on CPU with ``--precision bf16``); under
``torchrun`` it uses DDP (NCCL on GPU, gloo on CPU) with no extra flag. Writes into ``--out``:

- ``model.safetensors``  the MP-MAE weights (encoder under ``encoder.``), safetensors
- ``state.pt``           step, optimizer state and the run's arguments (plain tensors and numbers, loaded
                         with ``torch.load(weights_only=True)``)
- ``metrics.csv``        one row per optimizer step: lr, total loss, per-modality loss, uncertainty weights,
                         samples/s
- ``tb/``                the same curves for TensorBoard
- ``loss_curves.png``    loss per modality against step

``--resume`` continues from ``state.pt``: the same step, optimizer state, learning-rate schedule and data
stream (the stream is a function of the seed, so the resumed run sees the samples the uninterrupted run
would have seen, and the same masks). Exit status 2 on bad input, with a message naming the problem.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmearth_data.argtypes import cli_terms
from mmearth_data.store import StoreError
from model.data import BatchNormaliser, DataError, StreamingCorpus, make_loader, read_tile_list
from model.encoder import SIZES, check_geometry
from model.mpmae import MPMAE, NORM_PIX, PRETEXT_GROUPS, WEIGHTINGS, select_pretext

log = logging.getLogger("model.pretrain")


class UsageError(Exception):
    """Bad input: the run stops with exit status 2 before touching anything."""


def build_parser() -> argparse.ArgumentParser:
    """The options of a pretraining run (the command line's; :func:`options` takes the same names)."""
    ap = argparse.ArgumentParser(prog="python -m model.pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="corpus store (path or fsspec URL)")
    ap.add_argument("--out", required=True, help="run directory (checkpoints, metrics, curves)")
    ap.add_argument("--model", default="atto", choices=sorted(SIZES), help="ConvNeXt V2 size")
    ap.add_argument("--img-size", type=int, default=56, help="crop size in pixels")
    ap.add_argument("--patch-size", type=int, default=8, help="mask patch size (multiple of 8)")
    ap.add_argument("--mask-ratio", type=float, default=0.6)
    ap.add_argument("--batch-size", type=int, default=32, help="per device and micro-step")
    ap.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-steps per step")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps in total")
    g.add_argument("--epochs", type=float, help="passes over the training tiles (converted to steps)")
    ap.add_argument("--blr", type=float, default=1.5e-4, help="base lr; lr = blr * global batch / 256")
    ap.add_argument("--min-lr", type=float, default=0.0)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 10%% of the steps)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    ap.add_argument("--pretext", default="all", help="|".join(PRETEXT_GROUPS) + " or a list of modalities")
    ap.add_argument(
        "--decoder", default="shared", choices=["per-modality", "shared"],
        help="one decoder computed once for all targets (default), or one per target as in the paper",
    )  # fmt: skip
    ap.add_argument("--decoder-dim", type=int, default=512)
    ap.add_argument(
        "--norm-pix", default="joint", choices=NORM_PIX,
        help="Sentinel-2 target normalised per patch over all its bands jointly (FCMAE, MMEarth) or per band",
    )  # fmt: skip
    ap.add_argument(
        "--cloud-aware", action=argparse.BooleanOptionalAction, default=True,
        help="leave opaque-cloud pixels (stored masks) out of every pixel target's loss",
    )  # fmt: skip
    ap.add_argument(
        "--aux-loss-on", default="masked", choices=["masked", "all"],
        help="where the pixel targets other than Sentinel-2 (Sentinel-1, DEM, land cover, canopy height) "
        "are scored: on the masked patches, as Sentinel-2's reconstruction, or on every pixel",
    )  # fmt: skip
    ap.add_argument(
        "--normalise",
        choices=["device", "loader"],
        default="device",
        help="device: workers hand out the stored integers and the training process normalises them where "
        "the model runs (half the bytes through shared memory and to the GPU); loader: workers normalise "
        "to float32. Both give the same values",
    )
    ap.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop with a message, instead of training on no-data, when a shard file the loader reads is "
        "gone (deleted, or the store changed while training); damaged chunks always fail their CRC32C",
    )
    ap.add_argument(
        "--recipe",
        choices=["paper"],
        help="paper: MMEarth's pretraining recipe (200 epochs, effective batch 4096 by accumulation, "
        "blr 1.5e-4, 40 warmup epochs); explicit --steps/--epochs/--accum/--blr/--warmup still win",
    )
    ap.add_argument(
        "--weighting", default="uncertainty", choices=WEIGHTINGS,
        help="uncertainty (learned, the paper's), balanced (each target the same gradient norm on the "
        "encoder's last layer) or sum",
    )  # fmt: skip
    ap.add_argument("--weight-lr", type=float, default=0.02,
                    help="constant lr of the uncertainty weights (their log-variances), so that they reach "
                    "their balance (weight = 1 / loss) within ~100 steps; 0: the encoder's schedule, under "
                    "which a few hundred steps hold every weight within exp(+-0.5)")  # fmt: skip
    ap.add_argument("--split", default="train", help="tiles of this split (ignored with --tiles)")
    ap.add_argument("--tiles", help="text file of tile ids to train on (e.g. from `mmearth catalog search`)")
    ap.add_argument("--shuffle-buffer", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    ap.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    ap.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after N steps in this call")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    ap.add_argument("--log-tiles", action="store_true", help="write the tile indices each rank saw")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    args.explicit = sorted(
        {a.split("=")[0].lstrip("-").replace("-", "_") for a in given if a.startswith("--")}
    )
    return args


def options(**given: Any) -> argparse.Namespace:
    """A run's options from Python: keyword arguments named as the command line's options (``store``,
    ``out``, ``img_size``, ...), the parser's defaults for the rest; :func:`run` takes the result. An
    unknown name, or no ``store`` or ``out``, raises :class:`UsageError`."""
    ap = build_parser()
    args = ap.parse_args(["--store", "", "--out", ""])  # every default
    unknown = sorted(set(given) - set(vars(args)))
    if unknown:
        raise UsageError(f"unknown pretraining options {unknown}; known: {sorted(vars(args))}")
    missing = [k for k in ("store", "out") if not given.get(k)]
    if missing:
        raise UsageError(f"pretraining needs {' and '.join(missing)}")
    for k, v in given.items():
        setattr(args, k, v)
    args.explicit = sorted(given)  # as if given on the command line (a recipe does not override them)
    return args


def apply_recipe(args: argparse.Namespace, world: int, n_tiles: int) -> None:
    """``--recipe paper``: epochs, accumulation to an effective batch of 4096, blr and warmup from
    :data:`PAPER_RECIPE`, unless given explicitly on the command line."""
    if args.recipe != "paper":
        return
    given = set(getattr(args, "explicit", []))
    r = PAPER_RECIPE
    if "steps" not in given and "epochs" not in given:
        args.steps, args.epochs = None, r["epochs"]
    if "accum" not in given:
        args.accum = max(1, round(r["effective_batch"] / (args.batch_size * world)))
    if "blr" not in given:
        args.blr = r["blr"]
    if "warmup" not in given:
        global_batch = args.batch_size * args.accum * world
        args.warmup = max(1, math.ceil(r["warmup_epochs"] * n_tiles / global_batch))


# run arguments that must match on --resume (the model and what it predicts)
ARCH_KEYS = (
    "model", "patch_size", "pretext", "decoder", "decoder_dim", "weighting", "norm_pix", "aux_loss_on"
)  # fmt: skip
PRECISIONS = ("auto", "bf16", "fp32")
PRECISION_HELP = (
    "autocast of the forward pass: bf16 (weights, optimizer and losses stay float32) or fp32; auto: bf16 "
    "on CUDA, fp32 on CPU (bf16 pays on CPUs with native bf16 instructions, AVX512-BF16 or AMX)"
)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``--precision`` for ``device``: ``auto`` is bf16 on CUDA and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The forward pass's autocast context for ``--precision`` on ``device``."""
    bf16 = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# MMEarth's pretraining recipe (Nedungadi et al. 2024, ConvNeXt V2 FCMAE settings)
PAPER_RECIPE = {"epochs": 200.0, "effective_batch": 4096, "blr": 1.5e-4, "warmup_epochs": 40.0}


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup to ``peak`` then half-cosine down to ``floor``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decayed weights, undecayed ones (norms, biases, mask token) and the uncertainty weights'
    log-variances (undecayed; :func:`set_lr` may give them their own learning rate)."""
    decay, no_decay, log_vars = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("log_vars"):
            log_vars.append(p)
        else:
            (no_decay if p.ndim <= 1 or "mask_token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups + ([{"params": log_vars, "weight_decay": 0.0, "log_vars": True}] if log_vars else [])


def set_lr(opt: torch.optim.Optimizer, lr: float, weight_lr: float) -> None:
    """The schedule's ``lr`` for the model, a constant ``weight_lr`` (when > 0) for the log-variances."""
    for gp in opt.param_groups:
        gp["lr"] = weight_lr if gp.get("log_vars") and weight_lr > 0 else lr


def setup_distributed(device_arg: str) -> tuple[int, int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, local, device


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, foreign, or not weights-only."""


def read_state(path: Path) -> dict:
    """``state.pt`` loaded weights-only, or :class:`CheckpointError` naming the file and the fix."""
    import pickle
    import zipfile

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint of this project ({first}); it is truncated, damaged or "
            "holds objects other than tensors (only weights-only checkpoints are loaded). Restore it or "
            "pretrain again into a new --out"
        ) from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors``, or :class:`CheckpointError` naming the file and the fix."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types (header, truncation)
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({str(err)[:160]}); it is truncated or damaged. "
            "Restore it or pretrain again into a new --out"
        ) from None


def check_args(args: argparse.Namespace) -> None:
    if args.img_size < 1 or args.patch_size < 1:
        raise UsageError(f"--img-size {args.img_size} and --patch-size {args.patch_size} must be positive")
    if not 0.0 < args.mask_ratio < 1.0:
        raise UsageError(f"--mask-ratio {args.mask_ratio}: must be between 0 and 1 (exclusive), e.g. 0.6")
    try:
        check_geometry(args.img_size, args.patch_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    for name in ("batch_size", "accum"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError("--epochs must be positive")


def load_resume(out: Path, args: argparse.Namespace) -> dict | None:
    state_path = out / "state.pt"
    if not args.resume:
        if state_path.exists():
            raise UsageError(
                f"{out} already holds a run (state.pt); pass --resume to continue it or use a new --out"
            )
        return None
    if not state_path.exists():
        raise UsageError(f"--resume: no checkpoint in {out} (state.pt missing)")
    try:
        state = read_state(state_path)
        saved = json.loads(state["args"])
    except (CheckpointError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise UsageError(f"--resume: {err}") from None
    defaults = build_parser()  # a key a checkpoint predates had its default then
    diff = [
        f"{k}: checkpoint {saved.get(k, defaults.get_default(k))!r}, now {getattr(args, k)!r}"
        for k in ARCH_KEYS
        if saved.get(k, defaults.get_default(k)) != getattr(args, k)
    ]
    if diff:
        raise UsageError(f"--resume: the checkpoint in {out} is from another model ({'; '.join(diff)})")
    return state


def save_checkpoint(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, args) -> None:
    tmp_w, tmp_s = out / "model.safetensors.tmp", out / "state.pt.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp_w))
    torch.save(
        {"step": torch.tensor(step), "optimizer": opt.state_dict(), "args": json.dumps(vars(args))}, tmp_s
    )
    os.replace(tmp_w, out / "model.safetensors")
    os.replace(tmp_s, out / "state.pt")


def plot_curves(csv_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(csv_path)
    loss_cols = [c for c in df.columns if c.startswith("loss/")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].plot(df["step"], df["loss"], color="k")
    axes[0].set(title="total loss", xlabel="step")
    colours = plt.get_cmap("tab20").colors
    for k, c in enumerate(loss_cols):
        axes[1].plot(df["step"], df[c], label=c[5:], color=colours[k % len(colours)])
    axes[1].set(title="loss per modality", xlabel="step", yscale="log")
    axes[1].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


@dataclass
class Session:
    """What a run trains with, as :func:`prepare` set it up: the process's place in the job, the data
    stream, the model and optimizer (resumed where the run continues), and the schedule."""

    args: argparse.Namespace
    out: Path
    rank: int
    world: int
    device: torch.device
    start_step: int
    total: int
    warmup: int
    peak: float
    global_batch: int
    resumed: bool
    model: MPMAE
    net: torch.nn.Module  # the model, wrapped in DDP when the job has several processes
    opt: torch.optim.Optimizer
    normalise: BatchNormaliser | None
    batches: Iterator[dict[str, torch.Tensor]]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1


def _dataset(args: argparse.Namespace, targets: list, start_step: int) -> StreamingCorpus:
    """The training stream of the store: the split, or the tile list of ``--tiles``."""
    try:
        tile_ids = read_tile_list(args.tiles) if args.tiles else None
    except OSError as err:
        hint = "write one with `mmearth catalog search --write-tiles`"
        raise UsageError(f"--tiles {args.tiles}: {err.strerror or err} ({hint})") from None
    except DataError as err:
        raise UsageError(f"--tiles: {err}") from None
    try:
        return StreamingCorpus(
            args.store, targets, args.img_size,
            split=None if tile_ids is not None else args.split, tile_ids=tile_ids,
            shuffle_buffer=args.shuffle_buffer, seed=args.seed, start_batches=start_step * args.accum,
            batch_size=args.batch_size, cloud_mask=args.cloud_aware, verify=args.verify,
            raw=args.normalise == "device",
        )  # fmt: skip
    except (DataError, StoreError) as err:
        raise UsageError(str(err)) from None


def _model(
    args: argparse.Namespace, targets: list, device: torch.device, peak: float, state: dict | None, out: Path
) -> tuple[MPMAE, torch.optim.Optimizer]:
    """(model, optimizer at learning rate ``peak``): built from the run's options, loaded from ``out``
    when resuming."""
    torch.manual_seed(args.seed)
    model = MPMAE(
        targets, args.model, args.patch_size, mask_ratio=args.mask_ratio, decoder=args.decoder,
        decoder_dim=args.decoder_dim, weighting=args.weighting, norm_pix=args.norm_pix,
        cloud_aware=args.cloud_aware, aux_loss_on=args.aux_loss_on,
    ).to(device)  # fmt: skip
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=peak, betas=(0.9, 0.95))
    if state is not None:
        try:
            model.load_state_dict(read_weights(out / "model.safetensors"))
            opt.load_state_dict(state["optimizer"])
        except CheckpointError as err:
            raise UsageError(f"--resume: {err}") from None
        except (RuntimeError, ValueError, KeyError) as err:
            raise UsageError(
                f"--resume: the checkpoint in {out} does not fit this model: {str(err)[:300]}"
            ) from None
    return model, opt


def prepare(args: argparse.Namespace) -> Session:
    """Check the options, join the job, open the data stream, build (or resume) the model and fix the
    schedule; nothing is written yet."""
    check_args(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a directory for the run (nothing was changed)")
    rank, world, local, device = setup_distributed(args.device)
    state = load_resume(out, args)
    try:
        targets = select_pretext(args.pretext)
    except ValueError as err:
        raise UsageError(str(err)) from None
    start_step = int(state["step"]) if state is not None else 0
    ds = _dataset(args, targets, start_step)
    apply_recipe(args, world, ds.n_eligible)
    ds.start_batches = start_step * args.accum  # the recipe may have set the accumulation
    global_batch = args.batch_size * args.accum * world
    total = args.steps or max(1, math.ceil((args.epochs or 1.0) * ds.n_eligible / global_batch))
    peak = args.blr * global_batch / 256
    model, opt = _model(args, targets, device, peak, state, out)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local] if device.type == "cuda" else None
        )
    loader = make_loader(
        ds,
        args.batch_size,
        args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    return Session(
        args, out, rank, world, device, start_step, total,
        warmup=args.warmup if args.warmup is not None else max(1, total // 10),
        peak=peak, global_batch=global_batch, resumed=state is not None, model=model, net=net, opt=opt,
        normalise=BatchNormaliser(ds) if ds.raw else None, batches=iter(loader),
    )  # fmt: skip


class RunLog:
    """What a run writes as it goes: ``metrics.csv`` and TensorBoard curves and the progress bar (main
    process), the tile indices each rank saw (``--log-tiles``). A resumed run keeps the rows up to its
    step."""

    def __init__(self, s: Session):
        args, out = s.args, s.out
        out.mkdir(parents=True, exist_ok=True)  # every rank: each may write its own tile log
        self.tiles = open(out / f"tiles_rank{s.rank}.txt", "a") if args.log_tiles else None
        self.writer = self.csv_file = self.progress = None
        if not s.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tb"), purge_step=s.start_step)
        csv_path = out / "metrics.csv"
        rows_kept = []
        if s.resumed and csv_path.exists():
            with open(csv_path) as f:
                rows_kept = [r for r in csv.DictReader(f) if int(r["step"]) <= s.start_step]
        names = [t.name for t in s.model.targets]
        fields = ["step", "lr", "loss", "samples_per_s", "data_wait_s"] + [f"loss/{n}" for n in names]
        fields += [f"w/{n}" for n in names] if args.weighting != "sum" else []
        self.csv_file = open(csv_path, "w", newline="")
        self.rows = csv.DictWriter(self.csv_file, fieldnames=fields)
        self.rows.writeheader()
        self.rows.writerows(rows_kept)
        if not args.no_progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )  # fmt: skip
            self.progress.start()
            self.task = self.progress.add_task("steps", total=s.total, completed=s.start_step, info="")

    def batch(self, index: torch.Tensor) -> None:
        if self.tiles is not None:
            self.tiles.write("\n".join(str(int(i)) for i in index) + "\n")

    def step(self, last: dict[str, float]) -> None:
        if self.csv_file is None:
            return
        self.rows.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in last.items()})
        for k, v in last.items():
            if k != "step":
                self.writer.add_scalar(k, v, last["step"])
        if self.progress is not None:
            info = f"loss {last['loss']:.4f}  {last['samples_per_s']:.1f} samples/s"
            self.progress.update(self.task, completed=last["step"], info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tiles is not None:
            self.tiles.close()
        if self.csv_file is not None:
            self.csv_file.close()
            self.writer.close()


def train_step(s: Session, step: int, log: RunLog) -> tuple[dict[str, float], float]:
    """One optimizer step of ``--accum`` micro-batches: (mean losses over the job, seconds spent
    waiting for data). Masks are a function of (seed, step, micro-batch, rank)."""
    args = s.args
    forward_precision = autocast(args.precision, s.device)
    sums: dict[str, float] = {}
    wait = 0.0
    for micro in range(args.accum):
        t0 = time.perf_counter()
        batch = next(s.batches)
        wait += time.perf_counter() - t0
        log.batch(batch["index"])
        batch = {k: v.to(s.device, non_blocking=True) for k, v in batch.items()}
        if s.normalise is not None:
            batch = s.normalise(batch)
        gen = torch.Generator().manual_seed(((args.seed * 1_000_003 + step) * 131 + micro) * 65_537 + s.rank)
        sync = (not s.ddp) or micro == args.accum - 1
        ctx = s.net.no_sync() if not sync else contextlib.nullcontext()
        with ctx, forward_precision:
            loss, logs = s.net(batch, generator=gen)
        (loss / args.accum).backward()
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / args.accum
        for k, v in logs.items():
            key = k if k.startswith("w/") else f"loss/{k}"
            sums[key] = sums.get(key, 0.0) + float(v) / args.accum
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    if s.ddp:
        keys = sorted(sums)
        vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=s.device)
        torch.distributed.all_reduce(vec)
        sums = {k: float(v) / s.world for k, v in zip(keys, vec.tolist(), strict=True)}
    return sums, wait


def run(args: argparse.Namespace) -> dict:
    """Pretrain as ``args`` say (see :func:`options` for calling it from Python); returns where the
    run's files are and the last step's metrics."""
    s = prepare(args)
    log = RunLog(s)
    end = s.total if args.stop_after is None else min(s.total, s.start_step + args.stop_after)
    s.model.train()
    last: dict[str, float] = {}
    t_prev = time.perf_counter()
    for step in range(s.start_step, end):
        lr = lr_at(step, s.total, s.warmup, s.peak, args.min_lr)
        set_lr(s.opt, lr, args.weight_lr)
        sums, wait = train_step(s, step, log)
        now = time.perf_counter()
        sps = s.global_batch / max(now - t_prev, 1e-9)
        t_prev = now
        last = {"step": step + 1, "lr": lr, "samples_per_s": sps, "data_wait_s": wait, **sums}
        log.step(last)
        if (step + 1) % args.save_every == 0 and step + 1 < end and s.is_main:
            save_checkpoint(s.out, s.model, s.opt, step + 1, args)
    log.close()
    out = s.out
    result = {"out": str(out), "step": end, "total_steps": s.total, "last": last}
    if s.is_main:
        save_checkpoint(out, s.model, s.opt, end, args)
        plot_curves(out / "metrics.csv", out / "loss_curves.png")
        result.update(
            checkpoint=str(out / "model.safetensors"), state=str(out / "state.pt"),
            metrics=str(out / "metrics.csv"), tensorboard=str(out / "tb"), plot=str(out / "loss_curves.png"),
        )  # fmt: skip
    if s.ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_and_report(parse_args(argv))


def run_and_report(args: argparse.Namespace) -> int:
    """:func:`run`, then what it wrote printed; bad input or a damaged store printed as one error line.
    Returns the exit status (0, or 2 on bad input)."""
    try:
        res = run(args)
    except UsageError as err:
        print(f"error: {cli_terms(err)}", file=sys.stderr)
        return 2
    except (DataError, StoreError) as err:  # the store damaged, changed or gone while training
        text = str(err)
        if "Original Traceback" in text:  # raised in a DataLoader worker: its own message only
            text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]  # "model.data.DataError: ..."
        print(
            f"error: {cli_terms(text)} (checkpoints so far are kept; --resume goes on from there)",
            file=sys.stderr,
        )
        return 2
    if "checkpoint" in res:
        last = res["last"]
        print(f"step {res['step']}/{res['total_steps']}  loss {last.get('loss', float('nan')):.4f}")
        for k in ("checkpoint", "state", "metrics", "tensorboard", "plot"):
            print(f"  {k:<12} {res[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
