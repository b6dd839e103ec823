"""Quicklook images of a tile: one PNG strip of six panels, drawn with numpy (no plotting library).

Panels, left to right (:data:`PANELS`): Sentinel-2 true colour (B4, B3, B2), Sentinel-1 VV (dB, the
ascending orbit, else the descending one), DEM hillshade, Dynamic World, ESA WorldCover, canopy height.
Class colours are the products' published palettes (:data:`PALETTES`); the browse page draws the
legends from the same table, which the collection JSON carries.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mmearth_data.registry import get

PANELS = ("sentinel2", "sentinel1", "dem", "dynamic_world", "esa_worldcover", "canopy_height")
PANEL_TITLES = {
    "sentinel2": "Sentinel-2 RGB",
    "sentinel1": "Sentinel-1 VV (dB)",
    "dem": "DEM hillshade",
    "dynamic_world": "Dynamic World",
    "esa_worldcover": "ESA WorldCover",
    "canopy_height": "canopy height (0-40 m)",
}
PALETTES: dict[str, dict[int, str]] = {
    "dynamic_world": {
        1: "#419bdf",
        2: "#397d49",
        3: "#88b053",
        4: "#7a87c6",
        5: "#e49635",
        6: "#dfc35a",
        7: "#c4281b",
        8: "#a59b8f",
        9: "#b39fe1",
    },
    "esa_worldcover": {
        10: "#006400",
        20: "#ffbb22",
        30: "#ffff4c",
        40: "#f096ff",
        50: "#fa0000",
        60: "#b4b4b4",
        70: "#f0f0f0",
        80: "#0064c8",
        90: "#0096a0",
        95: "#00cf75",
        100: "#fae6a0",
    },
}
NODATA_RGB = (40, 40, 40)


def legends() -> dict[str, list[dict[str, str | int]]]:
    """Class legends per categorical panel: value, name and colour."""
    out = {}
    for name, pal in PALETTES.items():
        classes = get(name).classes or {}
        out[name] = [{"value": v, "name": classes[v], "color": c} for v, c in pal.items()]
    return out


def _rgb(hexcolor: str) -> tuple[int, int, int]:
    return tuple(int(hexcolor[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def _stretch(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((x - lo) / (hi - lo), 0, 1)


def _gray(x: np.ndarray) -> np.ndarray:
    v = (np.nan_to_num(x, nan=0.0) * 255).astype(np.uint8)
    return np.stack([v, v, v], -1)


def panel_sentinel2(s2: np.ndarray) -> np.ndarray:
    rgb = s2[[3, 2, 1]].astype(np.float32) / 10000.0
    img = _stretch(rgb, 0.0, 0.3) ** (1 / 1.6)
    img = (img.transpose(1, 2, 0) * 255).astype(np.uint8)
    img[(s2 == 0).all(axis=0)] = NODATA_RGB
    return img


def panel_sentinel1(s1: np.ndarray) -> np.ndarray:
    vv = s1[0].astype(np.float32)
    if np.isnan(vv).all():
        vv = s1[4].astype(np.float32)
    img = _gray(_stretch(vv, -25.0, 0.0))
    img[np.isnan(vv)] = NODATA_RGB
    return img


def panel_dem(dem: np.ndarray, resolution: float = 10.0) -> np.ndarray:
    z = dem[0].astype(np.float64)
    if np.isnan(z).all():
        return np.full(z.shape + (3,), NODATA_RGB, np.uint8)
    z = np.nan_to_num(z, nan=float(np.nanmean(z)))
    dzdy, dzdx = np.gradient(z, resolution)
    slope = np.arctan(np.hypot(dzdx, dzdy))
    aspect = np.arctan2(-dzdx, dzdy)  # rows run south
    az, alt = np.radians(315.0), np.radians(45.0)
    shade = np.sin(alt) * np.cos(slope) + np.cos(alt) * np.sin(slope) * np.cos(az - aspect)
    return _gray(_stretch(shade, 0.0, 1.0))


def panel_classes(values: np.ndarray, name: str) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    lut[:] = NODATA_RGB
    for v, c in PALETTES[name].items():
        lut[v] = _rgb(c)
    return lut[values[0].astype(np.uint8)]


def panel_canopy(ch: np.ndarray) -> np.ndarray:
    h = ch[0].astype(np.float32)
    t = _stretch(h, 0.0, 40.0)
    img = np.stack([235 - 200 * t, 235 - 120 * t, 200 - 170 * t], -1).astype(np.uint8)
    img[ch[0] == 255] = NODATA_RGB
    return img


def strip(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """(H, 6 * H + 5 * gap, 3) uint8 image of one tile's panels; missing modalities are dark."""
    S = arrays["sentinel2"].shape[-1]
    makers = {
        "sentinel2": panel_sentinel2,
        "sentinel1": panel_sentinel1,
        "dem": panel_dem,
        "dynamic_world": lambda a: panel_classes(a, "dynamic_world"),
        "esa_worldcover": lambda a: panel_classes(a, "esa_worldcover"),
        "canopy_height": panel_canopy,
    }
    gap = 2
    out = np.full((S, len(PANELS) * (S + gap) - gap, 3), 255, np.uint8)
    for k, name in enumerate(PANELS):
        a = arrays.get(name)
        panel = makers[name](a) if a is not None else np.full((S, S, 3), NODATA_RGB, np.uint8)
        out[:, k * (S + gap) : k * (S + gap) + S] = panel
    return out


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
