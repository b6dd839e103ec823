"""The source interface: (planned tiles, modalities) -> arrays on each tile's own grid.

Data flow: sampling plan -> ``Source.fetch`` -> :class:`TileResult` per tile -> store writer.

A source receives a batch (one shard's tiles) so that it can overlap requests; it returns, in order,
one :class:`TileResult` or one :class:`TileFailure` per tile and never raises for a single tile's
problem. A result holds every requested stored modality in its registry dtype and shape; a modality the
archive lacks for that tile is all fill with ``present[name] = False``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mmearth_data.registry import Modality


@dataclass(frozen=True)
class TileRequest:
    """One planned tile, as the plan describes it."""

    tile_id: str
    lat: float
    lon: float
    epsg: int
    transform: tuple[float, ...]
    size: int
    year: int
    biome: int
    ecoregion: int
    # the Sentinel-2 scene a stored tile was built from, when modalities are added to it later: the
    # source builds the new modalities from that scene (and its date) instead of choosing one
    s2_id: str | None = None
    s2_product: str | None = None
    s2_date: str | None = None  # ISO day

    @property
    def pinned(self) -> bool:
        return self.s2_date is not None

    @classmethod
    def at(
        cls, lat: float, lon: float, year: int, size: int, biome: int = 0, ecoregion: int = 0
    ) -> TileRequest:
        """The global grid's tile of ``size`` px that holds (lat, lon), on its UTM zone's 10 m grid."""
        from mmearth_data.grid import GlobalGrid, tile_transforms, utm_epsg

        grid = GlobalGrid(size)
        row, col = grid.cell_of(np.array([lat]), np.array([lon]))
        clat, clon = grid.center(row, col)
        epsg = utm_epsg(clat, clon)
        transform = tile_transforms(clat, clon, epsg, size)[0]
        return cls(
            grid.tile_id(int(row[0]), int(col[0])), float(clat[0]), float(clon[0]), int(epsg[0]),
            tuple(float(v) for v in transform), size, year, biome, ecoregion,
        )  # fmt: skip

    @classmethod
    def from_row(cls, row: Any, size: int) -> TileRequest:
        return cls(
            tile_id=str(row["tile_id"]),
            lat=float(row["lat"]),
            lon=float(row["lon"]),
            epsg=int(row["epsg"]),
            transform=tuple(float(v) for v in row["transform"]),
            size=size,
            year=int(row["year"]),
            biome=int(row["biome"]),
            ecoregion=int(row["ecoregion"]),
            s2_id=row.get("s2_id") or None,
            s2_product=row.get("s2_product") or None,
            s2_date=row.get("s2_date") or None,
        )


@dataclass
class TileResult:
    """Arrays of one tile. ``s2_date`` is a numpy datetime64[D]; ``s2_product`` 'L1C' or 'L2A'."""

    tile_id: str
    arrays: dict[str, np.ndarray]
    present: dict[str, bool]
    s2_date: np.datetime64
    s2_product: str
    extra: dict[str, Any] = field(default_factory=dict)


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
