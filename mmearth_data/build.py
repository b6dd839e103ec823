"""Plain functions behind the corpus build: check the request, plan, export one shard, finish.

Data flow: :class:`BuildConfig` -> :func:`prepare` (checks, sample plan, store created or resumed,
plan artifacts) -> :func:`export_shard` per incomplete shard (source -> store) -> :func:`finish`
(statistics, summary). ``flows/build_corpus.py`` wraps these as Prefect tasks; tests call them
directly.

Artifacts beside the store, in ``<store without .zarr>.build/``: ``plan.parquet`` (the GeoParquet of
planned tiles and alternates), ``sample_map.png``, ``strata.png`` and ``failures.json``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib.metadata import version
from typing import Any

import fsspec
import geopandas as gpd
import numpy as np

from mmearth_data import registry
from mmearth_data.artifacts import (
    build_dir,
    load_metadata_copy,
    restore_metadata,
    save_metadata_copy,
    write_whole,
)
from mmearth_data.crash import crash_point
from mmearth_data.grid import DEFAULT_TILE_SIZE, GridError, check_tile_size
from mmearth_data.sampling import DEFAULT_YEARS, SampleConfig, SamplingError, sample_plan
from mmearth_data.sources import (
    SourceError,
    TileFailure,
    TileRequest,
    make_source,
    source_version,
    source_years,
)
from mmearth_data.store import (
    StoreWriter,
    _exists,
    check_compression,
    config_hash,
    create_store,
    payload_problem,
    read_attrs,
    resize_tiles,
    shard_count,
    tile_rows,
    update_attrs,
)
from mmearth_data.world import World

log = logging.getLogger(__name__)
DEFAULT_MODALITIES = tuple(m.name for m in registry.MODALITIES if m.stored)


class BuildInputError(ValueError):
    """A build request that cannot be carried out as given; the message names the fix."""


class OtherBuildError(BuildInputError):
    """The store path holds a corpus store built with another configuration or source version."""


@dataclass(frozen=True)
class BuildConfig:
    store: str
    n_tiles: int
    source: str = "offline"
    seed: int = 0
    tile_size: int = DEFAULT_TILE_SIZE
    years: tuple[int, ...] = DEFAULT_YEARS
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    reserve: int = 2
    chunk_tiles: int = 0  # 0: 16, or the largest power of two dividing the shard size below that
    shard_tiles: int = 0  # 0: chosen from n_tiles (64 .. 1024 tiles, at most ~1000 shards)
    compression: str = "compact"  # or "portable": core Zarr v3 codecs only (see store.py)
    source_options: dict[str, Any] = field(default_factory=dict, hash=False)
    # grow a complete store to n_tiles (new tiles drawn in ``years``) without rewriting its full shards
    extend: bool = False

    def resolved_shard_tiles(self) -> int:
        if self.shard_tiles:
            return self.shard_tiles
        want = max(64, 2 ** math.ceil(math.log2(max(self.n_tiles, 1) / 1000))) if self.n_tiles > 0 else 64
        return int(min(1024, want))

    def resolved_chunk_tiles(self) -> int:
        """Tiles per chunk: 16 by default (fewer, larger chunks: zarr-python's cost per chunk is as high
        as decoding a small pixel array's tiles; the loader reads whole shards anyway)."""
        if self.chunk_tiles:
            return self.chunk_tiles
        return math.gcd(16, self.resolved_shard_tiles())

    def identity(self) -> dict[str, Any]:
        """What must match for a re-run to resume this store (credentials and paths excluded)."""
        from mmearth_data.store import SCHEMA_VERSION

        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "source_version": source_version(self.source),
            "n_tiles": self.n_tiles,
            "seed": self.seed,
            "tile_size": self.tile_size,
            "years": list(self.years),
            "modalities": list(self.modalities),
            "reserve": self.reserve,
            "chunk_tiles": self.resolved_chunk_tiles(),
            "shard_tiles": self.resolved_shard_tiles(),
            "compression": self.compression,
        }


def check_config(cfg: BuildConfig) -> None:
    """Raise :class:`BuildInputError` naming the problem; touches nothing."""
    if not isinstance(cfg.n_tiles, int) or cfg.n_tiles <= 0:
        raise BuildInputError(f"`n_tiles` must be a positive number of tiles, got {cfg.n_tiles}")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise BuildInputError(f"`seed` must be a non-negative integer, got {cfg.seed}")
    if not isinstance(cfg.reserve, int) or cfg.reserve < 0:
        raise BuildInputError(f"`reserve` must be a non-negative integer, got {cfg.reserve}")
    try:
        check_tile_size(cfg.tile_size)
    except GridError as err:
        raise BuildInputError(str(err)) from None
    try:
        years_ok = source_years(cfg.source)
    except SourceError as err:
        raise BuildInputError(str(err)) from None
    bad = [y for y in cfg.years if y not in years_ok]
    if not cfg.years or bad:
        raise BuildInputError(
            f"years {bad or '(none)'} are outside what the {cfg.source} source covers "
            f"({years_ok.start}-{years_ok.stop - 1}); pick `years` within that range, e.g. 2017-2020"
        )
    for name in cfg.modalities:
        try:
            m = registry.get(name)
        except registry.RegistryError as err:
            raise BuildInputError(str(err.args[0])) from None
        if not m.stored:
            raise BuildInputError(f"modality {name!r} is derived from tile metadata and is not exported")
    if "sentinel2" not in cfg.modalities:
        raise BuildInputError("sentinel2 must be among `modalities`: its scene defines every tile")
    try:  # source-specific checks (project, credentials, request size); no network
        source = make_source(cfg.source, seed=cfg.seed, **cfg.source_options)
        check = getattr(source, "check", None)
        if check is not None:
            check(cfg.tile_size, registry.stored_modalities(cfg.modalities))
    except SourceError as err:
        raise BuildInputError(str(err)) from None
    try:
        check_compression(cfg.compression)
    except ValueError as err:
        raise BuildInputError(str(err)) from None
    if cfg.chunk_tiles < 0 or cfg.resolved_shard_tiles() % cfg.resolved_chunk_tiles():
        raise BuildInputError(
            f"shard size {cfg.resolved_shard_tiles()} must be a positive multiple of the chunk size "
            f"{cfg.resolved_chunk_tiles()} (`shard_tiles`, `chunk_tiles`)"
        )


