"""MP-MAE: a masked ConvNeXt V2 autoencoder that reconstructs Sentinel-2 and predicts other modalities.

Data flow: batch from :mod:`model.data` -> random patch mask -> :class:`~model.encoder.MaskedConvNeXtV2`
on normalised Sentinel-2 -> decoder(s) (1x1 projection, learned mask token, one ConvNeXt V2 block) ->
one head per pretext modality -> losses on masked patches, no-data excluded -> total (learned
uncertainty weights, Kendall et al. 2018: ``exp(-s) L + s``; gradient-balanced weights; or a plain sum).

Heads and losses come from the modality registry, never from per-modality code:

==============================  ======================================  ===============================
modality                        head                                    loss
==============================  ======================================  ===============================
pixel, continuous (C bands)     ``Conv2d(D, p*p*C, 1)``                 MSE on masked patches (Sentinel-2
                                                                        target normalised per patch over
                                                                        all its bands jointly)
pixel, categorical (K classes)  ``Conv2d(D, p*p*K, 1)``                 cross-entropy on masked patches
tile, continuous (C values)     LayerNorm per position, pool, Linear    MSE
tile, categorical (K classes)   LayerNorm per position, pool, Linear    cross-entropy
==============================  ======================================  ===============================

Sentinel-2 is scored on the masked patches it was asked to reconstruct; the other pixel targets there
too (``aux_loss_on="masked"``) or on every pixel (``"all"``), where they are dense supervision of the
visible patches' features, which must then say where inside each patch the land cover changes.

Missing values (NaN for continuous, -1 for categorical) never enter a loss, nor do opaque-cloud pixels
(batch key ``cloud``, when ``cloud_aware``); a modality with nothing valid in the batch contributes
zero (and does not move its uncertainty weight).

Weighting. ``uncertainty`` (the paper's) balances the targets' loss values. It leaves their gradients
where the heads put them: at initialisation the tile-level targets (month, location, ERA5, biome,
ecoregion) send the encoder's last layer gradients 80-180 times Sentinel-2's reconstruction's and 15-70
times the other pixel maps' (measured on the offline corpus, bench/README.md), so in a short
pretraining the encoder learns little but them.
``balanced`` scales each target's loss by ``mean_j(G_j) / G_i``, where ``G_i`` is a running mean (momentum
:data:`BALANCE_MOMENTUM`) of the norm of the target's gradient on the weights of the encoder's last layer
(the last block's second 1x1 convolution), measured every :data:`BALANCE_EVERY` training steps (one
backward pass per target through its head, its decoder and that layer, not the rest of the encoder):
every target then moves the encoder with the same gradient norm, GradNorm's measure (Chen et al. 2018:
the last shared layer's weights) with equal shares instead of its learned rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from mmearth_data.registry import MODALITIES, Modality
from model.encoder import MaskedConvNeXtV2, _init_weights


@dataclass(frozen=True)
class Target:
    """A pretext task derived from a registry entry."""

    name: str
    pixel: bool
    categorical: bool
    n_out: int  # bands (continuous) or classes (categorical)
    norm_pix: str | None = None  # "joint" or "per-band" per-patch target normalisation (Sentinel-2)

    @classmethod
    def of(cls, m: Modality, norm_pix: str | None = "joint") -> Target:
        n = len(m.classes) if m.categorical else len(m.model_bands or m.bands)
        return cls(
            m.name, m.kind == "pixel", m.categorical, n, norm_pix=norm_pix if m.name == "sentinel2" else None
        )


NORM_PIX = ("joint", "per-band")
AUX_LOSS_ON = ("masked", "all")  # where the pixel targets other than Sentinel-2 are scored
WEIGHTINGS = ("uncertainty", "balanced", "sum")
BALANCE_MOMENTUM = 0.7  # running mean of each target's gradient norm (``weighting="balanced"``) ...
BALANCE_EVERY = 10  # ... measured every this many training steps


PRETEXT_GROUPS = ("all", "s2", "pixel", "image")


def select_pretext(spec: str, registry: Sequence[Modality] = MODALITIES) -> list[Modality]:
    """Target modalities for ``--pretext``: ``all``, ``s2`` (Sentinel-2 alone), ``pixel`` (Sentinel-2 and
    pixel-level targets), ``image`` (Sentinel-2 and tile-level targets) or a comma list of names.
    Sentinel-2 reconstruction is always included. Raises ValueError naming unknown entries."""
    by_name = {m.name: m for m in registry}
    targets = [m for m in registry if m.target]
    if spec == "all":
        chosen = targets
    elif spec == "s2":
        chosen = []
    elif spec == "pixel":
        chosen = [m for m in targets if m.kind == "pixel"]
    elif spec == "image":
        chosen = [m for m in targets if m.kind == "tile"]
    else:
        names = [{"s2": "sentinel2"}.get(n.strip(), n.strip()) for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(
                f"`pretext`: unknown modality {', '.join(unknown)}; use one of {', '.join(PRETEXT_GROUPS)} "
                f"or a comma list of {', '.join(m.name for m in targets)}"
            )
        not_targets = [n for n in names if not by_name[n].target]
        if not_targets:
            raise ValueError(f"`pretext`: {', '.join(not_targets)} cannot be a pretext target")
        chosen = [by_name[n] for n in names]
    s2 = by_name["sentinel2"]
    return [s2] + [m for m in chosen if m.name != "sentinel2"]


def random_mask(
    batch: int, side: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(batch, side, side) float mask with exactly round(ratio * side^2) masked patches (1) per sample."""
    n = side * side
    k = int(round(ratio * n))
    noise = torch.rand(batch, n, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return (ranks < k).float().reshape(batch, side, side)


class Decoder(nn.Module):
    """1x1 projection to ``dim``, learned mask token at masked patches, one ConvNeXt V2 block."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.block = ConvNeXtBlock(dim, conv_mlp=True, use_grn=True, ls_init_value=None)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(feats)
        m = mask[:, None].to(x.dtype)
        return self.block(x * (1 - m) + self.mask_token.to(x.dtype) * m)


class Head(nn.Module):
    def __init__(self, t: Target, dim: int, patch_size: int):
        super().__init__()
        self.t = t
        self.p = patch_size
        if t.pixel:
            self.pred = nn.Conv2d(dim, patch_size * patch_size * t.n_out, 1)
        else:
            self.norm = nn.LayerNorm(dim)
            self.pred = nn.Linear(dim, t.n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.t.pixel:  # LayerNorm per position, then pool (as MMEarth-train's image heads)
            return self.pred(self.norm(x.permute(0, 2, 3, 1)).mean(dim=(1, 2)))
        y = self.pred(x)  # (B, C*p*p, h, w)
        B, _, h, w = y.shape
        p, C = self.p, self.t.n_out
        return y.reshape(B, C, p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C, h * p, w * p)


def _zero(pred: torch.Tensor) -> torch.Tensor:
    return pred.sum() * 0.0


def normalise_patches(target: torch.Tensor, p: int, how: str = "joint") -> torch.Tensor:
    """(B, C, H, W) with NaN where there is no data -> each p x p patch as (x - mean) / std over its valid
    values, all bands jointly (``joint``: FCMAE's and MMEarth's norm_pix_loss, the patch keeps its
    spectral shape) or each band alone (``per-band``, for ablation); NaN positions hold finite junk."""
    y = torch.nan_to_num(target)
    B, C, H, W = y.shape
    h, w = H // p, W // p
    yp = y.reshape(B, C, h, p, w, p)
    vp = torch.isfinite(target).reshape(B, C, h, p, w, p).float()
    dims = (1, 3, 5) if how == "joint" else (3, 5)
    cnt = vp.sum(dim=dims, keepdim=True).clamp(min=1)
    mean = (yp * vp).sum(dim=dims, keepdim=True) / cnt
    var = (((yp - mean) * vp) ** 2).sum(dim=dims, keepdim=True) / cnt
    return ((yp - mean) / (var + 1e-6).sqrt()).reshape(B, C, H, W)


def pixel_loss(
    t: Target,
    pred: torch.Tensor,
    target: torch.Tensor,
    pix_mask: torch.Tensor,
    p: int,
    cloud: torch.Tensor | None = None,
):
    """Loss on masked patches, opaque-cloud pixels (``cloud``, (B, H, W) bool) left out; returns (loss,
    number of valid entries)."""
    if cloud is not None:
        pix_mask = pix_mask * (~cloud).to(pix_mask.dtype)
    if t.categorical:
        y = torch.where(pix_mask.bool(), target.long(), torch.full_like(target.long(), -1))
        n = int((y >= 0).sum())
        if n == 0:
            return _zero(pred), 0
        return F.cross_entropy(pred.float(), y, ignore_index=-1, reduction="sum") / n, n
    valid = torch.isfinite(target) & pix_mask.bool()[:, None]
    y = normalise_patches(target, p, t.norm_pix) if t.norm_pix else torch.nan_to_num(target)
    n = int(valid.sum())
    if n == 0:
        return _zero(pred), 0
    diff = (pred.float() - y) ** 2
    return (diff * valid).sum() / n, n


def tile_loss(t: Target, pred: torch.Tensor, target: torch.Tensor):
    if t.categorical:
        y = target.long().reshape(-1)
        n = int((y >= 0).sum())
        if n == 0:
            return _zero(pred), 0
        return F.cross_entropy(pred.float(), y, ignore_index=-1, reduction="sum") / n, n
    valid = torch.isfinite(target)
    n = int(valid.sum())
    if n == 0:
        return _zero(pred), 0
    return (((pred.float() - torch.nan_to_num(target)) ** 2) * valid).sum() / n, n


class MPMAE(nn.Module):
    """Multi-pretext masked autoencoder.

    ``targets``: registry entries to predict (Sentinel-2 first, reconstructed from itself). ``decoder``:
    ``per-modality`` (one decoder per target, as in the paper) or ``shared`` (computed once per step).
    ``weighting``: ``uncertainty``, ``balanced`` or ``sum`` (module docstring).
    """

    def __init__(
        self,
        targets: Sequence[Modality],
        size: str = "atto",
        patch_size: int = 16,
        in_chans: int | None = None,
        mask_ratio: float = 0.6,
        decoder: str = "shared",
        decoder_dim: int = 512,
        weighting: str = "uncertainty",
        drop_path: float = 0.0,
        norm_pix: str = "joint",
        cloud_aware: bool = True,
        aux_loss_on: str = "masked",
    ):
        super().__init__()
        if aux_loss_on not in AUX_LOSS_ON:
            raise ValueError(f"`aux_loss_on` {aux_loss_on!r}: use {' or '.join(AUX_LOSS_ON)}")
        if decoder not in ("per-modality", "shared"):
            raise ValueError(f"`decoder` {decoder!r}: use per-modality or shared")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {weighting!r}: use {', '.join(WEIGHTINGS)}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"`mask_ratio` {mask_ratio}: must be between 0 and 1 (exclusive)")
        if norm_pix not in NORM_PIX:
            raise ValueError(f"`norm_pix` {norm_pix!r}: use {' or '.join(NORM_PIX)}")
        self.targets = [Target.of(m, norm_pix) for m in targets]
        self.cloud_aware = cloud_aware
        self.aux_loss_on = aux_loss_on
        if in_chans is None:  # the Sentinel-2 bands the model reads (registry: model_bands)
            in_chans = self.targets[0].n_out
        self.mask_ratio = mask_ratio
        self.patch_size = patch_size
        self.decoder_mode = decoder
        self.weighting = weighting
        self.encoder = MaskedConvNeXtV2(size, in_chans=in_chans, patch_size=patch_size, drop_path=drop_path)
        enc = self.encoder.out_dim
        if decoder == "shared":
            self.decoders = nn.ModuleDict({"shared": Decoder(enc, decoder_dim)})
        else:
            self.decoders = nn.ModuleDict({t.name: Decoder(enc, decoder_dim) for t in self.targets})
        self.heads = nn.ModuleDict({t.name: Head(t, decoder_dim, patch_size) for t in self.targets})
        self.log_vars = nn.ParameterDict({t.name: nn.Parameter(torch.zeros(())) for t in self.targets})
        if weighting == "balanced":  # running gradient norms on the encoder's last layer (0: not seen yet)
            self.register_buffer("grad_norms", torch.zeros(len(self.targets)))
            self.register_buffer("balance_calls", torch.zeros((), dtype=torch.int64))
        self.decoders.apply(_init_weights)
        self.heads.apply(_init_weights)

    def forward(
        self, batch: dict[str, torch.Tensor], mask: torch.Tensor | None = None, generator=None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and a dict of per-modality losses (detached) and uncertainty weights ``w/<name>``."""
        s2 = batch["sentinel2"]
        B, _, H, _ = s2.shape
        side = H // self.patch_size
        if mask is None:
            mask = random_mask(B, side, self.mask_ratio, generator).to(s2.device)
        x = torch.nan_to_num(s2, nan=0.0)  # no NaN ever reaches the encoder
        feats = self.encoder(x, mask)
        shared = self.decoders["shared"](feats, mask) if self.decoder_mode == "shared" else None
        pix_mask = mask.repeat_interleave(self.patch_size, -2).repeat_interleave(self.patch_size, -1)
        total = feats.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        # Sentinel-2 (the first target) is reconstructed where it was masked; the other pixel maps are
        # scored there too, or on every pixel with ``aux_loss_on="all"``
        aux_mask = torch.ones_like(pix_mask) if self.aux_loss_on == "all" else pix_mask
        losses = []
        for i, t in enumerate(self.targets):
            dec = shared if shared is not None else self.decoders[t.name](feats, mask)
            pred = self.heads[t.name](dec)
            target = batch[t.name]
            if t.pixel:
                cloud = batch.get("cloud") if self.cloud_aware else None
                loss, n = pixel_loss(t, pred, target, aux_mask if i else pix_mask, self.patch_size, cloud)
            else:
                loss, n = tile_loss(t, pred, target)
            logs[t.name] = loss.detach()
            if self.weighting == "balanced":
                losses.append((t.name, loss, n))
            elif self.weighting == "uncertainty":
                s = self.log_vars[t.name]
                logs[f"w/{t.name}"] = torch.exp(-s).detach()
                # an empty modality adds 0 but keeps its weight in the graph (DDP needs every gradient)
                total = total + (torch.exp(-s) * loss + s if n else s * 0.0)
            else:
                total = total + loss
        if losses:
            total = self._balanced(losses, feats, logs)
        return total, logs

    def _balanced(self, losses: list, feats: torch.Tensor, logs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``weighting="balanced"``: the sum of the losses, each scaled by ``mean_j(G_j) / G_i`` (running
        gradient norms on the encoder's last layer, measured every :data:`BALANCE_EVERY` training calls)."""
        if self.training and torch.is_grad_enabled() and feats.requires_grad:
            if int(self.balance_calls) % BALANCE_EVERY == 0:
                self._measure_gradients(losses)
            self.balance_calls += 1
        seen = self.grad_norms > 0
        mean = self.grad_norms[seen].mean() if seen.any() else self.grad_norms.new_ones(())
        total = losses[0][1].new_zeros((), dtype=torch.float32)
        for i, (name, loss, n) in enumerate(losses):
            w = (mean / self.grad_norms[i]) if seen[i] else mean.new_ones(())
            logs[f"w/{name}"] = w.detach()
            # the log-variances are not used here: added at zero, as DDP needs every parameter's gradient
            total = total + (w * loss if n else loss * 0.0) + self.log_vars[name] * 0.0
        return total

    @torch.no_grad()
    def _measure_gradients(self, losses: list) -> None:
        last = self.encoder.stages[-1].blocks[-1].mlp.fc2.weight
        for i, (_, loss, n) in enumerate(losses):
            if not n:
                continue
            (g,) = torch.autograd.grad(loss, last, retain_graph=True)
            old = self.grad_norms[i]
            mom = BALANCE_MOMENTUM if old > 0 else 0.0
            self.grad_norms[i] = mom * old + (1 - mom) * g.float().norm()
