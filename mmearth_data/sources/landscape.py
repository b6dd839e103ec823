"""Landscape structure of the offline world: the objects every modality of a tile sees.

Data flow: the tile's class map (surface classes placed by smooth fields, see ``offline.py``), its 10 m
DEM and the climate -> :func:`fields` (agricultural parcels), :func:`roads`, :func:`river` (downhill on
the DEM, ending in a lake where it meets a depression), settlement and canopy texture -> the class map
and per-pixel modifiers that the Sentinel-2 spectra, Sentinel-1 backscatter, canopy height and the
label products (:func:`worldcover_map`, :func:`dynamic_world_map`) are drawn from.

Sizes follow the real landscape at 10 m: field parcels of 60-400 m (smaller in old field systems of
humid temperate and tropical smallholder regions, larger on dry plains), roads 10-20 m wide, rivers
10-40 m, hedgerows one pixel. All functions are deterministic in the generator they are given and
vectorised; none needs more than a few milliseconds for a 128 px tile.
"""

from __future__ import annotations

import numpy as np

from mmearth_data.sources.noise import smooth_fields

# classes of the generator (same order as offline.CLASSES)
WATER, TREES, GRASS, FLOODED, CROPS, SHRUB, BUILT, BARE, SNOW, MANGROVE, MOSS = range(11)


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the last two axes (periodic edges, FFT), e.g. the sensor's point spread."""
    S = a.shape[-1]
    ky = np.fft.fftfreq(S)[:, None]
    kx = np.fft.rfftfreq(S)[None, :]
    h = np.exp(-2 * np.pi**2 * sigma**2 * (kx**2 + ky**2)).astype(np.float32)
    return np.fft.irfft2(np.fft.rfft2(a) * h, s=a.shape[-2:]).astype(np.float32)


