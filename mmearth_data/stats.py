"""Normalisation statistics of a corpus store, computed with dask and written into its attributes.

Data flow: store -> ``compute_statistics`` -> ``statistics`` group attribute -> model normalisation and
catalog band metadata.

Continuous modalities get per-band count, mean, std, min and max over valid values (fill and NaN
excluded, only complete tiles whose ``<modality>_present`` flag is set). Sentinel-2 gets one set per
processing level (``L1C`` and ``L2A``: their value ranges differ). Categorical modalities get per-class
pixel counts. Everything streams chunk by chunk: memory stays flat with corpus size.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np

from mmearth_data.crash import crash_point
from mmearth_data.registry import Modality
from mmearth_data.store import CorpusReader, update_attrs

S2_LEVELS = ("L1C", "L2A")


def _moments(x: da.Array, tile_mask: np.ndarray, m: Modality) -> dict[str, da.Array]:
    """Lazy per-band sums over valid entries; band axis is 1."""
    x = x.astype(np.float64)
    valid = ~da.isnan(x) if m.np_dtype.kind == "f" else x != m.fill
    shape = (len(tile_mask),) + (1,) * (x.ndim - 1)
    valid = valid & da.from_array(tile_mask.reshape(shape), chunks=(x.chunks[0],) + (1,) * (x.ndim - 1))
    axes = (0,) + tuple(range(2, x.ndim))
    zero = da.where(valid, x, 0.0)
    return {
        "count": valid.sum(axis=axes),
        "sum": zero.sum(axis=axes),
        "sumsq": (zero * zero).sum(axis=axes),
        "min": da.where(valid, x, np.inf).min(axis=axes),
        "max": da.where(valid, x, -np.inf).max(axis=axes),
    }


def _finish(m: Modality, r: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    out = {}
    for k, band in enumerate(m.bands):
        n = float(r["count"][k])
        if n == 0:
            out[band] = {"count": 0, "mean": None, "std": None, "min": None, "max": None}
            continue
        mean = r["sum"][k] / n
        var = max(r["sumsq"][k] / n - mean * mean, 0.0)
        out[band] = {
            "count": int(n),
            "mean": float(mean),
            "std": float(np.sqrt(var)),
            "min": float(r["min"][k]),
            "max": float(r["max"][k]),
        }
    return out


def compute_statistics(url: str) -> dict[str, Any]:
    """Statistics of every stored modality of the store at ``url`` (not written; see
    :func:`write_statistics`)."""
    reader = CorpusReader(url)
    complete = reader.column("complete")
    product = reader.column("s2_product")
    lazy: dict[tuple[str, str | None], Any] = {}
    for m in reader.modalities:
        arr = reader.dask_array(m.name)
        if m.scalar:
            arr = arr[:, None]
        mask = complete & reader.column(f"{m.name}_present")
        if m.categorical:
            # fill is never a class: tiles outside the mask are counted as fill and dropped
            keep = da.from_array(
                mask.reshape((-1,) + (1,) * (arr.ndim - 1)), chunks=(arr.chunks[0],) + (1,) * (arr.ndim - 1)
            )
            vals = da.where(keep, arr, m.fill).astype(np.int64).ravel()
            lazy[(m.name, None)] = da.bincount(vals, minlength=max(m.classes) + 1)
        elif m.name == "sentinel2":
            for level in S2_LEVELS:
                lazy[(m.name, level)] = _moments(arr, mask & (product == level), m)
        elif m.name == "sentinel2_masks":
            continue  # flags and classes of the reference scene, not a normalised input
        else:
            lazy[(m.name, None)] = _moments(arr, mask, m)
    (computed,) = dask.compute(lazy)
    stats: dict[str, Any] = {}
    for (name, level), r in computed.items():
        m = next(x for x in reader.modalities if x.name == name)
        if m.categorical:
            counts = np.asarray(r)
            stats[name] = {"class_counts": {str(c): int(counts[c]) for c in m.classes if c < len(counts)}}
        elif level is not None:
            stats.setdefault(name, {})[level] = _finish(m, r)
        else:
            stats[name] = _finish(m, r)
    return stats


def write_statistics(url: str) -> dict[str, Any]:
    """Compute the statistics and store them in the group attribute ``statistics``."""
    stats = compute_statistics(url)
    crash_point("statistics")
    update_attrs(url, statistics=stats)
    return stats
