"""Downstream tasks for evaluating encoders: ``mmearth tasks build --out data/tasks --tiles 1200``.

Data flow: the global grid's held-out blocks (the ``val`` and ``test`` splits of the 1-degree block hash,
which pretraining on ``--split train`` never reads) -> offline tiles and the objects they were drawn
from -> three labelled tasks in one small Zarr store, with their own train / val / test split.

The labels come from the landscape's structure, which an encoder can only learn from the imagery's
spatial patterns: they are not a copy of a pretext map (Dynamic World, WorldCover, canopy height) and
not a function of climate or biome. The task tiles are drawn with parcel widths independent of their
location (:data:`TASK_FIELD_SIZES`; in the pretraining corpus the width follows the biome, a pretext
target, so a field-size label there could be read off the biome), and only tiles that are at least
:data:`MIN_FIELD_SHARE` field parcels are kept (whether a tile is farmland is a land-cover question,
which the pretext maps answer). Tiles more than :data:`MAX_OBSCURED` hidden by cloud, cloud shadow or
snow are left out, as BigEarthNet left out its snow- and cloud-covered patches: under snow the parcels
do not show, and a label the image does not carry cannot tell encoders apart. Only scenes of the growing
season (the month's greenness at least :data:`MIN_GREENNESS`) are kept, as field-boundary datasets pick
their scenes: then each parcel's crop is at its own stage, from bare soil to full canopy, and the
parcels differ; in the dormant months most of them are the same bare or frozen ground.

- ``fields`` (single-label, 4 classes): the parcels' size as the tile shows it, field pixels per
  field-boundary pixel (about 0.6 of the parcels' typical width): under 5, 5-7.3, 7.3-11.7, 11.7 and
  more (the quartiles of held-out farmland tiles). Measured on the drawn parcels rather than taken from
  the width the generator was asked for, which the parcels' random widths and lengths blur.
- ``objects`` (multi-label, 4 labels): a river or lake, a road, hedgerows, a farm track.
- ``boundaries`` (segmentation, 2 classes): field boundaries (the pixels where two parcels meet).
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import numpy as np

from mmearth_data.registry import stored_modalities
from mmearth_data.sampling import DEFAULT_YEARS, SampleConfig, primaries, sample_plan
from mmearth_data.sources.base import TileRequest
from mmearth_data.sources.offline import OfflineSource
from mmearth_data.store import TaskStoreWriter

TASKS: dict[str, dict[str, Any]] = {
    "fields": {
        "kind": "single-label",
        "classes": ["small fields", "medium fields", "large fields", "very large fields"],
    },
    "objects": {"kind": "multi-label", "classes": ["river or lake", "road", "hedgerows", "farm track"]},
    "boundaries": {"kind": "segmentation", "classes": ["background", "field boundary"]},
}
TASK_SPLITS = (("train", 0.6), ("val", 0.2), ("test", 0.2))
TASK_FIELD_SIZES = (6.0, 34.0)  # parcel width drawn log-uniformly in this range (10 m pixels)
FIELD_SCALE_EDGES = (5.0, 7.3, 11.7)  # ``fields`` classes: field px per boundary px, quartiles
MIN_FIELD_SHARE = 0.3  # a task tile is at least this share field parcels
MAX_OBSCURED = 0.1  # and at most this share hidden by cloud, cloud shadow or snow
MIN_GREENNESS = 0.5  # and on a scene of the growing season, when the parcels differ


class TaskError(ValueError):
    """A task store that cannot be built or read as asked."""


def labels_of(structure: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The three tasks' labels of one tile from the objects the offline source drew it from; None for a
    tile with too little farmland, or too much of it hidden, to be a task tile."""
    field = structure["parcel"] >= 0
    if (
        float(field.mean()) < MIN_FIELD_SHARE
        or float(structure["obscured"].mean()) > MAX_OBSCURED
        or float(structure["greenness"]) < MIN_GREENNESS
    ):
        return None
    scale = field.sum() / max(int(structure["field_boundary"].sum()), 1)
    fields = int(np.searchsorted(FIELD_SCALE_EDGES, scale, side="right"))
    objects = np.array(
        [
            structure["river"].any(),
            structure["road"].any(),
            structure["hedge"].sum() > 20,
            structure["track"].sum() > 20,
        ],
        np.uint8,
    )
    return {
        "fields": np.uint8(fields),
        "objects": objects,
        "boundaries": structure["field_boundary"].astype(np.uint8),
    }


