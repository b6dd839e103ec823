"""Farmland realism: the ``fields`` task's tiles measured beside real farmland in Sentinel-2 L2A.

    python bench/farmland.py [--tiles 200] [--cache ~/.cache/mmearth/realism]

The downstream ``fields`` label (the parcels' size) can only be read where the parcels show, so what
matters for it is the contrast between parcels in the growing season. Real farmland: eodal's L2A stack
(Swiss plateau, 30 May 2019, T32TMT) and BigEarthNet's six L2A patches, from the archives
``bench/realism.py`` downloads once (measured, never shipped), cut into 64 px windows (the task tiles'
size); windows with clouds, no data, mostly water or a mean NDVI under 0.2 (not vegetated land) are
left out. Offline: the task candidates ``mmearth tasks build`` keeps (held-out blocks, farmland, clear,
growing season), L2A scenes only, as the real ones are.

Statistics per window: B4's coefficient of variation (std / mean: bare and green parcels side by side),
B4 and B8 medians, NDVI's standard deviation and quartiles, B4's relative gradient (as in
``bench/realism.py``) and the B4-B8 correlation (negative where green and bare parcels alternate). A
statistic is in range when the offline median lies inside the real windows' inter-quartile range
widened by a quarter of its width on each side. For the offline tiles it also prints the ratio of
between-parcel to within-parcel B4 variance (the parcels' contrast against their own texture) and how
well a linear probe of four gradient statistics reads the ``fields`` label (5-fold, chance 0.25): a
hand-made upper reference for what the imagery shows of the label, not a model.

Ends with ``bench: farmland in_range_share=<v> target=0.8 ok|short``.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import realism  # noqa: E402

WIN = 64


def real_windows(root: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(scene, {B2, B4, B8, B11: reflectance}) 64 px windows of real vegetated land, L2A."""
    scenes = []
    path = root / "eodal-0.2.1/data/20190530_T32TMT_MSIL2A_S2A_pixel_division_10m.tiff"
    scenes.append(("eodal", {b: realism._read(path, realism.EODAL_ORDER.index(b) + 1) for b in BANDS}))
    for p in sorted(glob.glob(str(root / "BigEarthNet-S2-Example/*"))):
        stem = Path(p).name
        b8 = realism._read(f"{p}/{stem}_B08.tif")
        scenes.append(
            ("BigEarthNet", {b: realism._resize(realism._read(f"{p}/{stem}_B{b[1:].zfill(2)}.tif"), b8.shape)
                             for b in BANDS})
        )  # fmt: skip
    out = []
    for name, full in scenes:
        H, W = full["B8"].shape
        for y in range(0, H - WIN + 1, WIN):
            for x in range(0, W - WIN + 1, WIN):
                w = {b: full[b][y : y + WIN, x : x + WIN].astype(np.float64) / 1e4 for b in BANDS}
                if _vegetated(w):
                    out.append((name, w))
    return out


BANDS = ("B2", "B4", "B8", "B11")


def _vegetated(w: dict[str, np.ndarray]) -> bool:
    if (w["B2"] > 0.25).mean() > 0.005 or (w["B8"] <= 0).mean() > 0.001:
        return False
    if ((w["B8"] < 0.05) & (w["B11"] < 0.03)).mean() > 0.5:
        return False
    return float(_ndvi(w).mean()) >= 0.2


def _ndvi(w: dict[str, np.ndarray]) -> np.ndarray:
    return (w["B8"] - w["B4"]) / (w["B8"] + w["B4"] + 1e-6)


def stats(w: dict[str, np.ndarray]) -> dict[str, float]:
    b4, b8, nd = w["B4"], w["B8"], _ndvi(w)
    q = np.percentile(nd, [25, 50, 75])
    return {
        "B4 coefficient of variation": float(b4.std() / b4.mean()),
        "B4 p50": float(np.median(b4)),
        "B8 p50": float(np.median(b8)),
        "NDVI standard deviation": float(nd.std()),
        "NDVI p25": float(q[0]),
        "NDVI p50": float(q[1]),
        "NDVI p75": float(q[2]),
        "B4 relative gradient": realism.rel_gradient(b4),
        "corr B4-B8": float(np.corrcoef(b4.ravel(), b8.ravel())[0, 1]),
    }


