"""Linear probing of a pretrained encoder: ``python -m model.probe --store S --run runs/demo``.

Data flow: store tiles (train split / held-out val+test splits, centre crops) -> frozen encoder of the
run's ``model.safetensors`` (no mask) -> global average pooled features -> a multinomial logistic
regression (L-BFGS, L2) on a tile-level categorical target (default: biome) -> accuracy on the
held-out tiles. The same probe on a randomly initialised encoder of the same size is the baseline:
a useful encoder beats it. Prints a table and writes ``probe_<target>.json`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mmearth_data.argtypes import cli_terms
from mmearth_data.registry import RegistryError, get
from model.data import StreamingCorpus
from model.encoder import MaskedConvNeXtV2
from model.evaluate import fit_linear, load_encoder


@torch.no_grad()
def features(encoder: MaskedConvNeXtV2, ds: StreamingCorpus, target: str, batch: int = 64):
    """Pooled features and targets of every tile of ``ds``, read as a stream: at most ``batch`` tiles
    are held at a time."""
    encoder.eval()
    xs, ys, chunk = [], [], []

    def flush():
        x = torch.stack([torch.nan_to_num(s["sentinel2"]) for s in chunk])
        xs.append(encoder(x).mean(dim=(-2, -1)))
        ys.append(torch.stack([s[target] for s in chunk]).reshape(-1))
        chunk.clear()

    for sample in ds:
        chunk.append(sample)
        if len(chunk) == batch:
            flush()
    if chunk:
        flush()
    return torch.cat(xs), torch.cat(ys).long()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, steps: int = 200):
    """Multinomial logistic regression on standardised features; returns a predict function."""
    logits = fit_linear(x, y, torch.nn.functional.cross_entropy, n_classes, l2, steps)
    return lambda z: logits(z).argmax(1)


def probe(store: str, run: str, target: str = "biome", img_size: int | None = None, seeds: int = 1) -> dict:
    """The probe on the run's encoder and on a randomly initialised one. With ``seeds`` > 1 each seed
    fits on a bootstrap resample of the training tiles (and, for the random encoder, draws its own
    initialisation); the result carries the mean and standard deviation over seeds."""
    run_dir = Path(run)
    enc, args = load_encoder(run, random_init=False)
    img = img_size or args["img_size"]
    m = get(target)
    if not (m.kind == "tile" and m.categorical):
        raise ValueError(f"--target {target}: a tile-level categorical modality is needed (e.g. biome)")
    mods = [get("sentinel2"), m]
    train = StreamingCorpus(store, mods, img, split="train", epochs=1, random_crop=False, seed=0)
    held = [
        StreamingCorpus(store, mods, img, split=s, epochs=1, random_crop=False, seed=0)
        for s in ("val", "test")
        if _has_split(store, s)
    ]
    results = {}
    for name in ("pretrained", "random init"):
        accs = []
        for seed in range(seeds):
            if name == "random init" or seed == 0:
                if name == "random init":
                    enc, _ = load_encoder(run, random_init=True, seed=seed)
                xtr, ytr = features(enc, train, target)
                parts = [features(enc, h, target) for h in held]
                xte = torch.cat([p[0] for p in parts])
                yte = torch.cat([p[1] for p in parts])
            keep_tr, keep_te = ytr >= 0, yte >= 0
            x, y = xtr[keep_tr], ytr[keep_tr]
            if seeds > 1:  # a bootstrap resample of the training tiles
                pick = torch.from_numpy(np.random.default_rng(seed).choice(len(y), len(y), replace=True))
                x, y = x[pick], y[pick]
            predict = fit_logistic(x, y, len(m.classes))
            accs.append(float((predict(xte[keep_te]) == yte[keep_te]).float().mean()))
        results[name] = {
            "accuracy": float(np.mean(accs)),
            "std": float(np.std(accs)),
            "seeds": seeds,
            "n_train": int(keep_tr.sum()),
            "n_test": int(keep_te.sum()),
        }
    majority = float(np.bincount(ytr[ytr >= 0].numpy()).max() / max(1, int((ytr >= 0).sum())))
    gap = results["pretrained"]["accuracy"] - results["random init"]["accuracy"]
    spread = results["pretrained"]["std"] + results["random init"]["std"]
    out = {
        "target": target,
        "model": args["model"],
        "img_size": img,
        "results": results,
        "majority_train": majority,
        "gap": gap,
        "gap_beyond_spread": bool(seeds > 1 and gap > spread),
    }
    (run_dir / f"probe_{target}.json").write_text(json.dumps(out, indent=1))
    return out


def _has_split(store: str, split: str) -> bool:
    from mmearth_data.store import CorpusReader

    return bool(CorpusReader(store).eligible(split).any())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.probe", description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--run", required=True, help="pretraining run directory (model.safetensors, state.pt)")
    ap.add_argument("--target", default="biome", help="tile-level categorical modality (biome, ecoregion)")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument(
        "--seeds", type=int, default=1, help="bootstrap resamples of the training tiles (mean and spread)"
    )
    args = ap.parse_args(argv)
    if not (Path(args.run) / "state.pt").exists():
        print(f"error: {args.run} holds no pretraining run (state.pt missing)", file=sys.stderr)
        return 2
    try:
        out = probe(args.store, args.run, args.target, args.img_size, max(1, args.seeds))
    except (ValueError, RegistryError) as err:  # CheckpointError is a ValueError
        print(f"error: {cli_terms(err.args[0] if isinstance(err, RegistryError) else err)}", file=sys.stderr)
        return 2
    print(f"linear probe on {out['target']} ({out['model']}, {out['img_size']} px):")
    for name, r in out["results"].items():
        spread = f" +- {r['std']:.3f} ({r['seeds']} seeds)" if r["seeds"] > 1 else ""
        sizes = f"(train {r['n_train']}, held out {r['n_test']})"
        print(f"  {name:<12} accuracy {r['accuracy']:.3f}{spread}  {sizes}")
    print(f"  majority class of the training tiles: {out['majority_train']:.3f}")
    if args.seeds > 1:
        verdict = "beyond" if out["gap_beyond_spread"] else "within"
        print(f"  pretrained - random init: {out['gap']:+.3f}, {verdict} the sum of the two spreads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