@dataclass
class Prepared:
    config: BuildConfig
    shards: list[int]  # shards still to export
    n_shards: int
    candidates: ShardCandidates  # shard -> slot -> candidate rows by rank (made when asked)
    resumed: bool
    plan_path: str


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [float(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def check_store_path(cfg: BuildConfig) -> bool:
    """Raise :class:`BuildInputError` when ``cfg.store`` holds anything but this build's own corpus;
    returns True when it holds this build's corpus (a resume). Reads only (a local path's nearest
    existing folder gets a probe file, removed at once, to learn whether it can be written)."""
    try:
        local = _local_path(cfg.store)
    except (ImportError, ValueError) as err:
        raise BuildInputError(
            f"`store` {cfg.store}: {err}; install the filesystem's package into the environment or choose a "
            "local path (nothing was changed)"
        ) from None
    if local is not None:
        _check_writable(local)
    else:
        _check_reachable(cfg.store)
    exists, is_group = _exists(cfg.store)
    if exists and not is_group:
        raise BuildInputError(
            f"{cfg.store} already holds something that is not a corpus store; choose another `store` path "
            "(nothing was changed)"
        )
    if not is_group:
        if cfg.extend:
            raise BuildInputError(
                f"`extend`: there is no corpus store at {cfg.store} to extend; drop `extend` to build one "
                "(nothing was changed)"
            )
        return False
    from mmearth_data.store import CorpusReader, StoreError

    try:
        attrs = read_attrs(cfg.store)
    except StoreError as err:  # a damaged zarr.json
        raise BuildInputError(str(err)) from None
    if "schema_version" not in attrs:
        raise BuildInputError(
            f"{cfg.store} is a zarr group but not a corpus store; "
            "choose another `store` (nothing was changed)"
        )
    ident = cfg.identity()
    if cfg.extend:
        extension_identity(cfg, attrs.get("build", {}).get("config", {}))  # raises when it cannot extend
    elif attrs.get("build", {}).get("config_hash") != config_hash(ident):
        old = attrs.get("build", {}).get("config", {})
        diff = {k: (old.get(k), v) for k, v in ident.items() if old.get(k) != v}
        raise OtherBuildError(
            f"{cfg.store} holds a corpus built with another configuration (stored vs asked: {diff}); "
            "re-run with the same options to resume it, or choose another `store` (nothing was changed)"
        )
    try:
        CorpusReader(cfg.store)  # every array's metadata readable
    except StoreError as err:
        raise BuildInputError(str(err)) from None
    return True


EXTENSIBLE = ("n_tiles", "years", "modalities")  # what an extension may change; the rest stays as built


def added_modalities(cfg: BuildConfig, stored: dict[str, Any]) -> list[str]:
    """The modalities an ``--extend`` request adds to the stored ones (in the order asked); raises
    :class:`BuildInputError` when it would drop some."""
    have = list(stored["modalities"])
    dropped = [m for m in have if m not in cfg.modalities]
    if dropped:
        wanted = ",".join(have + [m for m in cfg.modalities if m not in have])
        raise BuildInputError(
            f"`extend` `modalities` leaves out {', '.join(dropped)}, which {cfg.store} holds; an extension "
            f"only adds modalities (give `modalities` {wanted}), and `mmearth derive --modalities` makes a "
            "copy without some (nothing was changed)"
        )
    return [m for m in cfg.modalities if m not in have]


def extension_identity(cfg: BuildConfig, stored: dict[str, Any]) -> dict[str, Any]:
    """The store identity after ``cfg`` (an ``--extend`` request) extends a store built with the
    ``stored`` configuration: ``n_tiles`` the new total, ``years`` the union, ``modalities`` the
    stored ones followed by those added. Raises :class:`BuildInputError` naming the fix when the
    request cannot extend that store."""
    ident = cfg.identity()
    auto = {k for k in ("shard_tiles", "chunk_tiles") if getattr(cfg, k) == 0}  # kept as stored
    diff = {
        k: (stored.get(k), v)
        for k, v in ident.items()
        if k not in EXTENSIBLE and k not in auto and stored.get(k) != v
    }
    if diff:
        raise OtherBuildError(
            f"`extend`: {cfg.store} was built with other options (stored vs asked: {diff}); an extension "
            "keeps every option of the build but `n_tiles` and `years`, so repeat those options "
            "(nothing was changed)"
        )
    have = int(stored["n_tiles"])
    if cfg.n_tiles < have:
        raise BuildInputError(
            f"`extend` `n_tiles` {cfg.n_tiles}: {cfg.store} holds {have} tiles already; `n_tiles` is the "
            f"store's size after extending, e.g. `n_tiles` {2 * have} (nothing was changed)"
        )
    years = sorted(set(stored["years"]) | set(cfg.years))
    if cfg.n_tiles == have and len(years) > len(stored["years"]):
        raise BuildInputError(
            f"`extend` `years` adds {sorted(set(years) - set(stored['years']))}, but `n_tiles` {cfg.n_tiles} "
            f"adds no tiles to hold them; give `n_tiles` the size after extending, e.g. `n_tiles` "
            f"{have + have // len(stored['years'])} (nothing was changed)"
        )
    added = added_modalities(cfg, stored)
    if added and cfg.n_tiles != have:
        raise BuildInputError(
            f"`extend` adds modalities ({', '.join(added)}) and tiles ({have} -> {cfg.n_tiles}) at once; "
            f"add the modalities with `n_tiles` {have} first, then the tiles (nothing was changed)"
        )
    if added and len(years) > len(stored["years"]):
        raise BuildInputError(
            "`extend` adds modalities to the stored tiles, whose years do not change; give the stored "
            f"`years` {','.join(map(str, stored['years']))} (nothing was changed)"
        )
    return stored | {"n_tiles": cfg.n_tiles, "years": years, "modalities": list(stored["modalities"]) + added}


def _local_path(store: str) -> str | None:
    """The local filesystem path of ``store``, or None when it lives on another filesystem."""
    fs, path = fsspec.core.url_to_fs(store)
    return path if "file" in fs.protocol else None


def _check_reachable(url: str) -> None:
    """Raise :class:`BuildInputError` when the object store behind ``url`` cannot be listed: no
    credentials, an endpoint that does not answer, access denied, or no such bucket."""
    fs, path = fsspec.core.url_to_fs(url)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}:
        return  # no buckets (memory://, ssh://, ...): the first write tells
    bucket = path.strip("/").split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except Exception as err:  # botocore / gcsfs / adlfs errors: credentials, endpoint, permissions
        raise BuildInputError(
            f"`store` {url}: the object store cannot be reached ({type(err).__name__}: {str(err)[:200]}); "
            "check the credentials (for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), "
            "the endpoint (AWS_ENDPOINT_URL_S3 for S3-compatible stores) and the network "
            "(nothing was changed)"
        ) from None
    if not found:
        raise BuildInputError(
            f"`store` {url}: bucket {bucket!r} cannot be found: it does not exist, these credentials do "
            "not see it, or the endpoint does not answer (AWS_ENDPOINT_URL_S3 for S3-compatible stores); "
            "create it first or choose another `store` (nothing was changed)"
        )


def _check_writable(path: str) -> None:
    """Raise :class:`BuildInputError` when nothing can be written at or under local ``path``."""
    import os
    import tempfile

    anc = os.path.abspath(path)
    while not os.path.exists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise BuildInputError(
            f"`store` {path}: {anc} is a file, not a folder; choose another `store` (nothing was changed)"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=anc, prefix=".mmearth-write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise BuildInputError(
            f"`store` {path}: cannot write under {anc} ({err.strerror or err}); choose a `store` on a "
            "writable disk (nothing was changed)"
        ) from None


def check_request(cfg: BuildConfig) -> bool:
    """All checks of a build request, before anything is written; True when it resumes a store."""
    check_config(cfg)
    return check_store_path(cfg)


_LOCKS: dict[str, Any] = {}  # store path -> open lock file held by this process


def acquire_build_lock(store: str) -> None:
    """Hold ``<store>.build/lock`` (an exclusive ``flock``) for the rest of this process, so that a
    second build of the same store, in another process, stops with a message instead of racing this
    one. Re-entrant within the process; released by the OS when the process ends, however it ends.
    Local stores only (object stores have no such lock)."""
    import fcntl
    import os

    local = _local_path(store)
    if local is None:
        log.warning("no build lock on %s: another build of the same store would not be stopped", store)
        return
    lock_dir = build_dir(local)
    path = os.path.join(lock_dir, "lock")
    if path in _LOCKS:
        return
    os.makedirs(lock_dir, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115  (held open for the life of the process)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise BuildInputError(
            f"another build ({holder}) is writing {store}; wait for it to finish or stop it, then re-run "
            "this command to resume (nothing was changed)"
        ) from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}")
    f.flush()
    _LOCKS[path] = f


def prepare(cfg: BuildConfig, world: World | None = None) -> Prepared:
    """Check the request, take the store's build lock, plan the sample, create or resume the store,
    write the plan artifacts."""
    resumed = check_request(cfg)
    acquire_build_lock(cfg.store)
    if cfg.extend or (resumed and _history(cfg.store)[1]):
        return _prepare_extension(cfg, world)
    ident = cfg.identity()
    chash = config_hash(ident)
    source = make_source(cfg.source, seed=cfg.seed, **cfg.source_options)
    labeler = plan_labeler(cfg, source)
    try:
        sc = SampleConfig(cfg.n_tiles, tuple(cfg.years), cfg.seed, cfg.tile_size, cfg.reserve)
        if hasattr(source, "sample_plan"):  # a source that holds only some places plans inside them
            plan = source.sample_plan(sc, world)
        else:
            plan = sample_plan(sc, world, labeler)
    except SamplingError as err:
        raise BuildInputError(str(err)) from None
    except SourceError as err:  # labelling the candidates failed; nothing was written
        raise BuildInputError(str(err)) from None
    if labeler is not None:
        labeler.save()
    shard_tiles = cfg.resolved_shard_tiles()
    mods = registry.stored_modalities(cfg.modalities)
    if not resumed:
        target, staged = _staging_path(cfg.store)
        create_store(
            staged,
            n_tiles=cfg.n_tiles,
            tile_size=cfg.tile_size,
            modalities=mods,
            chunk_tiles=cfg.resolved_chunk_tiles(),
            shard_tiles=shard_tiles,
            compression=cfg.compression,
            attrs={
                "build": {
                    "config": ident,
                    "config_hash": chash,
                    "source": source.describe(),
                    "plan_labels": plan.attrs.get("labels"),
                    "versions": {p: version(p) for p in ("mmearth-corpus", "numpy", "zarr", "xarray")},
                },
                "grid": {
                    "spacing_m": int(plan.attrs["grid_spacing_m"]),
                    "layout": "Major TOM-like rows/cols",
                },
                "history": [
                    _history_entry("create", cfg, ident, source, (0, cfg.n_tiles), cfg.seed, "plan.parquet")
                ],
            },
        )
        save_metadata_copy(cfg.store, staged)
        crash_point("created")
        if staged != target:
            import os

            os.rename(staged, target)  # the store appears whole, or not at all
    elif load_metadata_copy(cfg.store) is None:  # a store made before the copy was kept
        save_metadata_copy(cfg.store)
    writer = StoreWriter(cfg.store)
    todo = writer.incomplete_shards()
    cand = ShardCandidates(writer, todo, plan, keep_complete=False)
    out = build_dir(cfg.store)
    plan_path = f"{out}/plan.parquet"
    fs, path = fsspec.core.url_to_fs(plan_path)
    if not fs.exists(path):
        fs.makedirs(fs._parent(path), exist_ok=True)
        buf = io.BytesIO()
        plan.to_parquet(buf)
        write_whole(fs, path, buf.getvalue())
        crash_point("plan")
    if not all(fs.exists(f"{fs._parent(path)}/{n}") for n in PLOTS):  # also after a kill between the two
        _write_plots(plan, out)
    return Prepared(cfg, todo, shard_count(cfg.n_tiles, shard_tiles), cand, resumed, plan_path)


PLAN_COLUMNS = ["tile_id", "lat", "lon", "epsg", "transform", "biome", "ecoregion", "year", "split", "rank"]


class ShardCandidates(Mapping):
    """shard -> slot -> the plan's candidate rows by rank, for the shards still to export, made when a
    shard is asked for (a plan of MMEarth's 1.2M tiles holds 3.6M candidates: building every row at
    once would hold them all in memory); with ``keep_complete`` a slot whose tile is complete already
    gets none (the shard writer keeps that tile as it is)."""

    def __init__(self, writer: StoreWriter, shards: list[int], plan: gpd.GeoDataFrame, keep_complete: bool):
        self.writer, self.shards, self.keep_complete = writer, list(shards), keep_complete
        order = np.lexsort((plan["rank"].to_numpy(), plan["slot"].to_numpy()))
        self.table = plan.iloc[order][PLAN_COLUMNS + ["slot"]].reset_index(drop=True)
        self.slots = self.table["slot"].to_numpy()

    def __getitem__(self, shard: int) -> list[list[dict[str, Any]]]:
        if shard not in self.shards:
            raise KeyError(shard)
        s0, s1 = self.writer.shard_range(shard)
        a, b = np.searchsorted(self.slots, [s0, s1])
        rows = self.table.iloc[a:b].to_dict("records")
        done = np.zeros(s1 - s0, bool)
        if self.keep_complete:
            done = self.writer.complete(s0, s1, own=True)
        out: list[list[dict[str, Any]]] = [[] for _ in range(s1 - s0)]
        for r in rows:
            i = int(r.pop("slot")) - s0
            if not done[i]:
                out[i].append({c: _plain(v) for c, v in r.items()})
        return out

    def __iter__(self):
        return iter(self.shards)

    def __len__(self) -> int:
        return len(self.shards)


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def _history_entry(
    action: str,
    cfg: BuildConfig,
    ident: dict[str, Any],
    source: Any,
    tiles: tuple[int, int],
    sample_seed: int,
    plan: str,
) -> dict[str, Any]:
    """One build in the store's ``history`` attribute: what it added (store indices ``tiles``, its
    years and sample seed, its plan file in the build folder), the configuration after it, the source
    and the software version, when it started and finished (None while it runs)."""
    return {
        "action": action,
        "tiles": list(tiles),
        "added": tiles[1] - tiles[0],
        "years": sorted(cfg.years),
        "sample_seed": sample_seed,
        "plan": plan,
        "config": ident,
        "source": source.describe(),
        "version": version("mmearth-corpus"),
        "started": _now(),
        "finished": None,
    }


def _history(store: str) -> tuple[list[dict[str, Any]], bool]:
    """(the store's build history, whether any entry extends it)."""
    hist = list(read_attrs(store).get("history") or [])
    return hist, any(h.get("action") in ("extend", "add-modalities") for h in hist)


def _read_plan(out: str, name: str) -> gpd.GeoDataFrame:
    fs, path = fsspec.core.url_to_fs(f"{out}/{name}")
    return gpd.read_parquet(io.BytesIO(fs.cat_file(path)))


def extension_seed(seed: int, k: int) -> int:
    """Sample seed of a store's ``k``-th extension (a function of the build seed)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:extend:{k}".encode()).digest()[:8], "little") % 2**63


def _prepare_extension(cfg: BuildConfig, world: World | None) -> Prepared:
    """Grow the store to ``cfg.n_tiles`` (or resume an extension): plan the new tiles in ``cfg.years``
    away from every grid cell an earlier plan of the store holds, record the extension in the store's
    history, resize every per-tile array (metadata only: no shard file is touched), and hand the
    shards that hold an incomplete tile to the export, each complete tile kept as it is."""
    from dataclasses import replace

    import pandas as pd

    attrs = read_attrs(cfg.store)
    stored = attrs["build"]["config"]
    cfg = replace(cfg, shard_tiles=stored["shard_tiles"], chunk_tiles=stored["chunk_tiles"])
    ident = extension_identity(cfg, stored)
    history = list(attrs.get("history") or [])
    if not history:  # a store made before the history was kept
        history = [{"action": "create", "tiles": [0, stored["n_tiles"]], "added": stored["n_tiles"],
                    "years": stored["years"], "sample_seed": stored["seed"], "plan": "plan.parquet",
                    "config": stored, "source": attrs["build"].get("source"), "version": None,
                    "started": None, "finished": None}]  # fmt: skip
    have = int(stored["n_tiles"])
    out = build_dir(cfg.store)
    source = make_source(cfg.source, seed=cfg.seed, **cfg.source_options)
    last = history[-1]
    added = [m for m in ident["modalities"] if m not in stored["modalities"]]
    if added or (last["action"] == "add-modalities" and last["finished"] is None):
        return _prepare_modality_fill(cfg, attrs, ident, history, source, added)
    pending = last["action"] == "extend" and last["finished"] is None and last["tiles"][1] == cfg.n_tiles
    if cfg.n_tiles > have or (pending and tile_rows(cfg.store) != cfg.n_tiles):
        if not pending:  # a new extension
            k = sum(h["action"] == "extend" for h in history) + 1
            last = _history_entry(
                "extend", cfg, ident, source, (have, cfg.n_tiles), extension_seed(cfg.seed, k),
                f"plan-extend-{k}.parquet",
            )  # fmt: skip
            history.append(last)
        fs, path = fsspec.core.url_to_fs(f"{out}/{last['plan']}")
        if not fs.exists(path):
            taken = pd.concat([_read_plan(out, h["plan"]) for h in history[:-1]])
            exclude = frozenset(zip(taken["row"].tolist(), taken["col"].tolist(), strict=True))
            labeler = plan_labeler(cfg, source)
            n_add = last["tiles"][1] - last["tiles"][0]
            sc = SampleConfig(n_add, tuple(last["years"]), last["sample_seed"], cfg.tile_size, cfg.reserve)
            try:
                planner = getattr(source, "sample_plan", None) or partial(sample_plan, labeler=labeler)
                plan = planner(sc, world, exclude=exclude, first_slot=last["tiles"][0])
            except (SamplingError, SourceError) as err:
                raise BuildInputError(f"`extend`: {err} (nothing was changed)") from None
            if labeler is not None:
                labeler.save()
            buf = io.BytesIO()
            plan.to_parquet(buf)
            write_whole(fs, path, buf.getvalue())
        update_attrs(cfg.store, history=history)  # the intent first: a killed extension resumes from here
        crash_point("extend-planned")
        resize_tiles(cfg.store, cfg.n_tiles)
        update_attrs(
            cfg.store,
            n_tiles=cfg.n_tiles,
            n_shards=shard_count(cfg.n_tiles, cfg.resolved_shard_tiles()),
            build=attrs["build"] | {"config": ident, "config_hash": config_hash(ident)},
        )
        save_metadata_copy(cfg.store)
    plans = pd.concat([_read_plan(out, h["plan"]) for h in history])
    writer = StoreWriter(cfg.store)
    todo = writer.incomplete_shards()
    cand = ShardCandidates(writer, todo, plans, keep_complete=True)
    return Prepared(cfg, todo, writer.n_shards, cand, True, f"{out}/{last['plan']}")


def _prepare_modality_fill(
    cfg: BuildConfig, attrs: dict[str, Any], ident: dict[str, Any], history: list[dict[str, Any]],
    source: Any, added: list[str],
) -> Prepared:  # fmt: skip
    """Add modalities to a complete store's tiles (or resume adding them): record the extension in
    the history, make the modalities' empty arrays (new files only), and hand every shard whose tiles
    lack them to the export, each tile's request pinned to the Sentinel-2 scene it was built from."""
    from dataclasses import replace

    import pandas as pd

    from mmearth_data.store import add_modalities

    have = int(attrs["n_tiles"])
    if added:  # a new request (a resumed one finds its modalities in the store's list already)
        missing = have - int(StoreWriter(cfg.store).complete().sum())
        if missing:
            raise BuildInputError(
                f"`extend` `modalities`: {cfg.store} has {missing} incomplete tiles; finish the build "
                "first (the same command without the new modalities resumes it), then add modalities "
                "(nothing was changed)"
            )
        entry = _history_entry("add-modalities", cfg, ident, source, (0, have), cfg.seed, "plan.parquet")
        history.append(entry | {"added": 0, "modalities": added})
        update_attrs(cfg.store, history=history)  # the intent first: a killed extension resumes from here
        crash_point("extend-planned")
    names = list(history[-1]["modalities"])
    add_modalities(cfg.store, registry.stored_modalities(names))
    update_attrs(cfg.store, build=dict(attrs["build"]) | {"config": ident, "config_hash": config_hash(ident)})
    save_metadata_copy(cfg.store)
    crash_point("modalities-added")
    cfg = replace(cfg, modalities=tuple(ident["modalities"]))
    out = build_dir(cfg.store)
    plans = pd.concat([_read_plan(out, h["plan"]) for h in history if h["action"] != "add-modalities"])
    writer = StoreWriter(cfg.store)
    todo = writer.incomplete_shards()
    cand = FillCandidates(writer, todo, plans, names)
    return Prepared(cfg, todo, writer.n_shards, cand, True, f"{out}/plan.parquet")


class FillCandidates(Mapping):
    """shard -> slot -> [the stored tile's request row, pinned to its scene, with ``fill``: the added
    modalities to fetch] for every complete tile that lacks them (no row: nothing to do there)."""

    def __init__(self, writer: StoreWriter, shards: list[int], plans: Any, names: list[str]):
        self.writer, self.shards, self.names = writer, list(shards), list(names)
        self.labels = plans.drop_duplicates("tile_id").set_index("tile_id")[["biome", "ecoregion"]]

    def __getitem__(self, shard: int) -> list[list[dict[str, Any]]]:
        from mmearth_data.store import CorpusReader

        if shard not in self.shards:
            raise KeyError(shard)
        s0, s1 = self.writer.shard_range(shard)
        todo = self.writer.complete(s0, s1, own=True) & ~self.writer.complete(s0, s1)
        meta = CorpusReader(self.writer.url).tiles(s0, s1)
        out: list[list[dict[str, Any]]] = [[] for _ in range(s1 - s0)]
        for i in np.flatnonzero(todo):
            r = meta.iloc[i]
            lab = self.labels.loc[r["tile_id"]]
            row = {c: _plain(r[c]) for c in ("tile_id", "lat", "lon", "epsg", "year", "split", "s2_product")}
            out[i].append(row | {
                "transform": _plain(np.asarray(r["transform"])), "biome": int(lab["biome"]),
                "ecoregion": int(lab["ecoregion"]), "s2_id": r.get("s2_id") or None,
                "s2_date": str(r["s2_date"])[:10], "fill": self.names,
            })  # fmt: skip
        return out

    def __iter__(self):
        return iter(self.shards)

    def __len__(self) -> int:
        return len(self.shards)


class CachedLabeler:
    """A source's ``label_locations`` (e.g. RESOLVE biomes from Earth Engine) behind a cache kept
    beside the store (``labels.parquet``: lat, lon, biome, ecoregion, distance_m; biome -1: no label
    within reach), so that a resumed build plans the same tiles without asking again."""

    def __init__(self, label: Callable[[np.ndarray, np.ndarray], np.ndarray], path: str):
        self.label, self.path = label, path
        self.known: dict[tuple[float, float], tuple[float, float, float]] = {}
        self.asked = 0
        fs, p = fsspec.core.url_to_fs(path)
        if fs.exists(p):
            import pandas as pd

            df = pd.read_parquet(io.BytesIO(fs.cat_file(p)))
            for r in df.itertuples(index=False):
                self.known[(r.lat, r.lon)] = (r.biome, r.ecoregion, r.distance_m)

    def __call__(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        keys = [(round(float(a), 6), round(float(b), 6)) for a, b in zip(lat, lon, strict=True)]
        todo = sorted({k for k in keys if k not in self.known})
        if todo:
            got = self.label(np.array([k[0] for k in todo]), np.array([k[1] for k in todo]))
            self.asked += len(todo)
            for k, row in zip(todo, got, strict=True):
                self.known[k] = tuple(float(x) for x in row)
        return np.array([self.known[k] for k in keys], float).reshape(len(keys), 3)

    def save(self) -> None:
        import pandas as pd

        rows = [(k[0], k[1], *v) for k, v in sorted(self.known.items())]
        df = pd.DataFrame(rows, columns=["lat", "lon", "biome", "ecoregion", "distance_m"])
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        fs, p = fsspec.core.url_to_fs(self.path)
        fs.makedirs(fs._parent(p), exist_ok=True)
        fs.pipe_file(p, buf.getvalue())


def plan_labeler(cfg: BuildConfig, source: Any) -> CachedLabeler | None:
    """The biome labeler of the build's source (None: the world's own biome map)."""
    label = getattr(source, "label_locations", None)
    if label is None:
        return None
    return CachedLabeler(label, f"{build_dir(cfg.store)}/labels.parquet")


PLOTS = ("sample_map.png", "strata.png")


def _staging_path(store: str) -> tuple[str, str]:
    """(store, where to create it): a local store is created beside its path and renamed into place
    once whole, so that a build killed while creating it leaves no half-made store behind (a leftover
    staging folder of a killed build is removed here; the build lock is held). Other filesystems create
    it in place."""
    import glob
    import os
    import shutil

    local = _local_path(store)
    if local is None:
        return store, store
    base = os.path.abspath(local).rstrip("/")
    for old in glob.glob(f"{glob.escape(base)}.creating-*"):
        shutil.rmtree(old, ignore_errors=True)
    return base, f"{base}.creating-{os.getpid()}"


def _write_plots(plan: gpd.GeoDataFrame, out: str) -> None:
    from mmearth_data.plots import sample_map, strata_plot

    fs, path = fsspec.core.url_to_fs(out)
    for name, fig_fn in zip(PLOTS, (sample_map, strata_plot), strict=True):
        buf = io.BytesIO()
        fig_fn(plan, buf)
        fs.pipe_file(f"{path}/{name}", buf.getvalue())


@dataclass
class ShardReport:
    shard: int
    complete: int
    slots: int
    failures: list[dict[str, str]]
    backfilled: int
    seconds: float


TILE_RETRIES = 3  # transient failures of one tile asked again before its slot moves to an alternate


def export_shard(cfg: BuildConfig, shard: int, candidates: list[list[dict[str, Any]]]) -> ShardReport:
    """Fetch every slot of one shard (trying alternates on failure) and write the shard; for
    :class:`FillCandidates`, fetch and write only the modalities added to the stored tiles."""
    t0 = time.perf_counter()
    fill = next((c[0]["fill"] for c in candidates if c and "fill" in c[0]), None)
    if fill is not None:
        return _fill_shard(cfg, shard, candidates, fill, t0)
    source = make_source(cfg.source, seed=cfg.seed, **cfg.source_options)
    mods = registry.stored_modalities(cfg.modalities)
    n = len(candidates)
    attempt = [0] * n
    tries = [0] * n  # transient failures of the current candidate
    results: list[Any] = [None] * n
    failures: list[dict[str, str]] = []
    todo = [i for i in range(n) if candidates[i]]
    while todo:
        reqs = [TileRequest.from_row(candidates[i][attempt[i]], cfg.tile_size) for i in todo]
        got = source.fetch(reqs, mods)
        if len(got) != len(reqs):
            raise RuntimeError(f"source {cfg.source} returned {len(got)} results for {len(reqs)} tiles")
        nxt = []
        for i, req, res in zip(todo, reqs, got, strict=True):
            if not isinstance(res, TileFailure):
                problem = payload_problem(res, mods, cfg.tile_size)
                if problem is None:
                    res.request = req
                    results[i] = res
                    continue
                res = TileFailure(res.tile_id, "store", f"corrupt payload rejected: {problem}")
            retry = res.transient and tries[i] < TILE_RETRIES
            failures.append({"tile_id": res.tile_id, "stage": res.stage, "reason": res.reason,
                             "action": "retried" if retry else "backfilled"})  # fmt: skip
            if retry:
                tries[i] += 1
            else:
                attempt[i] += 1
                tries[i] = 0
            if attempt[i] < len(candidates[i]):
                nxt.append(i)
        todo = nxt
    written = StoreWriter(cfg.store).write_shard(shard, results)
    backfilled = sum(1 for i in range(n) if results[i] is not None and attempt[i] > 0)
    return ShardReport(shard, written, n, failures, backfilled, time.perf_counter() - t0)


def _scene_problem(req: TileRequest, res: Any) -> str | None:
    """Why a result for a tile pinned to its stored scene cannot join that tile (None when it can)."""
    day = str(np.datetime64(res.s2_date, "D"))
    if day != req.s2_date:
        return f"built from the scene of {day}, not the stored one of {req.s2_date}"
    got = res.extra.get("s2_id")
    if req.s2_id and got and got != req.s2_id:
        return f"built from scene {got}, not the stored {req.s2_id}"
    return None


def _fill_shard(
    cfg: BuildConfig, shard: int, candidates: list[list[dict[str, Any]]], fill: list[str], t0: float
) -> ShardReport:
    """Fetch the added modalities ``fill`` for one shard's stored tiles (each from its own scene;
    transient failures asked again) and write them; a tile that fails keeps them unwritten (a re-run
    asks again)."""
    source = make_source(cfg.source, seed=cfg.seed, **cfg.source_options)
    mods = registry.stored_modalities(fill)
    n = len(candidates)
    results: list[Any] = [None] * n
    tries = [0] * n
    failures: list[dict[str, str]] = []
    todo = [i for i in range(n) if candidates[i]]
    while todo:
        reqs = [TileRequest.from_row(candidates[i][0], cfg.tile_size) for i in todo]
        got = source.fetch(reqs, mods)
        if len(got) != len(reqs):
            raise RuntimeError(f"source {cfg.source} returned {len(got)} results for {len(reqs)} tiles")
        nxt = []
        for i, req, res in zip(todo, reqs, got, strict=True):
            if not isinstance(res, TileFailure):
                problem = payload_problem(res, mods, cfg.tile_size) or _scene_problem(req, res)
                if problem is None:
                    results[i] = res
                    continue
                res = TileFailure(res.tile_id, "store", f"result rejected: {problem}")
            retry = res.transient and tries[i] < TILE_RETRIES
            failures.append({"tile_id": res.tile_id, "stage": res.stage, "reason": res.reason,
                             "action": "retried" if retry else "left unfilled"})  # fmt: skip
            if retry:
                tries[i] += 1
                nxt.append(i)
        todo = nxt
    written = StoreWriter(cfg.store).write_modalities(shard, fill, results)
    return ShardReport(shard, written, n, failures, 0, time.perf_counter() - t0)


def finish(
    cfg: BuildConfig, reports: list[ShardReport], seconds: float, statistics: bool = True
) -> dict[str, Any]:
    """Statistics into the store (unless the caller wrote them already), failures into the artifacts,
    the build's history entry closed; returns the build summary."""
    from mmearth_data.stats import write_statistics

    if statistics:
        write_statistics(cfg.store)
    complete_flags = StoreWriter(cfg.store).complete()
    complete = int(complete_flags.sum())
    history = list(read_attrs(cfg.store).get("history") or [])
    if history and history[-1]["finished"] is None:
        t0, t1 = history[-1]["tiles"]
        history[-1] |= {"finished": _now(), "complete": int(complete_flags[t0:t1].sum())}
        update_attrs(cfg.store, history=history)
        save_metadata_copy(cfg.store)  # the copy repair restores from holds the closed history
    failures = [f for r in reports for f in r.failures]
    reasons: dict[str, int] = {}
    for f in failures:
        reasons[f"{f['stage']}: {f['reason']}"] = reasons.get(f"{f['stage']}: {f['reason']}", 0) + 1
    fs, path = fsspec.core.url_to_fs(build_dir(cfg.store))
    fs.makedirs(path, exist_ok=True)
    prior = []
    if fs.exists(f"{path}/failures.json"):
        prior = json.loads(fs.cat_file(f"{path}/failures.json"))
    fs.pipe_file(f"{path}/failures.json", json.dumps(prior + failures, indent=1).encode())
    tiles_done = sum(r.slots for r in reports)
    return {
        "store": cfg.store,
        "artifacts": build_dir(cfg.store),
        "n_tiles": len(complete_flags),
        "complete": complete,
        "shards_exported": len(reports),
        "tiles_exported": tiles_done,
        "backfilled": sum(r.backfilled for r in reports),
        "failed_attempts": len(failures),
        "failure_reasons": reasons,
        "seconds": round(seconds, 2),
        "tiles_per_s": round(tiles_done / seconds, 2) if seconds > 0 else None,
        "config": asdict(cfg) | {"source_options": "<hidden>"},
    }


def build_in_process(cfg: BuildConfig, world: World | None = None) -> dict[str, Any]:
    """The whole build in this process without Prefect, shard after shard: :func:`prepare`, then
    :func:`export_shard` for every pending shard, then :func:`finish` (the flow runs the same steps as
    Prefect tasks). For tests, benchmarks and notebooks; returns the build summary."""
    t0 = time.perf_counter()
    prep = prepare(cfg, world)
    reports = [export_shard(prep.config, k, prep.candidates[k]) for k in prep.shards]
    return finish(prep.config, reports, time.perf_counter() - t0)


def config_from_store(url: str) -> BuildConfig:
    """The build configuration recorded in a store's ``build`` attribute (for resuming or repairing)."""
    c = read_attrs(url).get("build", {}).get("config")
    if not c:
        raise BuildInputError(f"{url} records no build configuration; it was not written by `mmearth build`")
    return BuildConfig(
        store=url, n_tiles=c["n_tiles"], source=c["source"], seed=c["seed"], tile_size=c["tile_size"],
        years=tuple(c["years"]), modalities=tuple(c["modalities"]), reserve=c["reserve"],
        chunk_tiles=c["chunk_tiles"], shard_tiles=c["shard_tiles"], compression=c["compression"],
    )  # fmt: skip


def repair_store(url: str, world: World | None = None) -> dict[str, Any]:
    """Repair what ``validate --deep`` finds: missing or damaged ``zarr.json`` files are restored from
    the copy the build keeps (:func:`restore_metadata`); then the shards that hold damaged tiles are
    re-exported: their shard files are removed from every per-tile array, their tiles marked incomplete
    and, for the offline source, the build is resumed from the store's own configuration, which rewrites
    exactly those shards and the statistics. Other sources need their credentials: the shards are
    marked and the summary says to re-run ``mmearth build`` with the same options."""
    from mmearth_data.stats import write_statistics
    from mmearth_data.store import CorpusReader
    from mmearth_data.validate import deep_check

    restored = restore_metadata(url)
    reader = CorpusReader(url)
    damaged = deep_check(reader)
    shards = sorted({reader.shard_of(d["index"]) for d in damaged})
    out: dict[str, Any] = {
        "store": url,
        "restored_metadata": restored,
        "damaged_tiles": len({d["index"] for d in damaged}),
        "shards": shards,
    }
    if not shards:
        if "zarr.json" in restored:  # the root's copy may predate the statistics
            write_statistics(url)
        return out | {"rebuilt": False}
    cfg = config_from_store(url)
    writer = StoreWriter(url)
    for k in shards:
        writer.drop_shard(k)
    if cfg.source != "offline":
        return out | {"rebuilt": False, "next": f"re-run `mmearth build --store {url}` with the same options"}
    build_in_process(cfg, world)
    return out | {"rebuilt": True, "remaining": len(deep_check(CorpusReader(url)))}
