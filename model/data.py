"""Streaming training data from a corpus store: an IterableDataset that reads whole chunks.

Data flow: store (local path or fsspec URL) -> :class:`CorpusReader` -> :class:`StreamingCorpus` ->
``DataLoader`` -> MP-MAE. Each sample is a dict of tensors keyed by modality name (see
:meth:`StreamingCorpus.sample_keys`): ``sentinel2`` (normalised float, NaN where no data), continuous
targets (normalised float, NaN where missing), categorical targets (int16 class index, -1 where missing),
and ``index`` (the tile's store index).

How the stream is cut (deterministic for ``seed`` and the epoch):

- The eligible tiles (complete, in the split or the tile list) live in *units*: runs of whole chunks,
  one shard or less. Each epoch the units are permuted, and part ``p`` of ``P = ranks x workers`` takes
  units ``p, p + P, ...``: the parts are disjoint and cover every eligible tile exactly once per epoch.
- A part reads its units in windows of at least ``shuffle_buffer`` tiles (one zarr read per variable
  per unit, decoding whole chunks), permutes the tiles of the window and yields them.
- Every random choice (unit order, window permutation, crop offsets) is a function of (seed, epoch,
  part or tile), so a stream can be restarted at any sample (``start``) without reading what it skips:
  resumed training sees exactly the samples the uninterrupted run would have seen.

Normalisation uses the store's statistics: Sentinel-2 per processing level (L1C and L2A apart),
continuous modalities per band. Categorical values map onto 0..K-1 in the registry's class order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmearth_data.registry import Modality, get
from mmearth_data.store import DATE_FILL, CorpusReader, StoreError


class DataError(ValueError):
    """The store cannot feed the requested training (missing modality, no eligible tile, bad sizes)."""


@dataclass(frozen=True)
class Normaliser:
    """Per-band mean and std of one continuous modality (Sentinel-2: one row per processing level)."""

    mean: np.ndarray  # (bands,) or (levels, bands)
    std: np.ndarray

    def scale_shift(self, bands: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``(1 / std, -mean / std)`` of ``bands`` (all by default): normalised = x * scale +
        shift, the same numbers wherever it is applied (here or :class:`BatchNormaliser`)."""
        mean, std = self.mean, self.std
        if bands is not None:
            mean, std = mean[..., bands], std[..., bands]
        return (1.0 / std).astype(np.float32), (-mean / std).astype(np.float32)

    def apply(
        self, x: np.ndarray, level: np.ndarray | None = None, bands: np.ndarray | None = None
    ) -> np.ndarray:
        """Normalise ``x`` (tile axis first) in float32; ``level`` picks the row per tile (Sentinel-2),
        ``bands`` the statistics' bands that ``x`` holds (all by default)."""
        x = np.array(x, np.float32)  # a fresh float32 copy of the integer or float16 data
        extra = (1,) * (x.ndim - 2)
        scale, shift = self.scale_shift(bands)
        if level is None:
            scale, shift = scale.reshape((1, -1) + extra), shift.reshape((1, -1) + extra)
        else:
            scale = scale[level].reshape(level.shape + (-1,) + extra)
            shift = shift[level].reshape(level.shape + (-1,) + extra)
        x *= scale
        x += shift
        return x


S2_LEVELS = ("L1C", "L2A")


def _model_bands(m: Modality) -> list[int] | None:
    """Positions of the bands the model reads among the stored ones, or None when it reads them all."""
    return m.model_band_index if m.model_bands is not None else None


def _band_stats(stats: dict, m: Modality) -> tuple[np.ndarray, np.ndarray]:
    mean = np.zeros(m.n_bands, np.float64)
    std = np.ones(m.n_bands, np.float64)
    for k, band in enumerate(m.bands):
        s = stats.get(band) or {}
        if s.get("count"):
            mean[k] = s["mean"]
            std[k] = max(s["std"], 1e-6)
    return mean, std