def task_split(tile_id: str) -> str:
    u = int.from_bytes(hashlib.sha1(f"task/{tile_id}".encode()).digest()[:8], "big") / 2**64
    acc = 0.0
    for name, p in TASK_SPLITS:
        acc += p
        if u < acc:
            return name
    return TASK_SPLITS[-1][0]


def build_tasks(
    out: str, n_tiles: int, tile_size: int = 64, seed: int = 0, years=DEFAULT_YEARS,
    balance: bool = True, workers: int = 1,
) -> dict:  # fmt: skip
    """Build the task store at ``out`` (refused when something is there already): the held-out farmland
    tiles in plan order. With ``balance`` each ``fields`` class takes a quarter of them (tiles of a full
    class are skipped), so that a single-label score is not a majority-class score. ``workers`` processes
    generate the candidates (each tile is seeded by its id, so the store is the same for any number)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    if fs.exists(path):
        raise TaskError(f"{out} already exists; choose another `out` (nothing was changed)")
    if n_tiles < 30:
        raise TaskError(f"`n_tiles` {n_tiles}: at least 30 tiles are needed for train, val and test splits")
    candidates, quota = _candidates(n_tiles, tile_size, seed, years, balance)
    w = TaskStoreWriter(out, n_tiles, tile_size)
    reqs, fields, objects, level, counts = _pick_tiles(w, candidates, quota, n_tiles, seed, workers)
    if len(reqs) < n_tiles:
        fs.rm(path, recursive=True)
        if not balance:
            raise TaskError(f"the held-out blocks gave {len(reqs)} clear farmland tiles of {n_tiles}; ask for"
                            " fewer `n_tiles`")  # fmt: skip
        raise TaskError(
            f"the held-out blocks gave {counts.tolist()} tiles per fields class, short of {quota.tolist()};"
            " ask for fewer `n_tiles`, or turn the class balance off (`balance`)"
        )
    labels = {"fields": fields, "objects": objects, "level_l2a": level}
    labels |= {"lat": np.array([t.lat for t in reqs], np.float64), "lon": np.array([t.lon for t in reqs])}
    labels |= {"split": [task_split(t.tile_id) for t in reqs], "tile_id": [t.tile_id for t in reqs]}
    held_out = "tiles of the val and test 1-degree blocks (never in --split train pretraining)"
    w.finish(
        labels,
        {"tasks": TASKS, "tile_size": tile_size, "n_tiles": n_tiles, "seed": seed, "source": "offline",
         "source_version": OfflineSource.version,
         "held_out": held_out, "balanced": balance, "field_sizes": list(TASK_FIELD_SIZES),
         "min_field_share": MIN_FIELD_SHARE, "max_obscured": MAX_OBSCURED,
         "min_greenness": MIN_GREENNESS},
    )  # fmt: skip
    return {
        "store": out,
        "n_tiles": n_tiles,
        "fields_class_counts": np.bincount(fields, minlength=4).tolist(),
        "objects_share": objects.mean(0).round(3).tolist(),
    }


def _candidates(
    n_tiles: int, tile_size: int, seed: int, years: Any, balance: bool
) -> tuple[list[TileRequest], np.ndarray]:
    """(held-out tiles in plan order, how many tiles each ``fields`` class may take)."""
    n_cls = len(TASKS["fields"]["classes"])
    # candidates per tile: held-out blocks are ~10 % of the plan, and about a fifth of those are clear
    # farmland in the growing season; only as many are drawn as the classes need
    plan = primaries(sample_plan(SampleConfig(n_tiles * 160, tuple(years), seed + 1000, tile_size, 0)))
    held = plan[plan["split"].isin(["val", "test"])]
    candidates = [TileRequest.from_row(r, tile_size) for _, r in held.iterrows()]
    quota = np.full(n_cls, n_tiles // n_cls) + (np.arange(n_cls) < n_tiles % n_cls)
    return candidates, (quota if balance else np.full(n_cls, n_tiles))


_WORKER_SOURCE: list[OfflineSource] = []  # a worker process's source, made once by _init_worker


def _init_worker(seed: int) -> None:
    _WORKER_SOURCE[:] = [OfflineSource(seed=seed, field_sizes=TASK_FIELD_SIZES)]


def _generate(batch: list[TileRequest], src: OfflineSource | None = None) -> list[tuple]:
    """(Sentinel-2, L2A flag, labels or None) of each candidate, in order."""
    src = src or _WORKER_SOURCE[0]
    out = []
    for r in src.fetch(batch, stored_modalities(["sentinel2"])):
        lab = labels_of(r.extra["structure"])
        out.append((r.arrays["sentinel2"] if lab else None, r.s2_product == "L2A", lab))
    return out


def _generated(candidates: list[TileRequest], seed: int, workers: int):
    """Yield (batch, :func:`_generate` output) for each 64-candidate batch in plan order; with ``workers``
    > 1 from that many processes, a few batches ahead of the consumer (the rest are never generated once
    it stops)."""
    chunks = [candidates[c : c + 64] for c in range(0, len(candidates), 64)]
    if workers <= 1:
        src = OfflineSource(seed=seed, field_sizes=TASK_FIELD_SIZES)
        for chunk in chunks:
            yield chunk, _generate(chunk, src)
        return
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")  # never fork a process that may hold torch's or BLAS's threads
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(seed,)) as ex:
        todo = iter(chunks)
        ahead: deque = deque((c, ex.submit(_generate, c)) for c in itertools.islice(todo, 2 * workers))
        try:
            while ahead:
                chunk, fut = ahead.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    ahead.append((nxt, ex.submit(_generate, nxt)))
                yield chunk, fut.result()
        finally:
            for _, f in ahead:
                f.cancel()


def _pick_tiles(
    w: TaskStoreWriter, candidates: list[TileRequest], quota: np.ndarray, n: int, seed: int, workers: int = 1
) -> tuple[list[TileRequest], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate candidates in order, keep those whose ``fields`` class has room, and write their
    Sentinel-2 and boundaries 64 tiles at a time (chunk-aligned); (kept requests, fields, objects, L2A
    flags, tiles per class)."""
    fields, objects, level = np.zeros(n, np.uint8), np.zeros((n, 4), np.uint8), np.zeros(n, np.uint8)
    counts = np.zeros(len(quota), np.int64)
    reqs: list[TileRequest] = []
    pending: list[tuple] = []  # accepted tiles not yet written

    def write():
        a = len(reqs) - len(pending)
        w.write_images(a, np.stack([p[0] for p in pending]), np.stack([p[1]["boundaries"] for p in pending]))
        pending.clear()

    gen = _generated(candidates, seed, workers)
    for batch, results in gen:
        for t, (s2, l2a, lab) in zip(batch, results, strict=True):
            if lab is None:
                continue
            k = int(lab["fields"])
            if counts[k] >= quota[k] or len(reqs) == n:
                continue
            counts[k] += 1
            i = len(reqs)
            reqs.append(t)
            fields[i], objects[i], level[i] = k, lab["objects"], l2a
            pending.append((s2, lab))
            if len(pending) == 64:
                write()
        if len(reqs) == n:
            break
    gen.close()
    if pending:
        write()
    return reqs, fields, objects, level, counts
