"""Synthesise a checkpoint in MMEarth-train's layout (MinkowskiEngine sparse ConvNeXt V2 inside FCMAE):
``python tests/data/mmearth_ckpt/make_checkpoint.py OUT.pth [--size atto] [--patch 16]``.

It takes one of this project's encoders with random weights and writes them the way MMEarth-train's
state dict holds them: ``model`` -> ``encoder.initial_conv.0.kernel`` ([k*k, in, out], offsets first
spatial axis fastest), ``encoder.stem.0.kernel`` (depthwise [k*k, C]), ``...ln.weight``,
``...pwconv1.linear.weight``, ``[1, C]`` biases, GRN ``gamma`` / ``beta`` as ``[1, C]``, the stem's
input bands in MMEarth's pretraining order (B8A before B8), plus decoder keys that a loader must skip.
``tests/test_model.py`` loads it back and compares the encoder's outputs.
"""

from __future__ import annotations

import argparse

import torch

from mmearth_data.registry import get
from model.encoder import MaskedConvNeXtV2
from model.mmearth_ckpt import MMEARTH_PRETRAIN_BANDS


def to_kernel(w: torch.Tensor, depthwise: bool) -> torch.Tensor:
    """Conv2d weight [out, in, k, k] -> Minkowski kernel [k*k, in, out] (depthwise: [k*k, C])."""
    k = w.shape[-1]
    t = w.transpose(2, 3).reshape(w.shape[0], w.shape[1], k * k)  # offset = col * k + row
    return t[:, 0].permute(1, 0).contiguous() if depthwise else t.permute(2, 1, 0).contiguous()


def mmearth_layout(enc: MaskedConvNeXtV2) -> dict[str, torch.Tensor]:
    sd = enc.state_dict()
    ours = list(get("sentinel2").model_bands)
    out = {}
    stem_w = sd["stem.conv.weight"][:, [ours.index(b) for b in MMEARTH_PRETRAIN_BANDS]]
    out["encoder.initial_conv.0.kernel"] = to_kernel(stem_w, False)
    out["encoder.initial_conv.0.bias"] = sd["stem.conv.bias"][None]
    out["encoder.initial_conv.1.ln.weight"] = sd["stem.norm.weight"]
    out["encoder.initial_conv.1.ln.bias"] = sd["stem.norm.bias"]
    out["encoder.stem.0.kernel"] = to_kernel(sd["stem.conv_dw.weight"], True)
    out["encoder.stem.0.bias"] = sd["stem.conv_dw.bias"][None]
    out["encoder.stem.1.ln.weight"] = sd["stem.norm_dw.weight"]
    out["encoder.stem.1.ln.bias"] = sd["stem.norm_dw.bias"]
    for i, stage in enumerate(enc.stages):
        if i > 0:
            p = f"stages.{i}.downsample"
            out[f"encoder.downsample_layers.{i - 1}.0.ln.weight"] = sd[f"{p}.0.weight"]
            out[f"encoder.downsample_layers.{i - 1}.0.ln.bias"] = sd[f"{p}.0.bias"]
            out[f"encoder.downsample_layers.{i - 1}.1.kernel"] = to_kernel(sd[f"{p}.1.weight"], False)
            out[f"encoder.downsample_layers.{i - 1}.1.bias"] = sd[f"{p}.1.bias"][None]
        for j in range(len(stage.blocks)):
            p, q = f"stages.{i}.blocks.{j}", f"encoder.stages.{i}.{j}"
            out[f"{q}.dwconv.kernel"] = to_kernel(sd[f"{p}.conv_dw.weight"], True)
            out[f"{q}.dwconv.bias"] = sd[f"{p}.conv_dw.bias"][None]
            out[f"{q}.norm.ln.weight"] = sd[f"{p}.norm.weight"]
            out[f"{q}.norm.ln.bias"] = sd[f"{p}.norm.bias"]
            out[f"{q}.pwconv1.linear.weight"] = sd[f"{p}.mlp.fc1.weight"][:, :, 0, 0]
            out[f"{q}.pwconv1.linear.bias"] = sd[f"{p}.mlp.fc1.bias"]
            out[f"{q}.grn.gamma"] = sd[f"{p}.mlp.grn.weight"][None]
            out[f"{q}.grn.beta"] = sd[f"{p}.mlp.grn.bias"][None]
            out[f"{q}.pwconv2.linear.weight"] = sd[f"{p}.mlp.fc2.weight"][:, :, 0, 0]
            out[f"{q}.pwconv2.linear.bias"] = sd[f"{p}.mlp.fc2.bias"]
    out["proj.weight"] = torch.zeros(512, enc.out_dim, 1, 1)  # decoder parts: not the encoder's
    out["mask_token"] = torch.zeros(1, 512, 1, 1)
    return {k: v.clone() for k, v in out.items()}


def make(path: str, size: str = "atto", patch: int = 16, seed: int = 0) -> MaskedConvNeXtV2:
    """Write the checkpoint and return the encoder it was made from."""
    torch.manual_seed(seed)
    enc = MaskedConvNeXtV2(size, in_chans=12, patch_size=patch).eval()
    with torch.no_grad():
        for prm in enc.parameters():
            if prm.ndim == 1:
                prm.normal_(0, 0.05)
    torch.save({"model": mmearth_layout(enc), "epoch": 199}, path)
    return enc


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--size", default="atto")
    ap.add_argument("--patch", type=int, default=16)
    a = ap.parse_args()
    make(a.out, a.size, a.patch)
    print(f"wrote {a.out}")
