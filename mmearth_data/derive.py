"""Variants of a corpus store without re-exporting anything: crop, subset, re-split, drop modalities.

    mmearth derive --store SRC --out DST [--crop 64] [--subset N] [--split train=0.9,val=0.05,test=0.05]
        [--modalities sentinel2,sentinel1,...] [--seed 0]

- ``--crop C``: the centre C x C pixels of every pixel modality (MMEarth64 from the 128 px corpus); each
  tile's affine transform moves its origin by the cropped margin, so the tile stays georeferenced on
  the same UTM 10 m grid, centred where it was.
- ``--subset N``: N of the source's complete tiles, stratified over biome x year the way the sampler
  balances a build (strata differ by at most one unless a stratum runs out; then the rest goes to the
  others), seeded (MMEarth100k from the full corpus).
- ``--split``: train / val / test re-drawn by a seeded hash of the 1-degree block (spatially blocked:
  a block's tiles share a split).
- ``--modalities``: keep only these (Sentinel-2 is required).

The derived store is a corpus store like any other (``mmearth validate`` passes): only complete
tiles are carried over, checksums are recomputed for cropped values, statistics are computed afresh,
and the ``derived`` attribute names the source store (its path and configuration hash) and the
derivation. Reads and writes go shard by shard of the derived store.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mmearth_data.registry import Modality
from mmearth_data.sampling import allocate, split_of
from mmearth_data.store import TILE_VARS, CorpusReader, StoreWriter, create_store, tile_checksum


class DeriveError(ValueError):
    """A derivation that cannot be made (the message names the option and the fix)."""


@dataclass(frozen=True)
class Derivation:
    crop: int | None = None
    subset: int | None = None
    split: tuple[tuple[str, float], ...] | None = None
    modalities: tuple[str, ...] | None = None
    seed: int = 0


def parse_split(text: str) -> tuple[tuple[str, float], ...]:
    """``train=0.9,val=0.05,test=0.05`` -> ((name, share), ...); shares must sum to 1."""
    out = []
    for part in text.split(","):
        name, _, share = part.partition("=")
        try:
            value = float(share)
        except ValueError:
            raise DeriveError(
                f"`split` {text!r}: use name=share pairs like train=0.9,val=0.05,test=0.05"
            ) from None
        if name.strip() not in ("train", "val", "test") or not 0 <= value <= 1:
            raise DeriveError(f"`split` {text!r}: names are train, val, test and shares lie in [0, 1]")
        out.append((name.strip(), value))
    if abs(sum(v for _, v in out) - 1) > 1e-6:
        raise DeriveError(f"`split` {text!r}: the shares sum to {sum(v for _, v in out):g}, not 1")
    return tuple(out)


def stratified_subset(biome: np.ndarray, year: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` tiles balanced over (biome, year) strata as the sampler balances a build
    (:func:`~mmearth_data.sampling.allocate`), sorted; seeded within each stratum."""
    keys = sorted(set(zip(biome.tolist(), year.tolist(), strict=True)))
    members = {k: np.flatnonzero((biome == k[0]) & (year == k[1])) for k in keys}
    alloc = allocate(n, keys, {k: len(v) for k, v in members.items()})
    rng = np.random.default_rng([seed, 20_240_502])
    picked = [rng.permutation(members[k])[: alloc[k]] for k in keys if alloc[k]]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def _copy_tiles(
    r: CorpusReader, w: StoreWriter, sel: np.ndarray, mods: Sequence[Modality], size: int,
    new_split: np.ndarray | None,
) -> None:  # fmt: skip
    """Copy the source's tiles ``sel`` into the new store shard by shard: pixel modalities centre-cropped
    to ``size`` (transforms moved by the margin), the split replaced when ``new_split`` is given,
    checksums of the copied values."""
    off = (r.tile_size - size) // 2
    tile_names = [v.name for v in TILE_VARS if r.has(v.name)] + [f"{m.name}_present" for m in mods]
    for s0 in range(0, len(sel), w.shard_tiles):
        s1 = min(s0 + w.shard_tiles, len(sel))
        idx = sel[s0:s1]
        data = {name: r.rows(name, idx) for name in tile_names}
        for m in mods:
            v = r.rows(m.name, idx)
            if m.kind == "pixel" and size != r.tile_size:
                v = np.ascontiguousarray(v[..., off : off + size, off : off + size])
            data[m.name] = v
        if size != r.tile_size:
            tr = data["transform"].copy()
            tr[:, 2] += tr[:, 0] * off + tr[:, 1] * off  # origin moves by the cropped margin
            tr[:, 5] += tr[:, 3] * off + tr[:, 4] * off
            data["transform"] = tr
        if new_split is not None:
            data["split"] = new_split[s0:s1]
        data["checksum"] = np.array(
            [[tile_checksum(data[m.name][i]) for m in mods] for i in range(s1 - s0)], np.uint32
        ).reshape(s1 - s0, len(mods))
        w.write_tiles(s0, data)