def offline_tiles(n: int) -> tuple[list[dict[str, np.ndarray]], list[float], list[list[float]], list[int]]:
    """Windows, between/within parcel B4 variance ratios, gradient features and ``fields`` labels of the
    first ``n`` L2A task tiles (as ``mmearth tasks build`` draws them: seed 0, 64 px)."""
    from mmearth_data.registry import stored_modalities
    from mmearth_data.sources.offline import OfflineSource
    from mmearth_data.tasks import TASK_FIELD_SIZES, _candidates, labels_of

    candidates, _ = _candidates(2000, WIN, 0, (2017, 2018, 2019, 2020), True)
    src = OfflineSource(seed=0, field_sizes=TASK_FIELD_SIZES)
    wins, ratio, feats, labels = [], [], [], []
    for c in range(0, len(candidates), 64):
        for r in src.fetch(candidates[c : c + 64], stored_modalities(["sentinel2"])):
            lab = labels_of(r.extra["structure"])
            if lab is None or r.s2_product != "L2A":
                continue
            s2 = r.arrays["sentinel2"].astype(np.float64) / 1e4
            w = {b: s2[realism.REG_BANDS.index(b)] for b in BANDS}
            wins.append(w)
            parcel = r.extra["structure"]["parcel"]
            ids = np.unique(parcel[parcel >= 0])
            means = np.array([w["B4"][parcel == i].mean() for i in ids])
            within = np.mean([w["B4"][parcel == i].var() for i in ids])
            ratio.append(float(means.var() / max(within, 1e-12)))
            g = [np.abs(np.diff(w[b], axis=a)).mean() for b in ("B4", "B8") for a in (0, 1)]
            feats.append([g[0] + g[1], g[2] + g[3], w["B4"].std(), w["B8"].std()])
            labels.append(int(lab["fields"]))
        if len(wins) >= n:
            break
    return wins, ratio, feats, labels


def probe_accuracy(feats: list[list[float]], labels: list[int], folds: int = 5) -> float:
    """5-fold accuracy of a multinomial logistic regression (``model.probe.fit_logistic``) on standardised
    log features."""
    import torch

    from model.probe import fit_logistic

    X = np.log(np.asarray(feats))
    X = torch.from_numpy((X - X.mean(0)) / X.std(0)).float()
    y = torch.as_tensor(labels)
    order = np.random.default_rng(0).permutation(len(y))
    hits = 0
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        predict = fit_logistic(X[train], y[train], 4)
        with torch.no_grad():
            hits += int((predict(X[test]) == y[test]).sum())
    return hits / len(y)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=200, help="offline L2A task tiles measured")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/mmearth/realism"))
    args = ap.parse_args()
    from mmearth_data.sources.offline import OfflineSource

    real = real_windows(realism.fetch(Path(args.cache)))
    ours, ratio, feats, labels = offline_tiles(args.tiles)
    rows = realism.compare([stats(w) for _, w in real], [stats(w) for w in ours])
    n_eodal = sum(name == "eodal" for name, _ in real)
    head = (f"statistic ({len(real)} real windows: {n_eodal} eodal, {len(real) - n_eodal} BigEarthNet; "
            f"{len(ours)} offline task tiles, world {OfflineSource.version})")  # fmt: skip
    print(f"| {head} | real q25 | real median | real q75 | offline median | in range |")
    print("|---|---:|---:|---:|---:|---|")
    for key, q25, q50, q75, o, ok in rows:
        print(f"| {key} | {q25:.3f} | {q50:.3f} | {q75:.3f} | {o:.3f} | {'yes' if ok else 'NO'} |")
    print(f"offline: between / within parcel B4 variance, median {np.median(ratio):.2f}")
    print(f"offline: gradient statistics read `fields` at {probe_accuracy(feats, labels):.3f} (5-fold, "
          f"chance 0.25; classes {np.bincount(labels, minlength=4).tolist()})")  # fmt: skip
    share = sum(r[-1] for r in rows) / len(rows)
    print(f"bench: farmland in_range_share={share:.2f} target=0.8 {'ok' if share >= 0.8 else 'short'}")


if __name__ == "__main__":
    main()
