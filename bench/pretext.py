"""What a pretraining run has learnt of the Sentinel-2 reconstruction: its spectral and its spatial part.

    python bench/pretext.py [--runs data/paper/run_s2_700,data/paper/run_all_700] [--batches 8]

MP-MAE's Sentinel-2 target is each masked patch normalised over all its bands and pixels jointly
(``norm_pix_loss``). Its variance splits exactly into two parts: the spectral part, the per-band means of
the patch (the patch's spectral shape: vegetation bright in NIR, dark in red), and the spatial part, each
band's deviations from its own patch mean (edges, parcels, texture inside the patch). The squared error
of the run's reconstruction splits the same way, so each part's share explained is 1 - error / variance.
A structure-by-pixel downstream task such as ``fields`` (the parcels' size) can only gain from the
spatial part.

Each run is read with its own options (``state.pt``), on the corpus's ``val`` tiles that pretraining
never trains on, with the same seeded random masks for every run (ratio 0.6), and scored on the masked
patches free of no-data and opaque cloud, as the loss is. The first run is the baseline, in the same
process on the same batches: by default the S2-only run of ``bench/paper.py``, against which the
all-modality run is measured.

Ends with ``bench: pretext spatial_explained_ratio=<last run / first run> target=0.8 ok|short`` (our
own target: multi-modal pretraining should keep most of what Sentinel-2 alone learns of the image's
spatial structure, the part that its other targets cannot supply).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.data import StreamingCorpus, make_loader  # noqa: E402
from model.encoder import _init_weights  # noqa: E402
from model.mpmae import (  # noqa: E402
    MPMAE,
    Decoder,
    Head,
    normalise_patches,
    pixel_loss,
    random_mask,
    select_pretext,
)
from model.pretrain import read_state, read_weights  # noqa: E402

TARGET_RATIO = 0.8
MIN_BASELINE = 0.02  # the baseline's spatial share explained below which no ratio is given


def load_run(run: Path) -> tuple[MPMAE, dict]:
    args = json.loads(read_state(run / "state.pt")["args"])
    model = MPMAE(
        select_pretext(args["pretext"]), args["model"], args["patch_size"], mask_ratio=args["mask_ratio"],
        decoder=args["decoder"], decoder_dim=args["decoder_dim"], weighting=args["weighting"],
        norm_pix=args["norm_pix"],
    )  # fmt: skip
    model.load_state_dict(read_weights(run / "model.safetensors"))
    return model.eval(), args


def split_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, p, w, p) -> per patch (B, h, w): mean square of the per-band patch means (spectral) and
    of the deviations from them (spatial); the two add up to the patch's mean square."""
    band_mean = t.mean(dim=(3, 5), keepdim=True)
    return (band_mean**2).mean(dim=(1, 3, 5)), ((t - band_mean) ** 2).mean(dim=(1, 3, 5))


