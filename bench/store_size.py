"""Bytes per tile of the Zarr store against the same tiles in MMEarth's HDF5 layout, and losslessness.

    python bench/store_size.py [--tiles 256] [--tile-size 64]

MMEarth's layout: one HDF5 file, one dataset per modality of shape (N, C, H, W), chunked one sample per
chunk, gzip level 4 (h5py). The same arrays (same dtypes) go into both, so the comparison is the
layout and codec alone. Ends with ``bench: store_size ratio=<zarr/hdf5> target=0.7 ok|short``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import h5py
import numpy as np

from mmearth_data.build import BuildConfig, export_shard, finish, prepare
from mmearth_data.store import CorpusReader

TARGET = 0.7


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--tile-size", type=int, default=64)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-size-")
    store = f"{tmp}/s.zarr"
    cfg = BuildConfig(store=store, n_tiles=args.tiles, tile_size=args.tile_size)
    prep = prepare(cfg)
    finish(cfg, [export_shard(cfg, k, prep.candidates[k]) for k in prep.shards], 1.0)
    r = CorpusReader(store)
    h5 = f"{tmp}/mmearth.h5"
    rows = []
    with h5py.File(h5, "w") as f:
        for m in r.modalities:
            data = np.asarray(r.group[m.name][:])
            chunks = (1,) + data.shape[1:] if data.ndim > 1 else None
            f.create_dataset(m.name, data=data, chunks=chunks, compression="gzip", compression_opts=4)
    with h5py.File(h5, "r") as f:
        for m in r.modalities:
            z = np.asarray(r.group[m.name][:])
            hd = f[m.name][:]
            same = np.array_equal(z, hd, equal_nan=True)
            zb = dir_bytes(f"{store}/{m.name}")
            hb = f[m.name].id.get_storage_size()
            rows.append((m.name, zb / args.tiles / 1e3, hb / args.tiles / 1e3, same))
    z_total = dir_bytes(store) / args.tiles / 1e3
    h_total = os.path.getsize(h5) / args.tiles / 1e3
    print(f"| modality ({args.tiles} tiles, {args.tile_size} px) | zarr KB/tile | hdf5 KB/tile | lossless |")
    print("|---|---:|---:|---|")
    for name, zb, hb, same in rows:
        print(f"| {name} | {zb:.1f} | {hb:.1f} | {'yes' if same else 'NO'} |")
    print(f"| total (files on disk, incl. metadata) | {z_total:.1f} | {h_total:.1f} | |")
    ratio = z_total / h_total
    ok = ratio <= TARGET and all(s for *_, s in rows)
    print(f"bench: store_size ratio={ratio:.2f} target={TARGET} {'ok' if ok else 'short'}")


if __name__ == "__main__":
    main()
