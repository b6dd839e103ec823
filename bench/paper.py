"""MMEarth's experiment on the offline world: random init vs Sentinel-2-only vs all-modality pretraining.

    python bench/paper.py                       # CPU budget (documented below), about an hour on 2 cores
    python bench/paper.py --device cuda --steps 6000 --batch-size 256 --out docs/results/gpu
    python bench/paper.py --runs s2=runs/a,all=runs/b   # evaluate existing runs instead of pretraining
    python bench/paper.py --pretrain-seeds 2            # two pretraining runs per encoder (twice the cost)
    python bench/paper.py --weighting balanced          # the all-modality losses at equal gradient norms

Data flow: an offline corpus (``--tiles`` tiles of ``--tile-size`` px, world seed ``--seed``; built once
into ``--work``) -> two pretraining runs with the same budget (``--steps`` optimizer steps of
``--batch-size`` crops of ``--img-size`` px at base lr ``--blr``), one with the Sentinel-2 pretext only
(``--pretext s2``) and one with every modality (``--pretext all``); the randomly initialised encoder
of the same size is the third -> the downstream tasks of ``mmearth tasks build`` (``--task-tiles``
held-out tiles, the ``fields`` classes balanced) -> ``model.evaluate``'s linear probe at 1, 5, 50 and
100 % of the train labels with ``--seeds`` seeds (with ``--pretrain-seeds K``, each pretrained encoder is
K runs, seeds 0..K-1, whose probe results are pooled, so the spread covers the pretraining seed) ->
``paper.json``, a table in ``README.md`` and ``label_efficiency.png`` in ``--out`` (default
``docs/results``).

Runs and stores in ``--work`` are reused when they are complete (a pretraining run resumes), so an
interrupted benchmark picks up where it stopped.

The CPU budget: ``--blr 0.01`` (lr 1.25e-3 at batch 32). MMEarth's own blr 1.5e-4 is meant for an
effective batch of 4096 (lr 2.4e-3); scaled linearly to a batch of 32 it gives lr 1.9e-5, at which a
few hundred steps barely move the encoder.

Ends with ``bench: paper fields_margin=<v> target=>0 ok|short``: on the single-label task at 100 % of
the labels, the smaller of (all - S2-only) and (S2-only - random), each minus the sum of the two seed
spreads; positive when all-modality > S2-only > random init holds beyond the spreads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ENCODERS = ("random", "s2", "all")
WEIGHTING_TEXT = {
    "uncertainty": "by learned uncertainty (the paper's)",
    "balanced": "to equal gradient norms on the encoder's last layer (`--weighting balanced`)",
    "sum": "equally (a plain sum)",
}
FRACTIONS = (0.01, 0.05, 0.5, 1.0)


def corpus(args) -> str:
    from mmearth_data.build import BuildConfig, build_in_process
    from mmearth_data.store import CorpusReader

    store = str(Path(args.work) / f"corpus_{args.tiles}_{args.tile_size}_s{args.seed}.zarr")
    done = False
    if Path(store).exists():
        try:
            done = bool(CorpusReader(store).statistics)
        except Exception:  # an interrupted build: resume it
            done = False
    if done:
        _same_world(store, _world_version(store))
    else:
        build_in_process(
            BuildConfig(store=store, n_tiles=args.tiles, tile_size=args.tile_size, seed=args.seed)
        )
    return store


def _world_version(store: str) -> str | None:
    """The offline world version the corpus was drawn by (its build record)."""
    from mmearth_data.store import CorpusReader

    return CorpusReader(store).attrs["build"]["config"].get("source_version")


def _same_world(path: str | Path, built: str | None) -> None:
    """Refuse a store in --work drawn by another version of the offline world than this code draws."""
    from mmearth_data.sources import source_version

    now = source_version("offline")
    if built != now:
        raise SystemExit(
            f"{path} was drawn by offline world version {built}, this code draws version {now}; move it "
            "away (or choose another --work) to build it again"
        )


def tasks(args) -> str:
    from mmearth_data.tasks import build_tasks

    path = Path(args.work) / f"tasks_{args.task_tiles}_{args.tile_size}.zarr"
    if (path / "zarr.json").exists() and _complete_tasks(path):
        import zarr

        _same_world(path, zarr.open_group(str(path), mode="r").attrs.get("source_version"))
    else:
        if path.exists():
            import shutil

            shutil.rmtree(path)
        build_tasks(str(path), args.task_tiles, args.tile_size, workers=os.cpu_count() or 1)
    return str(path)


def _complete_tasks(path: Path) -> bool:
    import zarr

    try:
        return "tile_id" in zarr.open_group(str(path), mode="r")
    except Exception:
        return False


def pretrain(args, store: str, pretext: str, seed: int = 0) -> str:
    """The run directory of ``pretext`` pretrained with pretraining seed ``seed`` (``run_<pretext>_<steps>``,
    ``_seed<k>`` added for k > 0): reused when complete, resumed when not, refused when it holds other
    settings."""
    from model.pretrain import build_parser, read_state
    from model.pretrain import main as pretrain_main

    # the weighting applies to the all-modality run; S2-only has one target, whose weight only rescales
    # its loss, which Adam's update does not see
    weighting = args.weighting if pretext == "all" else "uncertainty"
    tag = ("_perband" if args.norm_pix == "per-band" else "") + (
        "" if weighting == "uncertainty" else f"_{weighting}"
    )
    out = Path(args.work) / (f"run_{pretext}_{args.steps}{tag}" + (f"_seed{seed}" if seed else ""))
    argv = ["--store", store, "--out", str(out), "--model", args.model, "--img-size", str(args.img_size),
            "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--blr", str(args.blr),
            "--pretext", pretext, "--device", args.device, "--workers", str(args.workers),
            "--seed", str(seed), "--precision", args.precision, "--norm-pix", args.norm_pix,
            "--weighting", weighting, "--no-progress"]  # fmt: skip
    if (out / "state.pt").exists():
        state = read_state(out / "state.pt")
        saved = json.loads(state["args"])
        saved.setdefault("seed", 0)
        saved.setdefault("norm_pix", "joint")
        saved.setdefault("weighting", "uncertainty")
        asked = {"store": store, "model": args.model, "img_size": args.img_size, "blr": args.blr,
                 "batch_size": args.batch_size, "pretext": pretext,
                 "weight_lr": build_parser().get_default("weight_lr"), "seed": seed,
                 "norm_pix": args.norm_pix, "weighting": weighting}  # fmt: skip
        differ = [f"{k}: {saved.get(k)} there, {v} asked" for k, v in asked.items() if saved.get(k) != v]
        if differ:
            raise SystemExit(
                f"{out} holds a run of other settings ({'; '.join(differ)}); move it away or choose "
                "another --work"
            )
        if int(state["step"]) >= args.steps:
            return str(out)
        argv.append("--resume")
    if pretrain_main(argv) != 0:
        raise SystemExit(f"pretraining ({pretext}) failed")
    return str(out)


def run(args) -> dict:
    from model.evaluate import evaluate

    Path(args.work).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    store = args.store or corpus(args)
    task_store = args.tasks or tasks(args)
    t_data = time.time() - t0
    pairs = [kv.split("=", 1) for kv in args.runs.split(",")] if args.runs else []
    runs = {enc: dirs.split("+") for enc, dirs in pairs}
    timings = {"data_s": round(t_data, 1)}
    for enc in ("s2", "all"):
        if enc not in runs:
            runs[enc] = [pretrain(args, store, enc, seed) for seed in range(args.pretrain_seeds)]
        # the sum of the runs' logged step times: what they cost, also when reused or resumed
        timings[f"pretrain_{enc}_s"] = round(sum(_logged_train_seconds(r) for r in runs[enc]), 1)
    n_runs = len(runs["s2"])
    if len(runs["all"]) != n_runs:
        raise SystemExit(f"--runs: {n_runs} S2-only run(s) but {len(runs['all'])} all-modality; give as many")
    rows = []
    t = time.time()
    for enc in ENCODERS:
        if enc == "random":  # one initialisation per probe seed: as many as the pretrained encoders have
            results = [evaluate(task_store, runs["all"][0], store=store, fractions=FRACTIONS,
                                seeds=args.seeds * n_runs, random_init=True)]  # fmt: skip
        else:
            results = [evaluate(task_store, run, store=store, fractions=FRACTIONS, seeds=args.seeds)
                       for run in runs[enc]]  # fmt: skip
        rows += [r | {"encoder": enc} for r in pool([res["rows"] for res in results])]
        print(f"evaluated {enc} ({time.time() - t:.0f} s)", flush=True)
    timings["evaluate_s"] = round(time.time() - t, 1)
    return {
        "corpus": {
            "source": "offline",
            "world_version": _world_version(store),
            "tiles": args.tiles,
            "tile_size": args.tile_size,
            "seed": args.seed,
            "tasks": task_store,
            "task_tiles": args.task_tiles,
        },  # fmt: skip
        "budget": {
            "model": args.model,
            "img_size": args.img_size,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "blr": args.blr,
            "device": args.device,
            "precision": args.precision,
            "norm_pix": args.norm_pix,
            "weighting": args.weighting,
            "pretrain_seeds": n_runs,
            "runs": runs,
        },  # fmt: skip
        "timings": timings,
        "rows": rows,
    }


def _logged_train_seconds(run: str) -> float:
    """Training time of a finished run from its metrics.csv (batch / samples_per_s summed over steps)."""
    import csv

    from model.pretrain import read_state

    state_args = json.loads(read_state(Path(run) / "state.pt")["args"])
    batch = state_args["batch_size"] * state_args.get("accum", 1)
    with open(Path(run) / "metrics.csv") as f:
        return sum(
            batch / float(r["samples_per_s"]) for r in csv.DictReader(f) if float(r["samples_per_s"]) > 0
        )


def pool(row_sets: list[list[dict]]) -> list[dict]:
    """Rows of several pretraining runs of one encoder (one list per run, the same tasks and fractions
    in the same order) as one row each: mean and standard deviation over every run's probe seeds, so the
    spread holds the pretraining seed's share as well as the probe's."""
    out = []
    for same in zip(*row_sets, strict=True):
        r0 = same[0]
        if any((r["task"], r["fraction"]) != (r0["task"], r0["fraction"]) for r in same):
            raise ValueError(f"runs evaluated on different tasks or fractions: {[r['task'] for r in same]}")
        vals = [v for r in same for v in r["values"]]
        out.append({k: r0[k] for k in ("task", "fraction", "metric")}
                   | {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "seeds": len(vals),
                      "runs": len(same)})  # fmt: skip
    return out


def margin(rows: list[dict], task: str = "fields") -> float:
    r = {x["encoder"]: x for x in rows if x["task"] == task and x["fraction"] == 1.0}
    gaps = [
        (r["all"]["mean"] - r["s2"]["mean"]) - (r["all"]["std"] + r["s2"]["std"]),
        (r["s2"]["mean"] - r["random"]["mean"]) - (r["s2"]["std"] + r["random"]["std"]),
    ]
    return float(min(gaps))


def table(rows: list[dict]) -> str:
    lines = [
        "| task | metric | fraction | random init | S2-only | all-modality |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        for frac in FRACTIONS:
            cell = {r["encoder"]: r for r in rows if r["task"] == task and r["fraction"] == frac}
            if not cell:
                continue
            vals = " | ".join(f"{cell[e]['mean']:.3f} ± {cell[e]['std']:.3f}" for e in ENCODERS)
            lines.append(f"| {task} | {cell['all']['metric']} | {frac:g} | {vals} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(task_names), figsize=(4.2 * len(task_names), 3.6))
    names = {"random": "random init", "s2": "S2-only", "all": "all-modality"}
    for ax, task in zip(np.atleast_1d(axes), task_names, strict=True):
        for enc in ENCODERS:
            rs = sorted(
                (r for r in rows if r["task"] == task and r["encoder"] == enc), key=lambda r: r["fraction"]
            )
            x = [100 * r["fraction"] for r in rs]
            ax.errorbar(x, [r["mean"] for r in rs], yerr=[r["std"] for r in rs], marker="o", capsize=3,
                        label=names[enc])  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("% of train labels")
        ax.set_ylabel(rs[0]["metric"])
        ax.set_title(task)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper.json").write_text(json.dumps(result, indent=1))
    plot(result["rows"], out / "label_efficiency.png")
    b, c, tm = result["budget"], result["corpus"], result["timings"]
    total = sum(tm.values())
    n_runs = b.get("pretrain_seeds", 1)
    spread = (
        f"; each pretrained encoder is {n_runs} pretraining runs of {args.seeds} probe seeds each, pooled, "
        "so the spread covers the pretraining seed too"
        if n_runs > 1
        else "; one pretraining run per encoder, so the spread is the probe's alone"
    )
    parts = [f"{k} {v:.0f}" + (" (stores reused)" if k == "data_s" and v < 5 else "") for k, v in tm.items()]
    text = f"""# MMEarth's experiment on the offline world

