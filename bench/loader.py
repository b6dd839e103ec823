"""Samples/s of the streaming Zarr loader against two real readers of the same tiles, over whole epochs.

    python bench/loader.py [--tiles 512] [--tile-size 128] [--img-size 112] [--batch-size 32] [--repeats 3]

One store is built (offline source) and exported to MMEarth's HDF5 layout
(:mod:`mmearth_data.mmearth_h5`); every reader hands out the same tiles with every pretraining modality:

- **torchgeo** ``torchgeo.datasets.MMEarth`` (the ``bench`` extra: ``pip install -e '.[bench]'``) on
  the export, as torchgeo ships it (opens the file per sample, normalises per band, no crop);
- **MMEarth-train's reading pattern**, re-implemented here (:class:`MMEarthTrainPattern`, documented
  as such: their code is not a dependency): per sample, one h5py read per modality of its band list,
  no-data to NaN and per-band normalisation with ``np.where``, class maps remapped value by value,
  one-hot biome / ecoregion decoded with ``argmax``, then a random crop;
- **ours**: :class:`model.data.StreamingCorpus` on the Zarr store, cropped, both ways it can hand
  out samples: normalised float32, and the stored dtypes (``raw=True``) that pretraining uses by default
  (``--normalise device``: :class:`model.data.BatchNormaliser` normalises them where the model runs,
  to the same values). The ``bench:`` line reads the stored-dtype rows.

Each loader runs ``--repeats`` whole epochs through a ``DataLoader`` (batch ``--batch-size``; the
readers' own start-up, such as opening files, included; ours with workers keeps them between epochs,
as training does, and starts them before the timing); min / median / max samples/s are printed, with the cores
each kept busy (CPU seconds of the process and its workers over wall seconds: zarr decodes on a thread
of its own, so "in the loop's process" is not one core) and samples per core-second.
"Per worker" is ``num_workers=0`` (the loop's own process reads); ours also runs with 1 and 2
workers for the scaling from 1 to 2 workers (both of this machine's cores). Ends with
``bench: loader per_worker=<ours, 0 workers> target=1000 scaling_1to2=<x> target=1.6
vs_torchgeo=<x> target=5 ok|short``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmearth_data.build import BuildConfig, build_in_process
from mmearth_data.mmearth_h5 import export_mmearth_h5
from model.data import StreamingCorpus
from model.mpmae import select_pretext

TARGET_PER_WORKER, TARGET_SCALING, TARGET_VS_TORCHGEO = 1000.0, 1.6, 5.0
NAME = "data_100k_v001"  # the subset torchgeo calls MMEarth100k (128 px)

# modality -> (band indices read, no-data value); MMEarth-train's pretraining modalities
PATTERN_BANDS = {
    "sentinel2": (list(range(13)), 0),
    "sentinel1": (list(range(8)), -np.inf),
    "aster": ([0, 1], -np.inf),
    "canopy_height_eth": ([0, 1], 255),
    "era5": (list(range(12)), np.inf),
    "dynamic_world": ([0], 0),
    "esa_worldcover": ([0], 255),
    "biome": (None, None),
    "eco_region": (None, None),
}
DW_MAP = [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5), (7, 6), (8, 7), (9, 8)]
WC_MAP = [(10, 0), (20, 1), (30, 2), (40, 3), (50, 4), (60, 5), (70, 6), (80, 7), (90, 8), (95, 9), (100, 10)]


class MMEarthTrainPattern(Dataset):
    """MMEarth-train's way of reading its HDF5 file, re-implemented for this benchmark."""

    def __init__(self, folder: str, img_size: int):
        self.path = os.path.join(folder, f"{NAME}.h5")
        with open(os.path.join(folder, f"{NAME}_band_stats.json")) as fh:
            self.stats = json.load(fh)
        with open(os.path.join(folder, f"{NAME}_tile_info.json")) as fh:
            self.info = json.load(fh)
        with h5py.File(self.path, "r") as f:
            self.n = f["sentinel2"].shape[0]
            self.names = [row[0].decode() for row in f["metadata"][:]]
        self.img_size, self.f, self.rng = img_size, None, np.random.default_rng(0)

    def __len__(self) -> int:
        return self.n

    def _norm(self, key: str, data: np.ndarray, bands: list[int]) -> np.ndarray:
        mean, std = self.stats[key]["mean"], self.stats[key]["std"]
        for j, b in enumerate(bands):
            data[j] = np.where(np.isnan(data[j]), np.nan, (data[j] - mean[b]) / std[b])
        return data

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.f is None:
            self.f = h5py.File(self.path, "r")
        level = self.info[self.names[i]]["S2_type"]
        out = {}
        for mod, (bands, nodata) in PATTERN_BANDS.items():
            if bands is None:  # one-hot
                out[mod] = torch.tensor(int(np.argmax(self.f[mod][i])))
                continue
            data = self.f[mod][i][bands].astype(np.float32)
            data = np.where(data == nodata, np.nan, data)
            if mod == "dynamic_world":
                for old, new in DW_MAP:
                    data = np.where(data == old, new, data)
            elif mod == "esa_worldcover":
                for old, new in WC_MAP:
                    data = np.where(data == old, new, data)
            else:
                key = f"sentinel2_{level}" if mod == "sentinel2" else mod
                data = self._norm(key, data, bands)
            out[mod] = torch.from_numpy(data)
        S = self.img_size
        y, x = self.rng.integers(0, out["sentinel2"].shape[-1] - S + 1, 2)
        for mod, v in out.items():
            if v.ndim == 3:
                out[mod] = v[:, y : y + S, x : x + S].contiguous()
        return out


def cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader workers), user + system."""
    import psutil

    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


CORES: dict[int, list[float]] = {}  # id(rates) -> cores busy per epoch


def epochs(make, n_samples: int, repeats: int) -> list[float]:
    """samples/s of ``repeats`` whole epochs, each timed from creating the iterator to its end; the
    cores they kept busy (CPU seconds / wall seconds) go to :data:`CORES`."""
    rates, cores = [], []
    for _ in range(repeats):
        c, t = cpu_seconds(), time.perf_counter()
        seen = 0
        for batch in make():
            seen += len(batch) if isinstance(batch, list) else int(next(iter(batch.values())).shape[0])
        dt = time.perf_counter() - t
        assert seen == n_samples, (seen, n_samples)
        rates.append(seen / dt)
        cores.append((cpu_seconds() - c) / dt)
    CORES[id(rates)] = cores
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=512)
    ap.add_argument("--tile-size", type=int, default=128)
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--store", help="reuse a store built by an earlier run (its export is redone)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench-loader-")
    store = args.store or f"{tmp}/s.zarr"
    if not args.store:
        build_in_process(BuildConfig(store=store, n_tiles=args.tiles, tile_size=args.tile_size, seed=5))
    folder = export_mmearth_h5(store, tmp, NAME)
    b, R = args.batch_size, args.repeats
    rows: list[tuple[str, int, list[float]]] = []

    pattern = MMEarthTrainPattern(folder, args.img_size)
    n = len(pattern)
    rows.append(("MMEarth-train's reading pattern (re-implemented; h5py)", 0,
                 epochs(lambda: DataLoader(pattern, batch_size=b, shuffle=True), n, R)))  # fmt: skip
    tg = None
    try:
        from torchgeo.datasets import MMEarth

        ds = MMEarth(tmp, subset="MMEarth100k")
        ds.split = "train"
        ds.indices = list(range(n))  # every exported tile, as the others read
        tg = epochs(lambda: DataLoader(ds, batch_size=b, shuffle=True, collate_fn=list), n, R)
        rows.append(("torchgeo.datasets.MMEarth 0.8.1 (h5py; as shipped)", 0, tg))
    except ImportError:
        print("torchgeo not installed (pip install -e '.[bench]'): its row is skipped")
    per_worker: dict[tuple[bool, int], list[float]] = {}
    for raw in (False, True):
        ours_ds = StreamingCorpus(
            store, select_pretext("all"), args.img_size, split=None, seed=1, epochs=1, raw=raw
        )
        assert ours_ds.n_eligible == n
        for w in (0, 1, 2):  # persistent workers, as in training (one start-up, outside the timing)
            dl = DataLoader(ours_ds, batch_size=b, num_workers=w, persistent_workers=w > 0)
            next(iter(dl))
            per_worker[raw, w] = epochs(lambda dl=dl: dl, n, R)
            label = "in the loop's process" if w == 0 else f"{w} worker{'s' * (w > 1)}"
            what = "stored dtypes, normalised where the model runs" if raw else "float32, normalised"
            rows.append((f"ours ({what}), {label}", w, per_worker[raw, w]))
    print(f"\n{n} tiles of {args.tile_size} px, crops {args.img_size} px, every pretraining modality, "
          f"batch {b}, {R} whole epochs each\n")  # fmt: skip
    print("| reader | workers | min | median | max samples/s | cores busy | samples per core-second |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, w, r in rows:
        busy = statistics.median(CORES[id(r)])
        print(
            f"| {name} | {w} | {min(r):.0f} | {statistics.median(r):.0f} | {max(r):.0f} | {busy:.2f} "
            f"| {statistics.median(r) / busy:.0f} |"
        )
    ours = statistics.median(per_worker[True, 0])  # what pretraining uses (--normalise device)
    scaling = statistics.median(per_worker[True, 2]) / statistics.median(per_worker[True, 1])
    vs_tg = ours / statistics.median(tg) if tg else float("nan")
    ok = (
        ours >= TARGET_PER_WORKER
        and scaling >= TARGET_SCALING
        and (tg is None or vs_tg >= TARGET_VS_TORCHGEO)
    )
    print(
        f"bench: loader per_worker={ours:.0f} target={TARGET_PER_WORKER:g} scaling_1to2={scaling:.2f} "
        f"target={TARGET_SCALING:g} vs_torchgeo={vs_tg:.1f} target={TARGET_VS_TORCHGEO:g} "
        f"mode=stored-dtypes baseline=torchgeo.datasets.MMEarth {'ok' if ok else 'short'}"
    )


if __name__ == "__main__":
    main()