def normaliser_for(m: Modality, statistics: dict) -> Normaliser:
    """The normaliser of continuous modality ``m`` from a store's ``statistics`` attribute."""
    st = statistics.get(m.name)
    if st is None:
        raise DataError(
            f"the store has no statistics for {m.name}; run `mmearth build` to completion (statistics are "
            "written last) or `mmearth validate` to see what is missing"
        )
    if m.name == "sentinel2":
        rows = []
        for level in S2_LEVELS:
            lv = st.get(level, {})
            rows.append(_band_stats(lv, m) if any((lv.get(b) or {}).get("count") for b in m.bands) else None)
        if all(r is None for r in rows):
            raise DataError("the store's Sentinel-2 statistics are empty (no complete tile with Sentinel-2)")
        rows = [r if r is not None else next(x for x in rows if x is not None) for r in rows]
        return Normaliser(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
    mean, std = _band_stats(st, m)
    return Normaliser(mean, std)


def class_lookup(m: Modality) -> np.ndarray:
    """Value -> class index (int16, 0..K-1 in registry order), -1 for fill and unknown values; one entry
    for every value the on-disk dtype can hold, so a map is translated by a single gather."""
    values = sorted(m.classes)
    lut = np.full(np.iinfo(m.np_dtype).max + 1, -1, np.int16)
    lut[values] = np.arange(len(values))
    lut[int(m.fill)] = -1
    return lut


def derived_values(m: Modality, meta: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """Tile-level values of a derived modality (``location`` or ``time``) for store indices ``idx``."""
    if m.name == "location":
        lat, lon = np.radians(meta["lat"][idx]), np.radians(meta["lon"][idx])
        return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], 1).astype(
            np.float32
        )
    if m.name == "time":
        days = meta["s2_date"][idx]
        dates = (np.datetime64("1970-01-01") + days.astype("timedelta64[D]")).astype("datetime64[M]")
        month = (dates.astype(np.int64) % 12).astype(np.float64)  # 0 = January
        out = np.stack([np.sin(2 * np.pi * month / 12), np.cos(2 * np.pi * month / 12)], 1).astype(np.float32)
        out[days == DATE_FILL] = np.nan
        return out
    raise DataError(f"no rule derives modality {m.name!r} from per-tile metadata ({m.derived_from})")


def opaque_cloud(masks: np.ndarray) -> np.ndarray:
    """Opaque-cloud pixels from stored ``sentinel2_masks`` (tile, 3, y, x): QA60's opaque flag (1), or
    SCL cloud of medium or high probability (8, 9) where the scene has SCL. Bool (tile, y, x)."""
    scl, flags = masks[:, 0], masks[:, 2]
    return (flags == 1) | np.isin(scl, (8, 9))


