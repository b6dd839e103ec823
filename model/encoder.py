"""ConvNeXt V2 encoder with MMEarth's stem and a dense masked execution equal to sparse convolution.

Data flow: normalised Sentinel-2 ``(B, C, H, W)`` + patch mask ``(B, H/p, W/p)`` (1 = masked) ->
:class:`MaskedConvNeXtV2` -> features ``(B, dims[-1], H/p, W/p)``, one vector per patch.

The stages and blocks are timm's own modules (``timm.models.convnext.ConvNeXtStage`` with ConvNeXt V2's
GRN, parameter names ``stages.<i>.downsample`` / ``stages.<i>.blocks.<j>.conv_dw`` ... as in timm), so
weights map one to one onto ``timm.create_model('convnextv2_<size>')`` stages. Only the execution
differs: a sparse convolution (MinkowskiEngine in MMEarth-train) computes outputs at visible sites from
visible sites alone. The dense equivalent used here makes every masked position zero before each
operation that mixes space across patches (the 3x3 stem conv, the 7x7 depthwise convs, GRN's spatial
norm), re-applying the mask after the per-pixel operations that turn zero into non-zero (biases,
LayerNorm, GELU, GRN), so nothing at a masked position ever reaches a visible one. The stem's depthwise
conv and the downsampling convs (kernel = stride) never straddle patches. Per-pixel operations between
two spatial ones need no mask of their own (what they compute at a masked position is zeroed before it
could travel), which keeps the masking to two multiplications per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXtBlock, ConvNeXtStage
from torch import nn


@dataclass(frozen=True)
class EncoderSpec:
    depths: tuple[int, ...]
    dims: tuple[int, ...]


# ConvNeXt V2 sizes (timm's convnextv2_<name>)
SIZES: dict[str, EncoderSpec] = {
    "atto": EncoderSpec((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": EncoderSpec((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": EncoderSpec((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": EncoderSpec((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": EncoderSpec((3, 3, 9, 3), (96, 192, 384, 768)),
}


def check_geometry(img_size: int, patch_size: int) -> None:
    """Raise ValueError naming the problem when image and patch sizes do not fit the encoder."""
    if patch_size < 8 or patch_size % 8:
        raise ValueError(
            f"`patch_size` {patch_size}: must be a multiple of 8 (the stem's depthwise stride is patch/8, "
            "then three 2x downsamples), e.g. 8 or 16"
        )
    if img_size % patch_size:
        raise ValueError(
            f"`img_size` {img_size} is not a multiple of `patch_size` {patch_size}; "
            f"use e.g. {img_size // patch_size * patch_size or patch_size} or another patch size"
        )


def upsample_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(B, h, w) patch mask (1 = masked) -> (B, 1, size, size) keep-mask (1 = visible) in the input dtype."""
    keep = 1.0 - mask.float()
    scale = size // mask.shape[-1]
    return keep.repeat_interleave(scale, -2).repeat_interleave(scale, -1)[:, None]


def masked_block(block: ConvNeXtBlock, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """timm's ConvNeXt V2 block (conv MLP form) with the mask applied; ``x`` is zero where masked.

    Per-pixel operations (LayerNorm, 1x1 convs, GELU) cannot carry a masked value to a visible
    position, so the mask is needed only where space mixes: before GRN (its spatial norm must see zeros
    at masked positions, as sparse GRN sees no site there) and on the block output (the next depthwise
    conv must see zeros). Values at visible positions equal those of the sparse block.
    """
    shortcut = x
    x = block.conv_dw(x)
    x = block.norm(x)
    mlp = block.mlp
    x = mlp.act(mlp.fc1(x)) * keep
    x = mlp.fc2(mlp.grn(x)) * keep
    if block.gamma is not None:
        x = x.mul(block.gamma.reshape(1, -1, 1, 1))
    return block.drop_path(x) + shortcut


class MaskedConvNeXtV2(nn.Module):
    """ConvNeXt V2 encoder (``atto`` .. ``tiny``) for ``in_chans`` bands and patch size ``patch_size``.

    ``forward(x, mask)``: ``mask`` is ``(B, H/p, W/p)`` with 1 at masked patches, or None (no masking,
    e.g. for probing). Returns ``(B, dims[-1], H/p, W/p)``; features at masked patches are zero. With
    ``stages=n`` only the first ``n`` stages run and their last output is returned (``dims[n-1]``
    channels at ``2 ** (4 - n)`` times the patch grid), for probing what an earlier stage holds.
    """

    def __init__(self, size: str = "atto", in_chans: int = 13, patch_size: int = 16, drop_path: float = 0.0):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
        check_geometry(patch_size * 7, patch_size)
        spec = SIZES[size]
        self.size = size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.dims = spec.dims
        d0 = spec.dims[0]
        k = patch_size // 8
        # MMEarth's stem: 3x3 stride-1 conv + LN + GELU, then depthwise k x k stride k + LN
        self.stem = nn.ModuleDict(
            {
                "conv": nn.Conv2d(in_chans, d0, 3, padding=1),
                "norm": LayerNorm2d(d0),
                "conv_dw": nn.Conv2d(d0, d0, k, stride=k, groups=d0),
                "norm_dw": LayerNorm2d(d0),
            }
        )
        rates = torch.linspace(0, drop_path, sum(spec.depths)).tolist()
        stages, prev, start = [], d0, 0
        for i, (depth, dim) in enumerate(zip(spec.depths, spec.dims, strict=True)):
            stages.append(
                ConvNeXtStage(
                    prev,
                    dim,
                    stride=2 if i > 0 else 1,
                    depth=depth,
                    drop_path_rates=rates[start : start + depth],
                    ls_init_value=None,
                    conv_mlp=True,
                    use_grn=True,
                    norm_layer=LayerNorm2d,
                )
            )
            prev, start = dim, start + depth
        self.stages = nn.Sequential(*stages)
        self.apply(_init_weights)

    @property
    def out_dim(self) -> int:
        return self.dims[-1]

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, stages: int | None = None
    ) -> torch.Tensor:
        H = x.shape[-1]
        if mask is None:
            mask = torch.zeros(x.shape[0], H // self.patch_size, H // self.patch_size, device=x.device)
        keep = upsample_mask(mask, H).to(x.dtype)
        s = self.stem
        x = s["conv"](x * keep)  # the only conv that reaches across patches in the stem
        x = s["conv_dw"](F.gelu(s["norm"](x)))  # kernel = stride <= patch/8: stays inside patches
        res = x.shape[-1]
        keep = upsample_mask(mask, res).to(x.dtype)
        x = s["norm_dw"](x) * keep
        for i, stage in enumerate(self.stages[:stages]):
            if i > 0:
                res //= 2
                keep = upsample_mask(mask, res).to(x.dtype)
                x = stage.downsample(x) * keep  # LayerNorm + conv with kernel = stride = 2, inside patches
            for block in stage.blocks:
                x = masked_block(block, x, keep)
        return x


def _init_weights(m: nn.Module) -> None:
    """Truncated-normal (std 0.02) convs and linears, zero biases, as ConvNeXt V2 (not std-1 normals)."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
