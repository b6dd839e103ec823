"""How hard each pretext target pulls on the encoder: gradient norms on its last layer, per target.

    python bench/gradients.py --store data/paper/corpus_8192_64_s1.zarr [--run data/paper/run_all_700]

The all-modality MP-MAE sums eleven losses. What the encoder learns from each is set by the gradient that
target sends it, not by its loss value: this bench measures, on ``--batches`` val batches of 32 (tiles
pretraining never trains on) with the same seeded masks, each target's gradient on the weights of the
encoder's last layer (the last block's second 1x1 convolution, GradNorm's "last shared layer"), each from
a backward pass of that target's own loss through its head, the decoder and that layer. It prints, per
target, the loss, the norm unweighted, and the norm times the weight of two weightings: the
learned uncertainty weights (``exp(-s)``; the paper's) and ``--weighting balanced``'s, both as the run
holds them (at initialisation: 1, and the balance measured on the first batch). Without ``--run`` the
model is freshly initialised (seed 0) with the options below.

Ends with ``bench: gradients imbalance_uncertainty=<max/min> imbalance_balanced=<max/min> target=<=2
(baseline: uncertainty weights, same batches, in-process) ok|short`` where ``max/min`` is the ratio of
the largest to the smallest weighted norm over the targets (1: every target moves the encoder equally).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.data import BatchNormaliser, StreamingCorpus, make_loader  # noqa: E402
from model.mpmae import MPMAE, pixel_loss, random_mask, select_pretext, tile_loss  # noqa: E402
from model.pretrain import read_state, read_weights  # noqa: E402

TARGET = 2.0


def target_gradients(model: MPMAE, batch: dict, mask: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{target: (loss, norm of its unweighted gradient on the encoder's last layer)} for one batch."""
    last = model.encoder.stages[-1].blocks[-1].mlp.fc2.weight
    p = model.patch_size
    feats = model.encoder(torch.nan_to_num(batch["sentinel2"]), mask)
    pix_mask = mask.repeat_interleave(p, -2).repeat_interleave(p, -1)
    out = {}
    for t in model.targets:
        dec = (
            model.decoders["shared"](feats, mask)
            if "shared" in model.decoders
            else model.decoders[t.name](feats, mask)
        )
        pred = model.heads[t.name](dec)
        if t.pixel:
            loss, n = pixel_loss(t, pred, batch[t.name], pix_mask, p, batch.get("cloud"))
        else:
            loss, n = tile_loss(t, pred, batch[t.name])
        (g,) = torch.autograd.grad(loss, last, retain_graph=True) if n else (torch.zeros_like(last),)
        out[t.name] = (float(loss.detach()), float(g.norm()))
    return out


def load(args: argparse.Namespace) -> tuple[MPMAE, MPMAE, dict]:
    """(the model with its uncertainty weights, the same weights with balanced weighting, its options)."""
    opts = {"pretext": "all", "model": "atto", "patch_size": 8, "decoder": "shared", "decoder_dim": 512,
            "norm_pix": args.norm_pix, "img_size": 56, "store": args.store}  # fmt: skip
    state = None
    if args.run:
        opts |= json.loads(read_state(Path(args.run) / "state.pt")["args"])
        state = read_weights(Path(args.run) / "model.safetensors")
    make = lambda w: MPMAE(  # noqa: E731
        select_pretext(opts["pretext"]), opts["model"], opts["patch_size"], decoder=opts["decoder"],
        decoder_dim=opts["decoder_dim"], weighting=w, norm_pix=opts["norm_pix"],
    )  # fmt: skip
    torch.manual_seed(0)
    unc, bal = make("uncertainty"), make("balanced")
    if state is not None:
        unc.load_state_dict({k: v for k, v in state.items() if k in unc.state_dict()})
    bal.load_state_dict({k: v for k, v in unc.state_dict().items()}, strict=False)
    if state is not None and "grad_norms" in state:
        bal.grad_norms.copy_(state["grad_norms"])
    return unc, bal, opts


def balanced_weights(bal: MPMAE, batch: dict, mask: torch.Tensor) -> dict[str, float]:
    """The balanced weighting's weights: the run's, or measured on ``batch`` when it holds none."""
    if not bool((bal.grad_norms > 0).any()):
        bal.train()
        bal(batch, mask)
    bal.eval()
    with torch.no_grad():
        _, logs = bal(batch, mask)
    return {t.name: float(logs[f"w/{t.name}"]) for t in bal.targets}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="the corpus (its val tiles are read)")
    ap.add_argument("--run", help="a pretraining run (default: a fresh initialisation)")
    ap.add_argument("--norm-pix", default="joint", help="Sentinel-2 target without --run: joint or per-band")
    ap.add_argument("--batches", type=int, default=2, help="val batches of 32")
    a = ap.parse_args(argv)
    unc, bal, opts = load(a)
    ds = StreamingCorpus(a.store, select_pretext(opts["pretext"]), opts["img_size"], split="val", seed=0,
                         batch_size=32, cloud_mask=True, raw=True)  # fmt: skip
    norm, it = BatchNormaliser(ds), iter(make_loader(ds, 32, 0))
    gen = torch.Generator().manual_seed(0)
    side = opts["img_size"] // opts["patch_size"]
    batches = [norm(next(it)) for _ in range(a.batches)]
    masks = [random_mask(len(b["sentinel2"]), side, 0.6, gen) for b in batches]
    w_bal = balanced_weights(bal, batches[0], masks[0])
    w_unc = {t.name: float(torch.exp(-unc.log_vars[t.name].detach())) for t in unc.targets}
    unc.eval()
    per = [target_gradients(unc, b, m) for b, m in zip(batches, masks, strict=True)]
    names = [t.name for t in unc.targets]
    loss = {n: np.mean([p[n][0] for p in per]) for n in names}
    g = {n: np.mean([p[n][1] for p in per]) for n in names}
    print(f"{a.batches} val batches of 32 from {a.store}; {a.run or 'fresh initialisation (seed 0)'}\n")
    print("| target | loss | gradient norm | uncertainty weight | weighted | balanced weight | weighted |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in names:
        print(f"| {n} | {loss[n]:.3f} | {g[n]:.2e} | {w_unc[n]:.2f} | {w_unc[n] * g[n]:.2e} | "
              f"{w_bal[n]:.2f} | {w_bal[n] * g[n]:.2e} |")  # fmt: skip
    seen = [n for n in names if g[n] > 0]
    ratio = lambda w: max(w[n] * g[n] for n in seen) / min(w[n] * g[n] for n in seen)  # noqa: E731
    r_unc, r_bal = ratio(w_unc), ratio(w_bal)
    verdict = "ok" if r_bal <= TARGET else "short"
    print(
        f"bench: gradients imbalance_uncertainty={r_unc:.1f} imbalance_balanced={r_bal:.1f} "
        f"target=<={TARGET:g} (baseline: uncertainty weights, same batches, in-process) {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