def refit_decoder(model: MPMAE, train: list[dict[str, torch.Tensor]], steps: int, seed: int = 0) -> MPMAE:
    """A fresh Sentinel-2 decoder and head trained on the run's frozen encoder (``steps`` AdamW steps at
    1e-3, the loss of pretraining): what the encoder's features hold of the target, read by a decoder
    that serves Sentinel-2 alone."""
    torch.manual_seed(seed)
    dec = Decoder(model.encoder.out_dim, model.heads["sentinel2"].pred.in_channels)
    head = Head(model.targets[0], dec.proj.out_channels, model.patch_size)
    dec.apply(_init_weights)
    head.apply(_init_weights)
    opt = torch.optim.AdamW([*dec.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    p = model.patch_size
    for step in range(steps):
        b = train[step % len(train)]
        x = b["sentinel2"]
        mask = random_mask(len(x), x.shape[-1] // p, 0.6, g)
        with torch.no_grad():
            feats = model.encoder(torch.nan_to_num(x), mask)
        pix = mask.repeat_interleave(p, -2).repeat_interleave(p, -1)
        loss, _ = pixel_loss(model.targets[0], head(dec(feats, mask)), x, pix, p, b.get("cloud"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.decoder_mode = "per-modality"
    model.decoders = torch.nn.ModuleDict({"sentinel2": dec})
    model.heads = torch.nn.ModuleDict({"sentinel2": head})
    return model.eval()


@torch.no_grad()
def measure(model: MPMAE, batches: list[dict[str, torch.Tensor]], masks: list[torch.Tensor]) -> dict:
    p = model.patch_size
    sums = dict(var_spec=0.0, var_spat=0.0, err_spec=0.0, err_spat=0.0, patches=0)
    for b, mask in zip(batches, masks, strict=True):
        s2 = b["sentinel2"]
        B, C, H, W = s2.shape
        h, w = H // p, W // p
        x = torch.nan_to_num(s2)
        feats = model.encoder(x, mask)
        dec = model.decoders["shared"] if model.decoder_mode == "shared" else model.decoders["sentinel2"]
        pred = model.heads["sentinel2"](dec(feats, mask)).reshape(B, C, h, p, w, p)
        y = normalise_patches(s2, p, "joint").reshape(B, C, h, p, w, p)  # the pretraining target
        bad = ~torch.isfinite(s2).all(1)
        if "cloud" in b:
            bad = bad | b["cloud"].bool()
        clean = ~bad.reshape(B, h, p, w, p).any(dim=(2, 4))
        sel = mask.bool() & clean
        vs, vp = split_parts(y)
        es, ep = split_parts(pred - y)
        for k, v in (("var_spec", vs), ("var_spat", vp), ("err_spec", es), ("err_spat", ep)):
            sums[k] += float(v[sel].sum())
        sums["patches"] += int(sel.sum())
    n = max(sums["patches"], 1)
    out = {k: v / n for k, v in sums.items() if k != "patches"}
    out["patches"] = sums["patches"]
    out["loss"] = out["err_spec"] + out["err_spat"]
    out["spectral_explained"] = 1 - out["err_spec"] / out["var_spec"]
    out["spatial_explained"] = 1 - out["err_spat"] / out["var_spat"]
    return out


def row(name: str, pretext: str, r: dict) -> str:
    return (
        f"| {name} | {pretext} | {r['loss']:.3f} | {r['var_spec']:.3f} / {r['var_spat']:.3f} "
        f"| {r['spectral_explained']:.3f} | {r['spatial_explained']:.3f} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="data/paper/run_s2_700,data/paper/run_all_700",
                    help="comma-separated run directories; the first is the baseline")  # fmt: skip
    ap.add_argument("--batches", type=int, default=8, help="val batches of 32")
    ap.add_argument(
        "--refit-decoder",
        type=int,
        default=0,
        metavar="STEPS",
        help="also measure each frozen encoder with a fresh Sentinel-2-only decoder trained this "
        "many steps on train tiles (separates what the encoder holds from what its decoder reads)",
    )
    a = ap.parse_args(argv)
    runs = [Path(r) for r in a.runs.split(",") if r]
    missing = [str(r) for r in runs if not (r / "state.pt").exists()]
    if missing:
        sys.exit(f"no run at {', '.join(missing)}: give pretraining run directories with --runs")
    torch.manual_seed(0)
    models = [load_run(r) for r in runs]
    args0 = models[0][1]
    targets = select_pretext("s2")
    ds = StreamingCorpus(
        args0["store"], targets, args0["img_size"], split="val", seed=0, batch_size=32, cloud_mask=True
    )
    it = iter(make_loader(ds, 32, 0))
    batches = [next(it) for _ in range(a.batches)]
    g = torch.Generator().manual_seed(0)
    side = args0["img_size"] // args0["patch_size"]
    masks = [random_mask(len(b["sentinel2"]), side, 0.6, g) for b in batches]
    print(f"{a.batches} val batches of 32 from {args0['store']}; masked patches free of no-data and cloud")
    print("| run | pretext | S2 loss | target spectral / spatial | explained spectral | explained spatial |")
    print("|---|---|---:|---:|---:|---:|")
    rows = []
    train = []
    if a.refit_decoder:
        tr = StreamingCorpus(
            args0["store"], targets, args0["img_size"], split="train", seed=1, batch_size=32, cloud_mask=True
        )
        tit = iter(make_loader(tr, 32, 0))
        train = [next(tit) for _ in range(min(a.refit_decoder, 64))]
    for run, (model, args) in zip(runs, models, strict=True):
        r = measure(model, batches, masks)
        rows.append(r)
        print(row(run.name, args["pretext"], r))
        if a.refit_decoder:
            r = measure(refit_decoder(model, train, a.refit_decoder), batches, masks)
            name = f"{run.name}, frozen encoder + fresh S2 decoder ({a.refit_decoder} steps)"
            print(row(name, args["pretext"], r))
    base = rows[0]["spatial_explained"]
    if base < MIN_BASELINE:  # a ratio to nothing says nothing
        print(f"the baseline {runs[0].name} explains {base:.3f} of the spatial part: no ratio to it")
    ratio = rows[-1]["spatial_explained"] / base if base >= MIN_BASELINE else float("nan")
    verdict = "ok" if ratio >= TARGET_RATIO else "short"
    print(
        f"bench: pretext spatial_explained_ratio={ratio:.2f} target={TARGET_RATIO} "
        f"(baseline: {runs[0].name}, in-process) {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
