"""Fault injection around any source: ``mmearth build --faults transient=0.1,permanent=0.01,corrupt=0.01``.

Each tile request draws, from a hash of (seed, tile id, attempt), whether it fails transiently (a
:class:`TileFailure` marked ``transient``: the build asks again for the same tile, a bounded number of
times), whether the tile is permanently unavailable (the same answer on every attempt: the build records
it and backfills the slot with an alternate tile), whether the answer is slow, and whether its payload
is corrupt (NaN or inf where the registry forbids them, a wrong shape, a wrong dtype, or all fill
although flagged present). Corrupt payloads must be rejected at the store boundary
(:func:`mmearth_data.store.payload_problem`): nothing invalid is ever written.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace

import numpy as np

from mmearth_data.registry import Modality
from mmearth_data.sources.base import SourceError, TileFailure, TileRequest, TileResult

CORRUPTIONS = ("nan", "inf", "shape", "dtype", "all_fill")


@dataclass(frozen=True)
class FaultSpec:
    transient: float = 0.0
    permanent: float = 0.0
    corrupt: float = 0.0
    slow: float = 0.0
    slow_s: float = 0.05
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """``key=value`` pairs, comma separated: rates in [0, 1] for transient, permanent, corrupt and
        slow; ``slow_s`` seconds per slow answer; ``seed``."""
        kw: dict[str, float | int] = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            key, _, value = part.partition("=")
            if key not in cls.__dataclass_fields__:
                raise SourceError(
                    f"`faults` {text!r}: unknown key {key!r}; use {', '.join(cls.__dataclass_fields__)}"
                )
            try:
                kw[key] = int(value) if key == "seed" else float(value)
            except ValueError:
                raise SourceError(f"`faults` {text!r}: {key} needs a number, got {value!r}") from None
        spec = cls(**kw)  # type: ignore[arg-type]
        for key in ("transient", "permanent", "corrupt", "slow"):
            if not 0.0 <= getattr(spec, key) <= 1.0:
                raise SourceError(f"`faults`: {key} is a rate from 0 to 1, got {getattr(spec, key)}")
        if spec.slow_s < 0 or spec.seed < 0:
            raise SourceError("`faults`: slow_s and seed must not be negative")
        return spec


def _u(*parts: object) -> float:
    """A uniform number in [0, 1) from a hash of ``parts``."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


class FaultySource:
    """``inner`` with faults injected as ``spec`` says; everything else passes through."""

    def __init__(self, inner, spec: FaultSpec):
        self.inner, self.spec = inner, spec
        self.name, self.years = inner.name, inner.years
        self.version = getattr(inner, "version", "")
        self.attempts: dict[str, int] = {}

    def __getattr__(self, name):  # check, describe, label_locations, ... of the wrapped source
        return getattr(self.inner, name)

    def fetch(self, tiles: list[TileRequest], modalities: tuple[Modality, ...]) -> list:
        s = self.spec
        out: list = [None] * len(tiles)
        ask = []
        for k, t in enumerate(tiles):
            n = self.attempts.get(t.tile_id, 0)
            self.attempts[t.tile_id] = n + 1
            if _u(s.seed, "permanent", t.tile_id) < s.permanent:
                out[k] = TileFailure(t.tile_id, "injected", "permanent fault (injected)")
            elif _u(s.seed, "transient", t.tile_id, n) < s.transient:
                out[k] = TileFailure(t.tile_id, "injected", "transient fault (injected)", transient=True)
            else:
                ask.append(k)
        got = self.inner.fetch([tiles[k] for k in ask], modalities) if ask else []
        for k, res in zip(ask, got, strict=True):
            t = tiles[k]
            n = self.attempts[t.tile_id] - 1
            if _u(s.seed, "slow", t.tile_id, n) < s.slow:
                time.sleep(s.slow_s)
            if isinstance(res, TileResult) and _u(s.seed, "corrupt", t.tile_id, n) < s.corrupt:
                kind = CORRUPTIONS[int(_u(s.seed, "kind", t.tile_id, n) * len(CORRUPTIONS))]
                res = corrupt(res, modalities, kind)
            out[k] = res
        return out


def corrupt(res: TileResult, modalities: tuple[Modality, ...], kind: str) -> TileResult:
    """A copy of ``res`` with one modality's payload broken in the way ``kind`` names."""
    m = next(m for m in modalities if m.name == "sentinel2")
    arrays = dict(res.arrays)
    a = np.array(arrays[m.name])
    if kind in ("nan", "inf"):
        a = a.astype(np.float32)
        a.flat[len(a.flat) // 2] = np.nan if kind == "nan" else np.inf
    elif kind == "shape":
        a = a[..., :-1]
    elif kind == "dtype":
        a = a.astype(np.int64) - 70000
    else:
        a = np.full_like(a, m.fill)
    arrays[m.name] = a
    return replace(res, arrays=arrays, present=dict(res.present, **{m.name: True}))
