"""The offline world: real global layers, regridded once into ``world.npz`` (see ``make_world.py``).

Data flow: ``world`` -> sampling (the land frame and the biome map) and the ``offline`` source (per-tile
land-cover mix, climate and terrain). Every lookup takes arrays of latitude / longitude in degrees and
is vectorised. Layers are on a 0.05 deg grid whose first cell's north-west corner is (90 N, 180 W); the
climatology and the elevation proxy are on ERA5's 0.25 deg grid whose first node is (90 N, 180 W).
"""

from __future__ import annotations

import json
from functools import cache, cached_property
from pathlib import Path

import numpy as np

WORLD_PATH = Path(__file__).resolve().parent / "world.npz"
CELL = 0.05
CLIM_CELL = 0.25
ECO_BLOCK_DEG = 18
N_IGBP = 17


class World:
    """Read-only access to the committed global layers."""

    def __init__(self, path: Path = WORLD_PATH):
        if not path.exists():
            raise FileNotFoundError(
                f"offline world layers not found at {path}; regenerate them with "
                "`python -m mmearth_data.world.make_world` (needs PyPI)"
            )
        with np.load(path) as z:
            self.land = z["land"]
            self.koppen = z["koppen"]
            self.igbp = z["igbp"]
            self.biome_map = z["biome"]
            self.elev = z["elev"].astype(np.float32)
            self.eco_table = z["eco_table"]
            self.provenance = json.loads(str(z["provenance"]))
            # decode the longitude-delta encoding: 0.1 deg C and whole mm per month
            self.t2m = np.cumsum(z["t2m_dlon"], axis=-1, dtype=np.int32).astype(np.float32) / 10
            self.tp = np.cumsum(z["tp_dlon"], axis=-1, dtype=np.int32).astype(np.float32)

    # -- 0.05 deg layers ---------------------------------------------------------------------------
    @staticmethod
    def cell_index(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lat = np.asarray(lat, np.float64)
        lon = np.asarray(lon, np.float64)
        i = np.clip(np.floor((90.0 - lat) / CELL).astype(np.int64), 0, 3599)
        j = np.floor((lon + 180.0) / CELL).astype(np.int64) % 7200
        return i, j

    def land_pct(self, lat, lon) -> np.ndarray:
        return self.land[self.cell_index(lat, lon)]

    def biome(self, lat, lon) -> np.ndarray:
        return self.biome_map[self.cell_index(lat, lon)]

    def ecoregion(self, lat, lon) -> np.ndarray:
        """Ecoregion proxy id (1..), 0 where the biome is 0."""
        b = self.biome(lat, lon).astype(np.int64)
        bi = np.clip(np.floor((90.0 - np.asarray(lat)) / ECO_BLOCK_DEG).astype(np.int64), 0, 9)
        bj = np.floor((np.asarray(lon) + 180.0) / ECO_BLOCK_DEG).astype(np.int64) % 20
        out = self.eco_table[np.maximum(b - 1, 0), bi, bj]
        return np.where(b > 0, out, 0).astype(np.uint16)

    def igbp_mix(self, lat: float, lon: float, radius: int = 1) -> np.ndarray:
        """Fractions of the 17 IGBP classes in the (2r+1)^2 cells around a point (sums to 1)."""
        i, j = self.cell_index(lat, lon)
        ii = np.clip(np.arange(i - radius, i + radius + 1), 0, 3599)
        jj = np.arange(j - radius, j + radius + 1) % 7200
        block = self.igbp[np.ix_(ii, jj)].ravel()
        # the tile's own cell counts double: the tile lies in it
        counts = np.bincount(block, minlength=N_IGBP).astype(np.float64)
        counts[self.igbp[i, j]] += counts.sum() / 2
        return counts / counts.sum()

    # -- 0.25 deg layers -----------------------------------------------------------------------------
    @staticmethod
    def _bilinear_weights(lat, lon):
        lat = np.asarray(lat, np.float64)
        lon = np.asarray(lon, np.float64)
        y = np.clip((90.0 - lat) / CLIM_CELL, 0, 720 - 1e-9)
        x = ((lon + 180.0) / CLIM_CELL) % 1440
        i0 = np.floor(y).astype(np.int64)
        j0 = np.floor(x).astype(np.int64)
        fy = y - i0
        fx = x - j0
        return i0, j0, (j0 + 1) % 1440, fy, fx

    def _bilinear(self, grid: np.ndarray, lat, lon) -> np.ndarray:
        i0, j0, j1, fy, fx = self._bilinear_weights(lat, lon)
        g00 = grid[..., i0, j0]
        g01 = grid[..., i0, j1]
        g10 = grid[..., i0 + 1, j0]
        g11 = grid[..., i0 + 1, j1]
        return (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy

    def climate(self, lat, lon) -> tuple[np.ndarray, np.ndarray]:
        """Monthly 2 m temperature (deg C) and precipitation (mm/month), shape (12, ...)."""
        return self._bilinear(self.t2m, lat, lon), self._bilinear(self.tp, lat, lon)

    def elevation(self, lat, lon) -> np.ndarray:
        """Coarse elevation proxy (m) from the climatology's lapse-rate anomaly."""
        return self._bilinear(self.elev, lat, lon)

    def relief(self, lat, lon) -> np.ndarray:
        """Elevation change (m) across one 0.25 deg step around a point: a roughness indicator."""
        d = CLIM_CELL
        lat = np.asarray(lat, np.float64)
        lon = np.asarray(lon, np.float64)
        gx = self.elevation(lat, lon + d) - self.elevation(lat, lon - d)
        gy = self.elevation(np.clip(lat + d, -90, 90), lon) - self.elevation(np.clip(lat - d, -90, 90), lon)
        return 0.5 * np.hypot(gx, gy)

    @cached_property
    def sampling_cells(self) -> dict[int, np.ndarray]:
        """Flat 0.05 deg cell indices of each biome's sampling frame (land >= 50 %, |lat| <= 80)."""
        rows = np.arange(3600)
        lat = 90 - (rows + 0.5) * CELL
        ok_rows = np.abs(lat) <= 80
        frame = (self.land >= 50) & ok_rows[:, None]
        flat_biome = np.where(frame, self.biome_map, 0).ravel()
        order = np.argsort(flat_biome, kind="stable")
        counts = np.bincount(flat_biome, minlength=15)
        starts = np.concatenate([[0], np.cumsum(counts)])
        return {b: order[starts[b] : starts[b + 1]] for b in range(1, 15)}


@cache
def get_world() -> World:
    """The process-wide world (loaded once, ~0.5 s)."""
    return World()
