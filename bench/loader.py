"""Samples/s per worker of the streaming Zarr loader against MMEarth-train's way of reading HDF5.

    python bench/loader.py [--tiles 512] [--tile-size 64] [--img-size 56] [--batch-size 32]

Both read the same tiles (all pretraining modalities) and hand out normalised, cropped float tensors:

- baseline: one HDF5 file in MMEarth's layout (one dataset per modality, one chunk per sample, gzip 4);
  a map-style Dataset that, per sample, does one indexed h5py read per modality, normalises in numpy
  and crops, as MMEarth-train's dataset does;
- ours: :class:`model.data.StreamingCorpus` on the Zarr store (whole chunks, shuffle buffer).

Per worker means ``num_workers=0``: the loop's own process does the reading. Each loader's figure is
the best of three passes. Ends with
``bench: loader speedup=<ours/baseline> target=3 ok|short``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmearth_data.build import BuildConfig, build_in_process
from mmearth_data.registry import get
from mmearth_data.store import CorpusReader, strings
from model.data import StreamingCorpus, class_lookup, normaliser_for
from model.mpmae import select_pretext

TARGET = 3.0


class MMEarthH5(Dataset):
    """Reads like MMEarth-train: per sample, one h5py read per modality, numpy normalisation, crop."""

    def __init__(self, path: str, names: list[str], stats: dict, img_size: int, level: np.ndarray):
        self.path, self.names, self.img_size, self.level = path, names, img_size, level
        self.f = None
        self.norm = {n: normaliser_for(get(n), stats) for n in names if not get(n).categorical}
        self.lut = {n: class_lookup(get(n)) for n in names if get(n).categorical}
        with h5py.File(path, "r") as f:
            self.n = f[names[0]].shape[0]
        self.rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.f is None:
            self.f = h5py.File(self.path, "r")
        out = {}
        S = self.img_size
        y, x = self.rng.integers(0, self.f[self.names[0]].shape[-1] - S + 1, 2)
        for n in self.names:
            v = self.f[n][i]
            m = get(n)
            if m.categorical:
                v = self.lut[n][np.asarray(v, np.int64)]
            else:
                lv = np.array([self.level[i]]) if n == "sentinel2" else None
                v = self.norm[n].apply(np.asarray(v, np.float32)[None], lv)[0]
            if m.kind == "pixel":
                v = v[..., y : y + S, x : x + S]
            out[n] = torch.from_numpy(np.ascontiguousarray(v))
        return out


def rate(make_loader, n_batches: int, batch: int, repeats: int = 3) -> float:
    """Best of ``repeats`` passes (this machine's timings are noisy; both loaders get the same)."""
    best = 0.0
    for _ in range(repeats):
        it = iter(make_loader())
        next(it)  # start-up (file opening, first window) outside the timing
        t = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        best = max(best, n_batches * batch / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=512)
    ap.add_argument("--tile-size", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=56)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=14, help="timed batches (the HDF5 pass must hold them)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench-loader-")
    store = f"{tmp}/s.zarr"
    cfg = BuildConfig(store=store, n_tiles=args.tiles, tile_size=args.tile_size, seed=5)
    build_in_process(cfg)
    reader = CorpusReader(store)
    mods = [m for m in select_pretext("all") if m.stored]
    names = [m.name for m in mods]
    h5 = f"{tmp}/mmearth.h5"
    with h5py.File(h5, "w") as f:
        for n in names:
            data = np.asarray(reader.group[n][:])
            chunks = (1,) + data.shape[1:] if data.ndim > 1 else None
            f.create_dataset(n, data=data, chunks=chunks, compression="gzip", compression_opts=4)
    level = (strings(reader.group["s2_product"][:]) == "L2A").astype(np.int64)
    base_ds = MMEarthH5(h5, names, reader.statistics, args.img_size, level)
    rows = []
    b = args.batch_size
    args.batches = min(args.batches, args.tiles // b - 1)
    base = rate(lambda: DataLoader(base_ds, batch_size=b, shuffle=True, num_workers=0), args.batches, b)
    rows.append(("MMEarth-style HDF5 (h5py per modality per sample)", 0, base))
    ours_ds = StreamingCorpus(store, select_pretext("all"), args.img_size, split=None, seed=1)
    ours = rate(lambda: DataLoader(ours_ds, batch_size=b, num_workers=0), args.batches, b)
    rows.append(("streaming Zarr (model.data.StreamingCorpus)", 0, ours))
    ours2 = rate(lambda: DataLoader(ours_ds, batch_size=b, num_workers=2), args.batches, b, repeats=1)
    rows.append(("streaming Zarr, 2 workers (both cores)", 2, ours2))
    print(
        f"| loader ({args.tiles} tiles of {args.tile_size} px, crops {args.img_size}, all modalities) "
        "| workers | samples/s |"
    )
    print("|---|---:|---:|")
    for name, w, r in rows:
        print(f"| {name} | {w} | {r:.0f} |")
    speedup = ours / base
    print(f"bench: loader speedup={speedup:.1f} target={TARGET:g} {'ok' if speedup >= TARGET else 'short'}")


if __name__ == "__main__":
    main()