def read_tile_list(path: str) -> list[str]:
    """Tile ids from a text file (one per line, ``#`` comments), as written by ``mmearth catalog search``."""
    with open(path) as f:
        ids = [line.split("#")[0].strip() for line in f]
    ids = [t for t in ids if t]
    if not ids:
        raise DataError(f"{path} lists no tile ids (one id per line expected)")
    return ids


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a well-mixed 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class StreamingCorpus(IterableDataset):
    """Samples of ``modalities`` from the store at ``url``, cropped to ``img_size``, streamed forever
    (epoch after epoch) unless ``epochs`` is given.

    ``modalities`` must start with ``sentinel2`` (the input). ``split`` keeps tiles of that split
    (None: all); ``tile_ids`` keeps only those tiles (ids unknown to the store are an error). ``start``
    skips that many samples of this part's stream (resume). ``rank``/``world_size`` default to
    ``torch.distributed`` when it is initialised. ``start_batches`` (with ``batch_size``) resumes a
    ``DataLoader`` stream after that many batches.
    """

    def __init__(
        self,
        url: str,
        modalities: Sequence[Modality],
        img_size: int,
        split: str | None = "train",
        tile_ids: Sequence[str] | None = None,
        shuffle_buffer: int = 256,
        seed: int = 0,
        epochs: int | None = None,
        start: int = 0,
        start_batches: int = 0,
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        random_crop: bool = True,
        cloud_mask: bool = False,
        verify: bool = True,
        raw: bool = False,
    ):
        super().__init__()
        self.raw = raw
        reader = CorpusReader(url)
        self.url = url
        self.modalities = tuple(modalities)
        stored = self._check_modalities(reader)
        self.tile_size = reader.tile_size
        if img_size > self.tile_size:
            raise DataError(f"`img_size` {img_size} exceeds the store's tile size {self.tile_size}")
        self.img_size = img_size
        self.chunk_tiles = reader.chunk_tiles
        self.shard_tiles = reader.shard_tiles
        self.n_tiles = reader.n_tiles
        self.seed = seed
        self.epochs = epochs
        self.start = start
        self.start_batches = start_batches
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.random_crop = random_crop
        self._rank, self._world = rank, world_size
        # opaque-cloud mask from the stored Sentinel-2 masks (key ``cloud``; all clear without them)
        self.cloud_mask = cloud_mask and "sentinel2_masks" in stored

        self._read_metadata(reader, split, tile_ids)
        statistics = reader.statistics
        self.norm = {
            m.name: normaliser_for(m, statistics)
            for m in self.modalities
            if m.stored and not m.categorical and m.name != "sentinel2_masks"
        }
        self.lut = {m.name: class_lookup(m) for m in self.modalities if m.categorical}
        self._cache_tile_modalities(reader, verify)
        # chunks carry CRC32C checksums that zarr checks on every read; what a read cannot see is a shard
        # file that is gone (it reads back as fill): each unit checks that the shard file of every
        # modality it reads exists wherever one of its tiles holds that modality
        self._verify = verify
        self._reader: CorpusReader | None = None  # opened in the process that reads (see _read_unit)

    def _check_modalities(self, reader: CorpusReader) -> set[str]:
        """The store's modalities; :class:`DataError` unless it holds every one asked, Sentinel-2 first."""
        if not self.modalities or self.modalities[0].name != "sentinel2":
            raise DataError("the first modality must be sentinel2 (the encoder's input)")
        stored = {m.name for m in reader.modalities}
        missing = [m.name for m in self.modalities if m.stored and m.name not in stored]
        if missing:
            raise DataError(
                f"the store at {self.url} lacks {', '.join(missing)} (it holds {', '.join(sorted(stored))}); "
                "choose pretext tasks it has (`pretext`) or rebuild it with those modalities"
            )
        return stored

    def _read_metadata(self, reader: CorpusReader, split: str | None, tile_ids: Sequence[str] | None) -> None:
        """Per-tile metadata the stream needs (place, date, level), the eligible tiles and presence."""
        self.meta = {
            "lat": reader.column("lat"),
            "lon": reader.column("lon"),
            "s2_date": reader.column("s2_date"),
            "level": (reader.column("s2_product") == "L2A").astype(np.int64),
        }
        try:
            eligible = reader.eligible(split, tile_ids)
        except StoreError as err:
            raise DataError(f"{err}; was the list made from this corpus's catalog?") from None
        if not eligible.any():
            raise DataError(
                f"no complete tile of split {split!r} in {self.url}; build or finish the store first"
            )
        self.eligible = eligible
        read = [m.name for m in self.modalities if m.stored] + (
            ["sentinel2_masks"] if self.cloud_mask else []
        )
        self.present = {name: reader.column(f"{name}_present").astype(bool) for name in dict.fromkeys(read)}

    def _cache_tile_modalities(self, reader: CorpusReader, verify: bool) -> None:
        """Tile-level modalities are small: read once (a chunk each per unit would cost as much as the
        images); with ``verify``, tiles that hold one but read back as no-data stop the run."""
        self._tile_cache = {
            m.name: reader.column(m.name) for m in self.modalities if m.stored and m.kind == "tile"
        }
        for name, vals in self._tile_cache.items() if verify else ():
            m = get(name)
            fill = m.is_fill(vals).reshape(len(vals), -1).all(1)
            lost = np.flatnonzero(fill & self.present[name] & self.eligible)
            if len(lost):
                url = self.url
                raise DataError(
                    f"{url}: array {name!r}, tiles {', '.join(map(str, lost[:6]))} read back as no-data "
                    f"although they hold {name} (a deleted shard file?); run `mmearth validate --store {url} "
                    f"--deep` and `mmearth repair --store {url}`"
                )

    # --- geometry of the stream ------------------------------------------------------------------------
    @property
    def n_eligible(self) -> int:
        return int(self.eligible.sum())

    def parts(self) -> tuple[int, int]:
        """(this part, number of parts) from the DDP rank and the DataLoader worker."""
        rank, world = self._rank, self._world
        if rank is None or world is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            else:
                rank, world = 0, 1
        wid, nw = self._worker()
        return rank * nw + wid, world * nw

    def _worker(self) -> tuple[int, int]:
        """(role, workers) of this DataLoader worker. A resumed DataLoader asks its workers in turn from
        worker 0 again, so roles rotate by ``start_batches`` to continue the original sequence."""
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.start_batches) % info.num_workers, info.num_workers

    def units(self, n_parts: int) -> list[tuple[int, int]]:
        """Contiguous, chunk-aligned tile ranges holding eligible tiles: one shard, or fewer chunks when
        that leaves fewer than four units per part."""
        span = self.shard_tiles
        while span > self.chunk_tiles and math.ceil(self.n_tiles / span) < 4 * n_parts:
            span = max(self.chunk_tiles, (span // 2) // self.chunk_tiles * self.chunk_tiles)
        out = []
        for s0 in range(0, self.n_tiles, span):
            s1 = min(s0 + span, self.n_tiles)
            if self.eligible[s0:s1].any():
                out.append((s0, s1))
        return out

    def plan(self, epoch: int, part: int, n_parts: int) -> list[tuple[list[tuple[int, int]], np.ndarray]]:
        """This part's epoch as windows: (units to read, tile indices in yield order)."""
        units = self.units(n_parts)
        order = np.random.default_rng([self.seed, epoch, 7]).permutation(len(units))
        mine = [units[i] for i in order[part::n_parts]]
        windows, cur, count = [], [], 0
        for u in mine:
            cur.append(u)
            count += int(self.eligible[u[0] : u[1]].sum())
            if count >= self.shuffle_buffer:
                windows.append(cur)
                cur, count = [], 0
        if cur:
            windows.append(cur)
        out = []
        for w, us in enumerate(windows):
            idx = np.concatenate([np.flatnonzero(self.eligible[a:b]) + a for a, b in us])
            rng = np.random.default_rng([self.seed, epoch, part, n_parts, w])
            out.append((us, idx[rng.permutation(len(idx))]))
        return out

    def sample_keys(self) -> list[str]:
        keys = [m.name for m in self.modalities] + (["cloud"] if self.cloud_mask else []) + ["index"]
        return keys + (["level"] if self.raw else [])

    # --- reading -------------------------------------------------------------------------------------
    def _read_unit(self, s0: int, s1: int, epoch: int = 0) -> dict[str, np.ndarray]:
        """All modalities of tiles s0:s1 for ``epoch``, cropped, normalised / mapped, as numpy (tile axis
        first). Pixel modalities are cropped (and Sentinel-2's model bands picked) on the stored integers,
        before anything is converted to float."""
        if self._reader is None:  # in the DataLoader worker: s3fs and other async filesystems do not fork
            self._reader = CorpusReader(self.url)
        idx = np.arange(s0, s1)
        crops = [self._crop(t, epoch) for t in range(s0, s1)]
        out: dict[str, np.ndarray] = {}
        for m in self.modalities:
            if not m.stored:
                out[m.name] = derived_values(m, self.meta, idx)
                continue
            raw = (
                self._tile_cache[m.name][s0:s1]
                if m.name in self._tile_cache
                else self._read_array(m.name, s0, s1)
            )
            absent = ~self.present[m.name][s0:s1]
            if self._verify and m.name not in self._tile_cache and not absent.all():
                self._check_shard(m.name, s0)
            if m.kind == "pixel":
                raw = self._cropped(raw, crops, _model_bands(m))
            elif m.model_bands is not None:
                raw = raw[:, m.model_band_index]
            if m.categorical:
                vals = self.lut[m.name][raw]
                if m.kind == "pixel":
                    vals = vals[:, 0]  # one band: (tile, y, x)
                if absent.any():
                    vals[absent] = -1
                out[m.name] = vals
                continue
            if self.raw:  # stored dtype; absent tiles hold pure fill (the store's contract)
                out[m.name] = raw
                continue
            level = self.meta["level"][s0:s1] if m.name == "sentinel2" else None
            x = self.norm[m.name].apply(raw, level, _model_bands(m))
            if not np.issubdtype(raw.dtype, np.floating):  # a float fill (NaN) stays NaN by itself
                x[m.is_fill(raw)] = np.nan
            if absent.any():
                x[absent] = np.nan
            out[m.name] = x
        if self.cloud_mask:
            raw = self._read_array("sentinel2_masks", s0, s1)
            if self._verify and self.present["sentinel2_masks"][s0:s1].any():
                self._check_shard("sentinel2_masks", s0)
            out["cloud"] = opaque_cloud(self._cropped(raw, crops, None))
        if self.raw:
            out["level"] = self.meta["level"][s0:s1]
        return out

    def _cropped(self, raw: np.ndarray, crops: list[tuple[int, int]], bands: np.ndarray | None) -> np.ndarray:
        """The ``img_size`` crop of each tile of ``raw`` (tile, band, y, x) at its offsets, optionally
        only ``bands``: one contiguous array in the stored dtype."""
        S = self.img_size
        n_bands = raw.shape[1] if bands is None else len(bands)
        out = np.empty((raw.shape[0], n_bands, S, S), raw.dtype)
        for i, (y, x) in enumerate(crops):
            tile = raw[i, :, y : y + S, x : x + S]
            out[i] = tile if bands is None else tile[bands]
        return out

    def _check_shard(self, name: str, s0: int) -> None:
        """Raise :class:`DataError` when the shard file of ``name`` holding tile ``s0`` is missing."""
        key = self._reader.missing_shard_file(name, s0)
        if key is not None:
            raise DataError(
                f"{self.url}: array {name!r}, tiles {s0}.. : its shard file {key} is missing although "
                "those tiles hold data (deleted, or the store changed while training); run `mmearth "
                f"validate --store {self.url} --deep` to list the damaged tiles and `mmearth repair --store "
                f"{self.url}` to re-export them"
            )

    def _read_array(self, name: str, s0: int, s1: int) -> np.ndarray:
        try:
            return self._reader.read([name], s0, s1)[name]
        except StoreError as err:  # a damaged chunk: checksum mismatch, truncated, undecodable
            raise DataError(str(err)) from err

    def _crop(self, tile: int, epoch: int) -> tuple[int, int]:
        """Crop offset of ``tile`` in ``epoch``: a hash of (seed, epoch, tile), so any sample can be
        regenerated on its own (resume) without a random generator per sample."""
        span = self.tile_size - self.img_size
        if span == 0:
            return 0, 0
        if not self.random_crop:
            return span // 2, span // 2
        h = _mix64((self.seed * 1_000_003 + epoch) * 2_654_435_761 + int(tile))
        return int(h % (span + 1)), int((h >> 32) % (span + 1))

    def skip_count(self) -> int:
        """Samples this part skips: ``start``, plus its share of the ``start_batches`` batches already
        drawn from a DataLoader whose workers hand out batches in turn (role ``w`` made batches ``w``,
        ``w + W``, ...)."""
        wid, nw = self._worker()
        mine = max(0, -(-(self.start_batches - wid) // nw))
        return self.start + mine * self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        part, n_parts = self.parts()
        skip = self.skip_count()
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            plan = self.plan(epoch, part, n_parts)
            n_epoch = sum(len(idx) for _, idx in plan)
            if n_epoch == 0:
                return  # more parts than units: this part has nothing to do
            if skip >= n_epoch:
                skip -= n_epoch
                epoch += 1
                continue
            for units, order in plan:
                if skip >= len(order):
                    skip -= len(order)
                    continue
                data = {}
                where = {}
                for a, b in units:
                    d = self._read_unit(a, b, epoch)
                    for t in range(a, b):
                        where[t] = (len(data), t - a)
                    data[len(data)] = d
                for tile in order[skip:]:
                    u, k = where[int(tile)]
                    yield self._sample(data[u], k, int(tile))
                skip = 0
            epoch += 1

    def _sample(self, d: dict[str, np.ndarray], k: int, tile: int) -> dict[str, torch.Tensor]:
        """Sample ``k`` of a unit read by :meth:`_read_unit` (already cropped: contiguous views)."""
        out = {m.name: torch.from_numpy(np.asarray(d[m.name][k])) for m in self.modalities}
        if self.cloud_mask:
            out["cloud"] = torch.from_numpy(d["cloud"][k])
        out["index"] = torch.tensor(tile, dtype=torch.int64)
        if self.raw:
            out["level"] = torch.tensor(int(d["level"][k]), dtype=torch.int64)
        return out


class BatchNormaliser:
    """The loader's normalisation, applied to a batch of a ``raw=True`` stream wherever the batch lives
    (on the GPU, after a copy of the stored integers: half the bytes of float32 through the workers'
    shared memory and the host-to-device copy, and no float work on the CPU). Gives the values the
    loader gives with ``raw=False``: no-data and absent tiles NaN, per-band z-scores (Sentinel-2 per
    processing level, from the batch's ``level``)."""

    def __init__(self, ds: StreamingCorpus):
        self.items = []
        for m in ds.modalities:
            if not m.stored or m.categorical or m.name == "sentinel2_masks":
                continue
            scale, shift = ds.norm[m.name].scale_shift(_model_bands(m))
            scale, shift = torch.from_numpy(scale), torch.from_numpy(shift)
            nan_fill = m.nan_fill
            self.items.append((m.name, m.kind == "pixel", scale, shift, None if nan_fill else m.fill))
        self._devices: dict[str, list] = {}

    def _on(self, device: torch.device) -> list:
        """The statistics on ``device``, copied there once."""
        key = str(device)
        if key not in self._devices:
            self._devices[key] = [(n, p, sc.to(device), sh.to(device), f) for n, p, sc, sh, f in self.items]
        return self._devices[key]

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch)
        for name, pixel, scale, shift, fill in self._on(batch["sentinel2"].device):
            x = batch[name]
            if scale.ndim == 2:  # per processing level: one row per sample
                level = batch["level"].to(x.device)
                scale, shift = scale[level], shift[level]
            else:
                scale, shift = scale[None], shift[None]
            if pixel:
                scale, shift = scale[..., None, None], shift[..., None, None]
            y = x.float() * scale + shift
            if fill is not None:
                y = y.masked_fill(x == fill, float("nan"))
            out[name] = y
        return out


def make_loader(ds: StreamingCorpus, batch_size: int, workers: int = 0, **kw) -> DataLoader:
    """A DataLoader over ``ds``. Workers start from a fork server (``multiprocessing_context`` may say
    otherwise): a plain fork copies whatever the parent holds, and a parent that has run Prefect (the
    demo, a flow, the tests) makes forked children exit through Prefect's after-fork handlers; a fork
    server is a clean parent everywhere, at the cost of a second or two when the workers start."""
    if workers > 0:
        kw.setdefault("multiprocessing_context", "forkserver")
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, **kw)
