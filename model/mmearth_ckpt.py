"""Load MMEarth's released encoder checkpoints (MMEarth-train, MinkowskiEngine sparse ConvNeXt V2) into
:class:`~model.encoder.MaskedConvNeXtV2`.

Data flow: a released ``.pth`` (``{"model": state_dict}`` of the FCMAE model, encoder keys under
``encoder.``) -> :func:`convert_state_dict` -> our encoder's state dict (timm's parameter names) ->
:func:`load_mmearth_encoder`.

What changes between the two layouts:

- names: ``initial_conv.0`` / ``.1`` -> ``stem.conv`` / ``stem.norm``; ``stem.0`` / ``.1`` ->
  ``stem.conv_dw`` / ``stem.norm_dw``; ``downsample_layers.<i>.<0|1>`` -> ``stages.<i+1>.downsample.<0|1>``;
  ``stages.<i>.<j>.dwconv|norm|pwconv1|grn|pwconv2`` -> ``stages.<i>.blocks.<j>.conv_dw|norm|mlp.fc1|
  mlp.grn|mlp.fc2``; MinkowskiEngine's wrappers (``.ln``, ``.linear``, ``.kernel``) are dropped.
- shapes: a sparse convolution's ``kernel`` is ``[k*k, in, out]`` (depthwise: ``[k*k, channels]``) with
  the kernel offsets enumerated first spatial axis fastest, as ConvNeXt V2's own sparse-to-dense
  conversion reads them; a dense ``Conv2d`` weight is ``[out, in, k, k]``. Minkowski linears become 1x1
  convolutions, ``[1, C]`` biases and GRN's ``gamma`` / ``beta`` (any shape of C values) become ``[C]``
  (GRN's ``gamma`` is timm's ``weight``, ``beta`` its ``bias``).
- input bands: MMEarth pretrained on its 12 Sentinel-2 bands with B8A before B8
  (:data:`MMEARTH_PRETRAIN_BANDS`) and evaluated with B8 before B8A; the stem's input channels are
  reordered to this project's band order (registry ``model_bands``, B8 before B8A) by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mmearth_data.registry import get
from model.encoder import SIZES, MaskedConvNeXtV2

# the order of the 12 Sentinel-2 bands MMEarth's pretraining fed the stem (B8A before B8)
MMEARTH_PRETRAIN_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B11", "B12")

_RENAMES = (
    (r"^initial_conv\.0\.", "stem.conv."),
    (r"^initial_conv\.1\.", "stem.norm."),
    (r"^stem\.0\.", "stem.conv_dw."),
    (r"^stem\.1\.", "stem.norm_dw."),
    (r"^downsample_layers\.(\d+)\.(\d)\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.{m[2]}."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.norm\.", r"stages.\1.blocks.\2.norm."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.grn\.", r"stages.\1.blocks.\2.mlp.grn."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
)


class CheckpointError(ValueError):
    """A checkpoint that is not an MMEarth sparse ConvNeXt V2 encoder of the expected shape."""


def _encoder_items(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "model."):
            k = k[len(prefix) :] if k.startswith(prefix) else k
        if k.startswith("encoder."):
            out[k[len("encoder.") :]] = v
    if not out:  # a bare encoder state dict
        out = {
            k: v for k, v in state.items() if re.match(r"^(initial_conv|stem|downsample_layers|stages)\.", k)
        }
    return out


def _kernel_to_weight(v: torch.Tensor) -> torch.Tensor:
    """Minkowski kernel [k*k, in, out] or depthwise [k*k, C] -> Conv2d weight [out, in, k, k]."""
    kv = v.shape[0]
    k = int(round(kv**0.5))
    if k * k != kv:
        raise CheckpointError(f"a kernel of {kv} offsets is not square")
    if v.ndim == 3:  # offset index = col * k + row (first spatial axis fastest)
        return v.permute(2, 1, 0).reshape(v.shape[2], v.shape[1], k, k).transpose(2, 3).contiguous()
    return v.permute(1, 0).reshape(v.shape[1], 1, k, k).transpose(2, 3).contiguous()


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    source_bands: Sequence[str] = MMEARTH_PRETRAIN_BANDS,
    target_bands: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """MMEarth-train encoder weights -> this project's encoder state dict (see the module docstring).
    ``source_bands``: the band order of the checkpoint's input; ``target_bands``: ours (default: the
    registry's Sentinel-2 ``model_bands``). Raises :class:`CheckpointError` naming what does not fit."""
    items = _encoder_items(state)
    if not items:
        raise CheckpointError("no encoder weights found (expected keys like encoder.initial_conv.0.kernel)")
    out: dict[str, torch.Tensor] = {}
    for key, v in items.items():
        name = key
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, name)
            if new != name:
                name = new
                break
        else:
            raise CheckpointError(f"unexpected encoder key {key!r}")
        name = name.replace(".ln.", ".").replace(".linear.", ".")
        v = v.detach().float()
        if name.endswith(".kernel"):
            name = name[: -len("kernel")] + "weight"
            v = _kernel_to_weight(v)
        elif name.endswith(("mlp.fc1.weight", "mlp.fc2.weight")) and v.ndim == 2:
            v = v[:, :, None, None]
        elif name.endswith("grn.gamma"):
            name, v = name[: -len("gamma")] + "weight", v.reshape(-1)
        elif name.endswith("grn.beta"):
            name, v = name[: -len("beta")] + "bias", v.reshape(-1)
        elif name.endswith("bias"):
            v = v.reshape(-1)
        out[name] = v.contiguous()
    target = list(target_bands or get("sentinel2").model_bands or get("sentinel2").bands)
    w = out.get("stem.conv.weight")
    if w is None:
        raise CheckpointError("the checkpoint has no stem convolution (initial_conv.0.kernel)")
    if w.shape[1] != len(source_bands):
        raise CheckpointError(
            f"the checkpoint's stem reads {w.shape[1]} bands, not the {len(source_bands)} of source_bands"
        )
    missing = [b for b in target if b not in source_bands]
    if missing:
        raise CheckpointError(f"the checkpoint was not trained on bands {missing}")
    out["stem.conv.weight"] = w[:, [list(source_bands).index(b) for b in target]].contiguous()
    return out


def size_of(state: Mapping[str, torch.Tensor]) -> str:
    """The ConvNeXt V2 size whose widths and depths match a converted state dict."""
    dims = tuple(int(state[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0]) for i in range(4))
    depths = tuple(
        len({k.split(".")[3] for k in state if k.startswith(f"stages.{i}.blocks.")}) for i in range(4)
    )
    for name, spec in SIZES.items():
        if spec.dims == dims and spec.depths == depths:
            return name
    raise CheckpointError(f"no ConvNeXt V2 size has widths {dims} and depths {depths}")


def load_mmearth_encoder(path: str | Path, patch_size: int | None = None, **convert_kw) -> MaskedConvNeXtV2:
    """Our encoder with the weights of an MMEarth-train checkpoint (``.pth``); the size comes from the
    weights, the patch size from the stem (patch = 8 x the stem's depthwise stride)."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = raw.get("model", raw) if isinstance(raw, dict) else raw
    conv = convert_state_dict(state, **convert_kw)
    k = int(conv["stem.conv_dw.weight"].shape[-1])
    enc = MaskedConvNeXtV2(
        size_of(conv), in_chans=conv["stem.conv.weight"].shape[1], patch_size=patch_size or 8 * k
    )
    try:
        enc.load_state_dict(conv, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit the encoder: {str(err)[:300]}") from None
    return enc
