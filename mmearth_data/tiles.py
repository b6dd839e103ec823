"""The records one tile travels in, shared by sampling, sources and store.

Data flow: a plan row -> :class:`TileRequest` (:meth:`TileRequest.from_row`) -> a source's
:class:`TileResult`, which carries its request -> the store writer, which takes the results alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
    split: str = ""  # train | val | test (the plan's); the writer stores it with the tile
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
            split=str(row.get("split") or ""),
            s2_id=row.get("s2_id") or None,
            s2_product=row.get("s2_product") or None,
            s2_date=row.get("s2_date") or None,
        )


@dataclass
class TileResult:
    """Arrays of one tile. ``s2_date`` is a numpy datetime64[D]; ``s2_product`` 'L1C' or 'L2A'.
    ``request`` is the tile's request, attached by whoever fetched it (the store writer reads the tile's
    place, year and split from it)."""

    tile_id: str
    arrays: dict[str, np.ndarray]
    present: dict[str, bool]
    s2_date: np.datetime64
    s2_product: str
    extra: dict[str, Any] = field(default_factory=dict)
    request: TileRequest | None = None
