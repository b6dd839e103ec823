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

from mmearth_data.registry import get
from model.data import StreamingCorpus
from model.encoder import MaskedConvNeXtV2
from model.evaluate import fit_linear, load_encoder


@torch.no_grad()
def features(encoder: MaskedConvNeXtV2, ds: StreamingCorpus, target: str, batch: int = 64):
    encoder.eval()
    xs, ys = [], []
    samples = list(ds)
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        x = torch.stack([torch.nan_to_num(s["sentinel2"]) for s in chunk])
        xs.append(encoder(x).mean(dim=(-2, -1)))
        ys.append(torch.stack([s[target] for s in chunk]).reshape(-1))
    return torch.cat(xs), torch.cat(ys).long()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, steps: int = 200):
    """Multinomial logistic regression on standardised features; returns a predict function."""
    logits = fit_linear(x, y, torch.nn.functional.cross_entropy, n_classes, l2, steps)
    return lambda z: logits(z).argmax(1)


def probe(store: str, run: str, target: str = "biome", img_size: int | None = None, seed: int = 0) -> dict:
    run_dir = Path(run)
    enc, args = load_encoder(run, random_init=False, seed=seed)
    img = img_size or args["img_size"]
    m = get(target)
    if not (m.kind == "tile" and m.categorical):
        raise ValueError(f"--target {target}: a tile-level categorical modality is needed (e.g. biome)")
    mods = [get("sentinel2"), m]
    train = StreamingCorpus(store, mods, img, split="train", epochs=1, random_crop=False, seed=seed)
    held = [
        StreamingCorpus(store, mods, img, split=s, epochs=1, random_crop=False, seed=seed)
        for s in ("val", "test")
        if _has_split(store, s)
    ]
    results = {}
    for name in ("pretrained", "random init"):
        if name == "random init":
            enc, _ = load_encoder(run, random_init=True, seed=seed)
        xtr, ytr = features(enc, train, target)
        parts = [features(enc, h, target) for h in held]
        xte = torch.cat([p[0] for p in parts])
        yte = torch.cat([p[1] for p in parts])
        keep_tr, keep_te = ytr >= 0, yte >= 0
        predict = fit_logistic(xtr[keep_tr], ytr[keep_tr], len(m.classes))
        acc = float((predict(xte[keep_te]) == yte[keep_te]).float().mean())
        results[name] = {"accuracy": acc, "n_train": int(keep_tr.sum()), "n_test": int(keep_te.sum())}
    majority = float(np.bincount(ytr[ytr >= 0].numpy()).max() / max(1, int((ytr >= 0).sum())))
    out = {
        "target": target,
        "model": args["model"],
        "img_size": img,
        "results": results,
        "majority_train": majority,
    }
    (run_dir / f"probe_{target}.json").write_text(json.dumps(out, indent=1))
    return out


def _has_split(store: str, split: str) -> bool:
    from mmearth_data.store import CorpusReader, strings

    g = CorpusReader(store).group
    return bool(((strings(g["split"][:]) == split) & np.asarray(g["complete"][:])).any())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.probe", description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--run", required=True, help="pretraining run directory (model.safetensors, state.pt)")
    ap.add_argument("--target", default="biome", help="tile-level categorical modality (biome, ecoregion)")
    ap.add_argument("--img-size", type=int, default=None)
    args = ap.parse_args(argv)
    if not (Path(args.run) / "state.pt").exists():
        print(f"error: {args.run} holds no pretraining run (state.pt missing)", file=sys.stderr)
        return 2
    try:
        out = probe(args.store, args.run, args.target, args.img_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"linear probe on {out['target']} ({out['model']}, {out['img_size']} px):")
    for name, r in out["results"].items():
        print(f"  {name:<12} accuracy {r['accuracy']:.3f}  (train {r['n_train']}, held out {r['n_test']})")
    print(f"  majority class of the training tiles: {out['majority_train']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
