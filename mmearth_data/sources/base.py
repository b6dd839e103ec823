"""The source interface: (planned tiles, modalities) -> arrays on each tile's own grid.

Data flow: sampling plan -> ``Source.fetch`` -> :class:`TileResult` per tile -> store writer.

A source receives a batch (one shard's tiles) so that it can overlap requests; it returns, in order,
one :class:`TileResult` or one :class:`TileFailure` per tile and never raises for a single tile's
problem. A result holds every requested stored modality in its registry dtype and shape; a modality the
archive lacks for that tile is all fill with ``present[name] = False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mmearth_data.registry import Modality
from mmearth_data.tiles import TileRequest, TileResult

__all__ = ["Source", "SourceError", "TileFailure", "TileRequest", "TileResult", "empty_arrays"]


@dataclass
class TileFailure:
    """A tile the source could not deliver: ``stage`` (e.g. 'sentinel2', 'request'), a ``reason``."""

    tile_id: str
    stage: str
    reason: str
    transient: bool = False  # worth asking again for the same tile (the build retries it a few times)


class Source(Protocol):
    name: str
    years: range

    def fetch(
        self, tiles: list[TileRequest], modalities: tuple[Modality, ...]
    ) -> list[TileResult | TileFailure]: ...

    def describe(self) -> dict[str, Any]:
        """Provenance written into the store (no secrets)."""
        ...


class SourceError(ValueError):
    """A source cannot serve the request as configured (bad years, unknown source)."""


def empty_arrays(modalities: tuple[Modality, ...], size: int) -> dict[str, np.ndarray]:
    """All-fill arrays of one tile for each modality (no tile axis)."""
    return {m.name: np.full(m.shape(1, size)[1:], m.fill, dtype=m.np_dtype) for m in modalities}