`python bench/paper.py {" ".join(sys.argv[1:])}`: written by the script; do not edit by hand.

- Corpus: {c["tiles"]} offline tiles of {c["tile_size"]} px (world version {c.get("world_version", "?")}, seed
  {c["seed"]}); downstream tasks from {c["task_tiles"]} tiles of the held-out blocks (`fields` classes
  balanced).
- Budget per pretrained encoder: {b["model"]}, {b["img_size"]} px crops, batch {b["batch_size"]},
  {b["steps"]} steps, blr {b["blr"]}, on {b["device"]} ({b.get("precision", "fp32")} autocast), Sentinel-2
  target normalised {b.get("norm_pix", "joint")} per patch, all-modality losses weighted
  {WEIGHTING_TEXT[b.get("weighting", "uncertainty")]}. Random init is the same encoder untrained.
- Protocol: frozen encoder, linear probe (L2 chosen on val, scored on test); mean ± standard deviation
  over {result["rows"][0]["seeds"]} values per cell (a train subset per probe seed below 100 %, a bootstrap
  resample of the train split at 100 %, and for random init one initialisation per seed){spread}.
- Time: {total / 60:.0f} min ({", ".join(parts)}; pretraining as the sum of its logged steps).

{table(result["rows"])}

Single-label task at 100 %: margin {margin(result["rows"]):+.3f} (the smaller of all - S2 and S2 -
random, each minus the sum of the two spreads; positive when the paper's ordering holds).

![label efficiency](label_efficiency.png)
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    from model.mpmae import NORM_PIX, WEIGHTINGS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="data/paper", help="corpus, task store and runs (reused)")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--tiles", type=int, default=8192)
    ap.add_argument("--tile-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--task-tiles", type=int, default=2000)
    ap.add_argument("--model", default="atto")
    ap.add_argument("--img-size", type=int, default=56)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--blr", type=float, default=0.01)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--precision", default="bf16", choices=["bf16", "fp32"],
        help="pretraining's autocast: bf16 (1.2-1.6x the fp32 step rate on an AVX512-BF16 CPU, see "
        "bench/README.md; the default on CUDA anyway); fp32 on CPUs without native bf16",
    )  # fmt: skip
    ap.add_argument(
        "--norm-pix", default="joint", choices=NORM_PIX,
        help="the Sentinel-2 target's per-patch normalisation in both pretraining runs: joint (the paper's) "
        "or per-band (the ablation; runs named run_<pretext>_<steps>_perband)",
    )  # fmt: skip
    ap.add_argument(
        "--weighting", default="uncertainty", choices=WEIGHTINGS,
        help="the all-modality run's loss weighting: uncertainty (the paper's) or balanced (each target the "
        "same gradient norm on the encoder's last layer; runs named run_all_<steps>[_perband]_balanced)",
    )  # fmt: skip
    ap.add_argument("--seeds", type=int, default=3, help="probe seeds per pretrained encoder")
    ap.add_argument("--pretrain-seeds", type=int, default=1,
                    help="pretraining runs per encoder (seeds 0..K-1); the spread then covers them too, and "
                    "pretraining costs K times as much")  # fmt: skip
    ap.add_argument(
        "--runs", help="evaluate these runs instead of pretraining: s2=DIR[+DIR..],all=DIR[+DIR..]"
    )
    ap.add_argument("--store", help="an existing corpus instead of building one in --work")
    ap.add_argument("--tasks", help="an existing task store instead of building one in --work")
    args = ap.parse_args(argv)
    if args.pretrain_seeds < 1 or args.seeds < 1:
        ap.error("--seeds and --pretrain-seeds take a positive number")
    result = run(args)
    write(result, Path(args.out), args)
    print(table(result["rows"]))
    m = margin(result["rows"])
    print(f"bench: paper fields_margin={m:+.3f} target=>0 {'ok' if m > 0 else 'short'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