def fields(rng: np.random.Generator, S: int, size_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Rectangular field parcels at a random orientation: strips of random width, cut at random
    lengths. Returns (parcel id per pixel, edge mask: pixels on a parcel boundary)."""
    theta = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:S, 0:S].astype(np.float32)
    u = x * np.cos(theta) + y * np.sin(theta)
    v = -x * np.sin(theta) + y * np.cos(theta)
    u0, u1, v0 = u.min(), u.max(), v.min()
    span_v = v.max() - v0
    widths = rng.gamma(4.0, size_px / 4.0 * 0.6, size=int(4 * (u1 - u0) / size_px) + 8)
    u_edges = u0 + np.cumsum(np.maximum(widths, 3))
    strip = np.searchsorted(u_edges, u)
    parcel = np.zeros((S, S), np.int32)
    n_cut = int(4 * span_v / size_px) + 8
    offset = 0
    for s in np.unique(strip):
        sel = strip == s
        lengths = rng.gamma(3.0, size_px / 3.0 * 1.5, size=n_cut)
        v_edges = v0 + np.cumsum(np.maximum(lengths, 4))
        parcel[sel] = offset + np.searchsorted(v_edges, v[sel])
        offset += n_cut + 1
    edge = np.zeros((S, S), bool)
    edge[:, 1:] |= parcel[:, 1:] != parcel[:, :-1]
    edge[1:, :] |= parcel[1:, :] != parcel[:-1, :]
    return parcel, edge


def line(rng: np.random.Generator, S: int, width: float, wiggle: float) -> np.ndarray:
    """A road or track crossing the tile: a gently curving line of ``width`` pixels."""
    theta = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:S, 0:S].astype(np.float32)
    c = rng.uniform(0.15, 0.85) * S
    along = (x - S / 2) * np.cos(theta) + (y - S / 2) * np.sin(theta)
    across = -(x - S / 2) * np.sin(theta) + (y - S / 2) * np.cos(theta) + S / 2 - c
    bend = wiggle * np.sin(along / S * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 6.3))
    return np.abs(across - bend) < width / 2


def river(
    rng: np.random.Generator, z: np.ndarray, width: float, max_steps: int = 600
) -> tuple[np.ndarray, list]:
    """A river from a high point on the tile's edge down the DEM: each step goes to the lowest of the
    neighbours that are not higher (random among ties), so elevation never rises along it; where it
    reaches a pit it ends in a lake that fills the depression up to a small depth. Returns (water
    mask, path as (row, col) list)."""
    S = z.shape[0]
    ar = np.arange(S)
    edge_idx = np.concatenate([ar, ar * S, ar * S + S - 1, (S - 1) * S + ar])
    top = edge_idx[np.argsort(z.ravel()[edge_idx])[-max(4, S // 8) :]]
    r, c = divmod(int(rng.choice(top)), S)
    path = [(r, c)]
    seen = {(r, c)}
    jitter = rng.random((S, S)).astype(np.float32) * 1e-3
    for _ in range(max_steps):
        best, best_z = None, z[r, c]
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)):
            rr, cc = r + dr, c + dc
            if 0 <= rr < S and 0 <= cc < S and (rr, cc) not in seen:
                zz = z[rr, cc] - jitter[rr, cc]
                if z[rr, cc] <= z[r, c] and (best is None or zz < best_z):
                    best, best_z = (rr, cc), zz
        if best is None:
            break
        r, c = best
        path.append(best)
        seen.add(best)
        if r in (0, S - 1) or c in (0, S - 1):
            break
    mask = np.zeros((S, S), bool)
    rows, cols = np.array(path).T
    mask[rows, cols] = True
    if width > 1.5:  # widened around the path, which stays water where the blur thins at the tile edge
        mask = (gaussian_blur(mask.astype(np.float32), width / 2.5) > 0.15) | mask
    end_r, end_c = path[-1]
    if 0 < end_r < S - 1 and 0 < end_c < S - 1:  # a pit: a lake fills it
        yy, xx = np.mgrid[0:S, 0:S]
        near = (yy - end_r) ** 2 + (xx - end_c) ** 2 < (S / 6) ** 2
        mask |= near & (z <= z[end_r, end_c] + 0.3 + 0.02 * np.ptp(z))
    return mask, path


def majority(cls: np.ndarray, n_classes: int, radius: int = 1) -> np.ndarray:
    """Majority (mode) filter over a (2r+1)^2 window: a minimum mapping unit."""
    S = cls.shape[0]
    counts = np.zeros((n_classes, S, S), np.int16)
    pad = np.pad(cls, radius, mode="edge")
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            win = pad[dy : dy + S, dx : dx + S]
            for k in np.unique(win):
                counts[k] += win == k
    return counts.argmax(0).astype(cls.dtype)


# plausible confusions of a land-cover classifier, per true class (generator classes)
CONFUSION = {
    WATER: (FLOODED, GRASS),
    TREES: (SHRUB, GRASS, CROPS),
    GRASS: (CROPS, SHRUB, BARE),
    FLOODED: (GRASS, WATER, TREES),
    CROPS: (GRASS, BARE, SHRUB),
    SHRUB: (GRASS, TREES, BARE),
    BUILT: (BARE, GRASS, CROPS),
    BARE: (SHRUB, GRASS, BUILT),
    SNOW: (BARE, WATER),
    MANGROVE: (TREES, FLOODED, WATER),
    MOSS: (GRASS, SHRUB, BARE),
}


def _confuse(rng: np.random.Generator, cls: np.ndarray, share: float, scale: float) -> np.ndarray:
    """Replace ``share`` of the pixels, in patches of about ``scale`` pixels, by a plausible confusion."""
    S = cls.shape[0]
    f = smooth_fields(rng, S, [scale])[0] if scale > 0.5 else rng.standard_normal((S, S)).astype(np.float32)
    wrong = f > np.quantile(f, 1 - share)
    pick = rng.integers(0, 3, (S, S))
    out = cls.copy()
    for k, alts in CONFUSION.items():
        sel = wrong & (cls == k)
        out[sel] = np.asarray(alts)[pick[sel] % len(alts)]
    return out


def worldcover_map(rng: np.random.Generator, cls_2020: np.ndarray, n_classes: int) -> np.ndarray:
    """ESA WorldCover as an independent 2020 product: the 2020 state of the tile, classification errors
    in patches (about 20 % of the pixels: v100's documented overall accuracy is 74.4 %), then a 3 x 3
    majority filter (its minimum mapping unit)."""
    out = _confuse(rng, cls_2020, 0.2, 2.5)
    return majority(out, n_classes, 1)


def dynamic_world_map(
    rng: np.random.Generator, cls: np.ndarray, n_dates: int, winter_share: float, snow_share: float
) -> np.ndarray:
    """Dynamic World's annual mode: ``n_dates`` per-date classifications of the tile (each with about
    15 % per-pixel confusion; crops bare and snow on the winter dates), and the most frequent label."""
    S = cls.shape[0]
    counts = np.zeros((11, S, S), np.int16)
    for d in range(n_dates):
        day = _confuse(rng, cls, 0.15, 0.0)
        if d < round(n_dates * winter_share):
            day = np.where(cls == CROPS, BARE, day)
        if d < round(n_dates * snow_share):
            day = np.where(np.isin(cls, (GRASS, CROPS, BARE, SHRUB, MOSS)), SNOW, day)
        for k in np.unique(day):
            counts[k] += day == k
    return counts.argmax(0).astype(cls.dtype)
