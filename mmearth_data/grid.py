"""A deterministic global grid of non-overlapping tiles, and each tile's own UTM pixel grid.

Data flow: ``grid`` -> sampling (which grid cells to draw) -> sources and store (a tile's CRS, transform
and footprint).

The grid follows Major TOM's layout: rows are equally spaced in latitude, ``spacing`` metres apart along
the meridian, counted from the equator (``U`` north, ``D`` south); each row holds as many equally spaced
columns as fit ``spacing`` metres apart along its parallel, counted from the prime meridian (``R`` east,
``L`` west). A tile is a ``size x size`` square of 10 m pixels centred on its cell, snapped to the
integer 10 m grid of the tile's UTM zone. The spacing is the tile's diagonal plus 2 %, so that squares of
any orientation (UTM zones rotate against each other) around centres ``spacing`` apart never overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import pyproj
import shapely

EARTH_RADIUS_M = 6_371_008.8
M_PER_DEG = EARTH_RADIUS_M * math.pi / 180.0
MAX_LAT = 84.0  # UTM's northern limit; the south is limited to 80 S
MIN_LAT = -80.0


class GridError(ValueError):
    """Bad grid parameters."""


def check_tile_size(size: int) -> None:
    if not isinstance(size, int) or size < 32 or size > 1024 or size % 32:
        raise GridError(
            f"tile size {size!r} is not valid: use a multiple of 32 pixels between 32 and 1024 "
            "(MMEarth uses 128, or 64 for MMEarth64)"
        )


DEFAULT_TILE_SIZE = 128  # MMEarth's tiles (MMEarth64 crops them to 64)


@dataclass(frozen=True)
class GlobalGrid:
    """The global grid for tiles of ``size`` pixels of ``resolution`` metres."""

    size: int = DEFAULT_TILE_SIZE
    resolution: float = 10.0

    def __post_init__(self):
        check_tile_size(self.size)

    @property
    def tile_m(self) -> float:
        return self.size * self.resolution

    @property
    def spacing_m(self) -> int:
        return int(math.ceil(self.tile_m * math.sqrt(2) * 1.02 / 10.0) * 10)

    @property
    def dlat(self) -> float:
        return self.spacing_m / M_PER_DEG

    def n_cols(self, row: np.ndarray) -> np.ndarray:
        lat = np.asarray(row) * self.dlat
        circ = 2 * math.pi * EARTH_RADIUS_M * np.cos(np.radians(lat))
        return np.maximum(np.floor(circ / self.spacing_m).astype(np.int64), 1)

    def cell_of(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (row, col) of the grid cell nearest to each point."""
        row = np.rint(np.asarray(lat, np.float64) / self.dlat).astype(np.int64)
        n = self.n_cols(row)
        col = np.rint(np.asarray(lon, np.float64) / (360.0 / n)).astype(np.int64)
        col = (col + n // 2) % n - n // 2  # wrap into [-n/2, n/2)
        return row, col

    def center(self, row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        row = np.asarray(row, np.int64)
        n = self.n_cols(row)
        lat = row * self.dlat
        lon = np.asarray(col, np.int64) * (360.0 / n)
        return lat, (lon + 180.0) % 360.0 - 180.0

    def tile_id(self, row: int, col: int) -> str:
        ns = "U" if row >= 0 else "D"
        ew = "R" if col >= 0 else "L"
        return f"G{self.spacing_m}_{abs(row)}{ns}_{abs(col)}{ew}"

    def tile_ids(self, rows: np.ndarray, cols: np.ndarray) -> list[str]:
        return [self.tile_id(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]

    @staticmethod
    def parse_id(tile_id: str) -> tuple[int, int, int]:
        """(spacing_m, row, col) of a tile id; raises ValueError on anything else."""
        try:
            g, r, c = tile_id.split("_")
            if g[0] != "G" or r[-1] not in "UD" or c[-1] not in "RL":
                raise ValueError
            row = int(r[:-1]) * (1 if r[-1] == "U" else -1)
            col = int(c[:-1]) * (1 if c[-1] == "R" else -1)
            return int(g[1:]), row, col
        except (ValueError, IndexError):
            raise ValueError(f"not a tile id: {tile_id!r} (expected e.g. 'G1850_123U_45L')") from None


def utm_epsg(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """EPSG code of the standard UTM zone of each point (326xx north, 327xx south)."""
    lat = np.asarray(lat, np.float64)
    lon = np.asarray(lon, np.float64)
    zone = (np.floor((lon + 180.0) / 6.0).astype(np.int64) % 60) + 1
    return np.where(lat >= 0, 32600, 32700) + zone


@cache
def _to_utm(epsg: int) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(4326, epsg, always_xy=True)


@cache
def _from_utm(epsg: int) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(epsg, 4326, always_xy=True)


def tile_transforms(
    lat: np.ndarray, lon: np.ndarray, epsg: np.ndarray, size: int, resolution: float = 10.0
) -> np.ndarray:
    """(n, 6) affine transforms (a, b, c, d, e, f) of tiles centred on each point, snapped to the UTM
    zone's integer ``resolution`` grid (north-up, so b = d = 0 and e = -resolution)."""
    lat = np.asarray(lat, np.float64)
    lon = np.asarray(lon, np.float64)
    epsg = np.asarray(epsg, np.int64)
    out = np.zeros((lat.size, 6), np.float64)
    half = size * resolution / 2
    for code in np.unique(epsg):
        sel = epsg == code
        x, y = _to_utm(int(code)).transform(lon[sel], lat[sel])
        x0 = np.round((np.asarray(x) - half) / resolution) * resolution
        y0 = np.round((np.asarray(y) + half) / resolution) * resolution
        out[sel] = np.stack(
            [np.full_like(x0, resolution), 0 * x0, x0, 0 * x0, np.full_like(x0, -resolution), y0], axis=1
        )
    return out


def footprint_rings(transforms: np.ndarray, epsg: np.ndarray, size: int, densify: int = 1) -> np.ndarray:
    """WGS84 footprints of tiles from their UTM transforms: closed rings (n, 4 * densify + 1, 2) of
    (lon, lat), from the top-left corner clockwise, each edge cut into ``densify`` segments. The one
    footprint of a tile: the plan's geometry and the catalog items' (at 1.28 km, the UTM edges stay
    straight in WGS84 to well under a millimetre, so the corners alone describe it)."""
    transforms = np.asarray(transforms, np.float64).reshape(-1, 6)
    epsg = np.asarray(epsg, np.int64)
    t = np.linspace(0, 1, densify + 1)[:-1]
    cols = np.concatenate([t, np.ones_like(t), 1 - t, np.zeros_like(t), [0.0]]) * size
    rows = np.concatenate([np.zeros_like(t), t, np.ones_like(t), 1 - t, [0.0]]) * size
    x = transforms[:, [0]] * cols + transforms[:, [1]] * rows + transforms[:, [2]]
    y = transforms[:, [3]] * cols + transforms[:, [4]] * rows + transforms[:, [5]]
    rings = np.empty(x.shape + (2,))
    for code in np.unique(epsg):
        sel = epsg == code
        lon, lat = _from_utm(int(code)).transform(x[sel], y[sel])
        rings[sel, :, 0], rings[sel, :, 1] = lon, lat
    return rings


def footprints(transforms: np.ndarray, epsg: np.ndarray, size: int, densify: int = 1) -> np.ndarray:
    """:func:`footprint_rings` as shapely polygons."""
    return shapely.polygons(footprint_rings(transforms, epsg, size, densify))


def tile_center_lonlat(transforms: np.ndarray, epsg: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Longitude / latitude of each tile's centre, from its transform."""
    transforms = np.asarray(transforms, np.float64).reshape(-1, 6)
    epsg = np.asarray(epsg, np.int64)
    lon = np.zeros(len(transforms))
    lat = np.zeros(len(transforms))
    for code in np.unique(epsg):
        sel = epsg == code
        x = transforms[sel, 0] * size / 2 + transforms[sel, 2]
        y = transforms[sel, 4] * size / 2 + transforms[sel, 5]
        lo, la = _from_utm(int(code)).transform(x, y)
        lon[sel], lat[sel] = lo, la
    return lon, lat
