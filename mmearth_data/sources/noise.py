"""Random fields the offline world is drawn from: smooth Gaussian fields of chosen correlation
lengths (class placement, texture, clouds) and fractal surfaces (terrain). Deterministic in the
generator they are given; FFT-based, a few milliseconds for a 128 px tile.
"""

from __future__ import annotations

from functools import cache

import numpy as np


@cache
def _kgrid(size: int) -> np.ndarray:
    ky = np.fft.fftfreq(size)[:, None]
    kx = np.fft.rfftfreq(size)[None, :]
    return np.sqrt(kx**2 + ky**2).astype(np.float32)


def smooth_fields(rng: np.random.Generator, size: int, scales_px: list[float]) -> np.ndarray:
    """Zero-mean unit-variance Gaussian random fields, one per correlation length (pixels)."""
    k = _kgrid(size)
    noise = rng.standard_normal((len(scales_px), size, size), dtype=np.float32)
    filt = np.exp(-2 * np.pi**2 * (np.asarray(scales_px, np.float32)[:, None, None] * k) ** 2)
    f = np.fft.irfft2(np.fft.rfft2(noise) * filt, s=(size, size)).astype(np.float32)
    f -= f.mean(axis=(1, 2), keepdims=True)
    f /= f.std(axis=(1, 2), keepdims=True) + 1e-6
    return f


def fractal_field(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """Unit-variance surface with power spectrum ~ k^-beta (beta 3 is typical terrain)."""
    k = _kgrid(size).copy()
    k[0, 0] = np.inf
    noise = rng.standard_normal((size, size), dtype=np.float32)
    f = np.fft.irfft2(np.fft.rfft2(noise) * k ** (-beta / 2), s=(size, size)).astype(np.float32)
    f -= f.mean()
    return f / (f.std() + 1e-6)