def derive_store(src: str, dst: str, how: Derivation) -> dict[str, Any]:
    """Write the derived store at ``dst`` (see the module docstring); returns a summary."""
    from mmearth_data.build import _exists
    from mmearth_data.stats import write_statistics

    r = CorpusReader(src)
    if _exists(dst)[0] or os.path.exists(dst):
        raise DeriveError(f"`dst` {dst} already exists; choose a new path (nothing was changed)")
    names = [m.name for m in r.modalities]
    keep = list(how.modalities) if how.modalities else names
    unknown = [k for k in keep if k not in names]
    if unknown:
        raise DeriveError(f"`modalities`: {', '.join(unknown)} not in {src} (it holds {', '.join(names)})")
    if "sentinel2" not in keep:
        raise DeriveError("`modalities` must keep sentinel2 (the encoder's input)")
    mods = [m for m in r.modalities if m.name in keep]
    size = r.tile_size
    if how.crop is not None:
        if not 0 < how.crop <= size:
            raise DeriveError(f"`crop` {how.crop}: must be between 1 and the source's tile size {size}")
        size = how.crop
    meta = r.tiles()
    complete = meta["complete"].to_numpy()
    sel = np.flatnonzero(complete)
    if how.subset is not None:
        if not 0 < how.subset <= len(sel):
            raise DeriveError(f"`subset` {how.subset}: the source has {len(sel)} complete tiles")
        sub = stratified_subset(
            meta["biome"].to_numpy()[sel].astype(int),
            meta["year"].to_numpy()[sel].astype(int),
            how.subset,
            how.seed,
        )
        sel = sel[sub]
    n = len(sel)
    if n == 0:
        raise DeriveError(f"{src} holds no complete tile to derive from")
    shard_tiles = min(r.shard_tiles, max(r.chunk_tiles, 1 << (n - 1).bit_length()))
    chunk_tiles = min(r.chunk_tiles, shard_tiles)
    shard_tiles -= shard_tiles % chunk_tiles
    derivation = {k: v for k, v in asdict(how).items() if v is not None}
    # no "build" attribute of its own: `mmearth build` and `repair` must not take it for the source
    attrs = {
        "grid": r.attrs.get("grid", {}),
        "derived": {
            "from": os.path.abspath(src) if "://" not in src else src,
            "from_config_hash": r.attrs.get("build", {}).get("config_hash"),
            "derivation": derivation,
            "source_build": r.attrs.get("build", {}),
        },
    }
    create_store(
        dst, n_tiles=n, tile_size=size, modalities=mods, chunk_tiles=chunk_tiles, shard_tiles=shard_tiles,
        attrs=attrs, compression=r.attrs.get("compression", {}).get("mode", "compact"),
    )  # fmt: skip
    new_split = None
    if how.split is not None:
        new_split = split_of(meta["lat"].to_numpy()[sel], meta["lon"].to_numpy()[sel], how.split, how.seed)
    _copy_tiles(r, StoreWriter(dst), sel, mods, size, new_split)
    write_statistics(dst)
    return {
        "store": dst,
        "from": src,
        "n_tiles": n,
        "tile_size": size,
        "modalities": keep,
        "derivation": derivation,
    }
