"""The Zarr v3 corpus store: schema, whole-shard writer, completeness, and the public reader.

Data flow: source results -> :class:`StoreWriter` (one region write per array per shard) -> the store
-> :class:`CorpusReader` (statistics, catalog, model). See shared/DESIGN.md for the contract.

Layout: every variable has the leading dimension ``tile``; pixel modalities are
``(tile, <modality>_band, y, x)``, tile-level ones ``(tile, <modality>_band)`` or ``(tile,)``. Chunks
hold ``chunk_tiles`` whole tiles (all bands), shards ``shard_tiles`` tiles. Compression is lossless:
Blosc/Zstd + byte shuffle for every array, except that a ``compact`` store (the default) follows each
modality's registry ``codec``: the DEM with Pcodec, the registered Zarr v3 extension codec
``numcodecs.pcodec`` (zarr-python with numcodecs, zarrs); a ``portable`` store uses Blosc/Zstd
throughout, for readers that know only the core codecs. A
shard is written in one region write per array, the ``complete`` flags last, so a killed build never
leaves a tile marked complete that is not fully written; re-running redoes exactly the shards with an
incomplete tile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.codecs.numcodecs import PCodec

from mmearth_data.crash import crash_point
from mmearth_data.registry import MODALITIES, Modality, RegistryError, get, registry_dict
from mmearth_data.tiles import TileResult

log = logging.getLogger(__name__)
SCHEMA_VERSION = "1.2"  # 1.1: scene provenance; 1.2: per-chunk CRC32C and per-tile content checksums
COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
# every chunk ends in a CRC32C of its encoded bytes: a flipped or cut byte fails the read instead of
# decoding to other values
CHECKED = (COMPRESSOR, Crc32cCodec())
PCODEC_LEVEL = 8
COMPRESSION_MODES = ("compact", "portable")

# zarr-python warns on every array that uses a numcodecs codec that other implementations may not read
# it; the store says which codecs it uses (attribute ``compression``) and how to avoid them (portable)
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

EPOCH = np.datetime64("1970-01-01", "D")
DATE_FILL = np.iinfo(np.int32).min


@dataclass(frozen=True)
class TileVar:
    name: str
    dtype: Any
    fill: Any
    extra_dims: tuple[tuple[str, int], ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()


TILE_VARS = (
    TileVar("tile_id", str, "", attrs=(("long_name", "global grid tile id"),)),
    TileVar("lat", "float64", np.nan, attrs=(("units", "degrees_north"), ("long_name", "tile centre"))),
    TileVar("lon", "float64", np.nan, attrs=(("units", "degrees_east"), ("long_name", "tile centre"))),
    TileVar("epsg", "int32", 0, attrs=(("long_name", "EPSG code of the tile's UTM grid"),)),
    TileVar(
        "transform",
        "float64",
        np.nan,
        extra_dims=(("transform_coef", 6),),
        attrs=(
            (
                "long_name",
                "affine transform (a, b, c, d, e, f): x = a*col + b*row + c, y = d*col + e*row + f",
            ),
        ),
    ),
    TileVar(
        "s2_date",
        "int32",
        DATE_FILL,
        attrs=(
            ("units", "days since 1970-01-01"),
            ("calendar", "proleptic_gregorian"),
            ("_FillValue", int(DATE_FILL)),  # xarray masks Zarr v3 data by this attribute only
        ),
    ),
    TileVar("s2_product", str, "", attrs=(("long_name", "Sentinel-2 processing level: L1C or L2A"),)),
    TileVar("year", "int16", 0),
    TileVar("split", str, "", attrs=(("long_name", "train, val or test (by 1-degree block)"),)),
    TileVar("cloud_fraction", "float32", np.nan, attrs=(("long_name", "share of opaque-cloud pixels"),)),
    # provenance of the scenes (empty / fill where the source has none, e.g. the offline source's ids)
    TileVar("s2_id", str, "", attrs=(("long_name", "Sentinel-2 scene id (system:index) in its collection"),)),
    TileVar(
        "cloud_score",
        "float32",
        np.nan,
        attrs=(
            ("units", "percent"),
            ("long_name", "cloudy share of the tile's pixels when the scene was chosen"),
        ),
    ),
    TileVar("cloud_score_source", str, "", attrs=(("long_name", "mask behind cloud_score"),)),
    TileVar(
        "s1_ids",
        str,
        "",
        extra_dims=(("orbit", 2),),
        attrs=(("long_name", "Sentinel-1 GRD slice ids of the pass used, comma separated"),),
    ),
    TileVar(
        "s1_date",
        "int32",
        DATE_FILL,
        extra_dims=(("orbit", 2),),
        attrs=(
            ("units", "days since 1970-01-01"),
            ("calendar", "proleptic_gregorian"),
            ("_FillValue", int(DATE_FILL)),  # xarray masks Zarr v3 data by this attribute only
            ("long_name", "Sentinel-1 pass date"),
        ),
    ),
    TileVar(
        "s1_gap_days",
        "float32",
        np.nan,
        extra_dims=(("orbit", 2),),
        attrs=(("units", "days"), ("long_name", "time between the Sentinel-1 pass and the Sentinel-2 scene")),
    ),
)
ORBIT_NAMES = ("asc", "desc")  # coordinate of the orbit dimension


@dataclass(frozen=True)
class ArrayLayout:
    """How one array of a store is written (what validation compares with the registry)."""

    dims: tuple[str, ...]
    dtype: np.dtype
    fill: Any
    shape: tuple[int, ...]
    codecs: list[str]


def shard_count(n_tiles: int, shard_tiles: int) -> int:
    """Shards of a store of ``n_tiles`` tiles, ``shard_tiles`` each (the last may be short)."""
    return -(-n_tiles // shard_tiles)


class ShardLayout:
    """Shard arithmetic of a store with ``n_tiles`` tiles of ``shard_tiles`` per shard."""

    n_tiles: int
    shard_tiles: int

    @property
    def n_shards(self) -> int:
        return shard_count(self.n_tiles, self.shard_tiles)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Store indices ``start, stop`` of the tiles of ``shard``."""
        s0 = shard * self.shard_tiles
        return s0, min(s0 + self.shard_tiles, self.n_tiles)

    def shard_of(self, index: int) -> int:
        return index // self.shard_tiles


class StoreError(ValueError):
    """The store at a path is missing, foreign, or does not match the build's configuration."""


def store_modalities(group: zarr.Group) -> tuple[Modality, ...]:
    """The modalities this store holds, as its recorded registry describes them (a modality the record
    lacks, in a store written before the registry was recorded, from the live registry)."""
    recorded = group.attrs.get("registry") or {}
    names = group.attrs.get("modalities", [])
    return tuple(Modality.from_dict(recorded[n]) if n in recorded else get(n) for n in names)


def strings(values: Any) -> np.ndarray:
    """Zarr variable-length strings (numpy StringDType) as an object array of Python str."""
    return np.array(np.asarray(values).tolist(), dtype=object)


def plain_text(values: np.ndarray) -> np.ndarray:
    """``values`` with Zarr text (StringDType) as Python str (:func:`strings`); other arrays as they are."""
    return strings(values) if values.dtype.kind == "T" else values


def _shard_key(root: str, name: str, shard: int) -> str:
    """Key of array ``name``'s shard ``shard`` under the store's ``root``: Zarr v3's default chunk key
    encoding, ``<name>/c/<shard>``, a folder with one more ``/0`` per further dimension beneath it."""
    return f"{root.rstrip('/')}/{name}/c/{shard}"


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _exists(url: str) -> tuple[bool, bool]:
    """(anything at url, a zarr group at url)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return False, False
    if fs.isfile(path):
        return True, False
    return True, fs.exists(f"{path.rstrip('/')}/zarr.json")


def check_compression(compression: str) -> None:
    """Raise ValueError naming the choices when ``compression`` is not a store compression mode."""
    if compression not in COMPRESSION_MODES:
        raise ValueError(
            f"`compression` {compression!r} is not known; use compact (default: Pcodec for the DEM, "
            "Blosc/Zstd for the rest) or portable (Blosc/Zstd only, for any Zarr v3 reader)"
        )


def array_codecs(m: Modality, compression: str) -> dict[str, Any]:
    """``create_array`` codec arguments of a modality's array in a ``compact`` or ``portable`` store."""
    check_compression(compression)
    if compression == "compact" and m.codec == "pcodec":
        return {"serializer": PCodec(level=PCODEC_LEVEL), "compressors": (Crc32cCodec(),)}
    return {"compressors": CHECKED}


def codec_names(array) -> list[str]:
    """Codec names of an array as its zarr.json records them, inside the sharding codec if any."""
    out = []
    for c in array.metadata.to_dict()["codecs"]:
        if c["name"] == "sharding_indexed":
            out += [inner["name"] for inner in c["configuration"]["codecs"]]
        else:
            out.append(c["name"])
    return out


def tile_checksum(values: np.ndarray) -> np.uint32:
    """CRC32 of one tile's values of one modality as stored (C order, the array's own dtype): recorded
    at write time, compared by ``mmearth validate --deep``."""
    return np.uint32(zlib.crc32(np.ascontiguousarray(values).tobytes()))


def _tile_flag(group: zarr.Group, name: str, long_name: str, layout: tuple[int, int, int]) -> None:
    n_tiles, chunk_tiles, shard_tiles = layout
    group.create_array(
        name, shape=(n_tiles,), chunks=(chunk_tiles,), shards=(shard_tiles,), dtype="bool",
        fill_value=False, compressors=CHECKED, dimension_names=["tile"], attributes={"long_name": long_name},
    )  # fmt: skip


def _modality_arrays(
    group: zarr.Group, m: Modality, tile_size: int, layout: tuple[int, int, int], codecs: dict[str, Any]
) -> None:
    """A modality's array (all fill), its band coordinate and its ``<name>_present`` flags; ``layout``
    is (tiles, tiles per chunk, tiles per shard)."""
    n_tiles, chunk_tiles, shard_tiles = layout
    shape = m.shape(n_tiles, tile_size)
    group.create_array(
        m.name,
        shape=shape,
        chunks=(chunk_tiles,) + shape[1:],
        shards=(shard_tiles,) + shape[1:],
        dtype=m.dtype,
        fill_value=m.fill,
        **codecs,
        dimension_names=list(m.dims()),
        attributes={
            "long_name": m.description,
            "units": list(m.units) if not isinstance(m.units, str) else m.units,
            "nodata": "NaN" if m.nan_fill else m.fill,
            "modality": m.name,
        },
    )
    if not m.scalar:
        band = group.create_array(m.band_dim, shape=(m.n_bands,), dtype=str, dimension_names=[m.band_dim])
        band[:] = np.array(m.bands, dtype=object)
    _tile_flag(group, f"{m.name}_present", f"{m.name} delivered by the source (false: all fill)", layout)


def add_modalities(url: str, modalities: Sequence[Modality]) -> None:
    """Add modalities to an existing store's tiles (``mmearth build --extend --modalities``): for each,
    its array, band coordinate and ``_present`` flags as :func:`create_store` makes them, plus
    ``<name>_complete`` (the tile's values of this modality written) and ``checksum_<name>`` (their
    CRC32), so that filling them in writes new shard files only; the store's ``modalities`` and
    ``added_modalities`` attributes list them. Arrays made by an earlier, killed call are kept."""
    group = zarr.open_group(url, mode="r+", zarr_format=3)
    a = group.attrs
    layout = (a["n_tiles"], a["chunk_tiles"], a["shard_tiles"])
    mode = a.get("compression", {}).get("mode", "compact")
    have = set(group.array_keys())
    for m in modalities:
        if m.name not in have:
            _modality_arrays(group, m, a["tile_size"], layout, array_codecs(m, mode))
        if f"{m.name}_complete" not in have:
            _tile_flag(group, f"{m.name}_complete", f"{m.name} written for the tile (added later)", layout)
        if f"checksum_{m.name}" not in have:
            n, c, sh = layout
            group.create_array(
                f"checksum_{m.name}", shape=(n,), chunks=(c,), shards=(sh,), dtype="uint32", fill_value=0,
                compressors=CHECKED, dimension_names=["tile"],
                attributes={"long_name": f"CRC32 of the tile's {m.name} values as written"},
            )  # fmt: skip
    names = [m.name for m in modalities]
    comp = dict(a.get("compression") or {})
    comp["codecs"] = dict(comp.get("codecs") or {}) | {
        m.name: m.codec if mode == "compact" else "blosc" for m in modalities
    }
    group.attrs.update(
        {
            "modalities": list(a["modalities"]) + [n for n in names if n not in a["modalities"]],
            "added_modalities": list(a.get("added_modalities") or [])
            + [n for n in names if n not in (a.get("added_modalities") or [])],
            "compression": comp,
        }
    )


def complete_flags(group: zarr.Group, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Which tiles of ``start:stop`` are complete: the ``complete`` flags, and for a modality added
    to the store's tiles later, its ``<name>_complete`` flags."""
    stop = int(group.attrs["n_tiles"]) if stop is None else stop
    done = np.asarray(group["complete"][start:stop]).astype(bool)
    for name in group.attrs.get("added_modalities") or ():
        done &= np.asarray(group[f"{name}_complete"][start:stop]).astype(bool)
    return done


def create_store(
    url: str,
    *,
    n_tiles: int,
    tile_size: int,
    modalities: Sequence[Modality],
    chunk_tiles: int,
    shard_tiles: int,
    attrs: dict[str, Any],
    compression: str = "compact",
) -> zarr.Group:
    """Create an empty corpus store (all fill, nothing complete) and return its group."""
    codecs = {m.name: array_codecs(m, compression) for m in modalities}  # checked before anything is made
    group = zarr.open_group(url, mode="w-", zarr_format=3)
    n_shards = shard_count(n_tiles, shard_tiles)
    layout = (n_tiles, chunk_tiles, shard_tiles)
    for m in modalities:
        _modality_arrays(group, m, tile_size, layout, codecs[m.name])
    for v in TILE_VARS:
        shape = (n_tiles,) + tuple(n for _, n in v.extra_dims)
        arr = group.create_array(
            v.name,
            shape=shape,
            chunks=(chunk_tiles,) + shape[1:],
            shards=(shard_tiles,) + shape[1:],
            dtype=v.dtype,
            fill_value=v.fill,
            compressors=(Crc32cCodec(),) if v.dtype is str else CHECKED,
            dimension_names=["tile"] + [d for d, _ in v.extra_dims],
        )
        arr.attrs.update(dict(v.attrs))
    coef = group.create_array("transform_coef", shape=(6,), dtype=str, dimension_names=["transform_coef"])
    coef[:] = np.array(list("abcdef"), dtype=object)
    orbit = group.create_array("orbit", shape=(len(ORBIT_NAMES),), dtype=str, dimension_names=["orbit"])
    orbit[:] = np.array(ORBIT_NAMES, dtype=object)
    n_mod = len(modalities)
    group.create_array(
        "checksum", shape=(n_tiles, n_mod), chunks=(chunk_tiles, n_mod), shards=(shard_tiles, n_mod),
        dtype="uint32", fill_value=0, compressors=CHECKED, dimension_names=["tile", "modality"],
        attributes={"long_name": "CRC32 of each modality's values of the tile as written (see modality)"},
    )  # fmt: skip
    mod = group.create_array("modality", shape=(n_mod,), dtype=str, dimension_names=["modality"])
    mod[:] = np.array([m.name for m in modalities], dtype=object)
    _tile_flag(group, "complete", "every modality of the tile is written (as data or as fill)", layout)
    group.attrs.update(
        {
            "schema_version": SCHEMA_VERSION,
            "tile_size": tile_size,
            "resolution_m": 10.0,
            "n_tiles": n_tiles,
            "chunk_tiles": chunk_tiles,
            "shard_tiles": shard_tiles,
            "n_shards": n_shards,
            "compression": {
                "mode": compression,
                "codecs": {m.name: m.codec if compression == "compact" else "blosc" for m in modalities},
            },
            "modalities": [m.name for m in modalities],
            "registry": registry_dict(tuple(MODALITIES)),
            **attrs,
        }
    )
    return group


def payload_problem(res: TileResult, modalities: Sequence[Modality], tile_size: int) -> str | None:
    """Why ``res`` must not be written (None when it may): a modality missing, of another shape, of a
    dtype that does not hold the registry's values exactly, with NaN or inf where the registry's dtype
    has no room for them (or inf anywhere), or all fill although flagged present."""
    for m in modalities:
        a = res.arrays.get(m.name)
        if a is None:
            return f"{m.name}: missing"
        a = np.asarray(a)
        want = m.shape(1, tile_size)[1:]
        if a.shape != want:
            return f"{m.name}: shape {a.shape}, expected {want}"
        if a.dtype.kind not in "biuf":
            return f"{m.name}: dtype {a.dtype} is not numeric"
        if a.dtype.kind == "f":
            if np.isinf(a).any():
                return f"{m.name}: inf values"
            if np.isnan(a).any() and m.np_dtype.kind != "f":
                return f"{m.name}: NaN in a {m.np_dtype} modality"
        if m.np_dtype.kind in "iu" and a.size:
            lo, hi = np.iinfo(m.np_dtype).min, np.iinfo(m.np_dtype).max
            vmin, vmax = np.nanmin(a), np.nanmax(a)
            if vmin < lo or vmax > hi:
                return f"{m.name}: values {vmin}..{vmax} outside {m.np_dtype}"
        if res.present.get(m.name) and a.size and bool(np.all(m.is_fill(a))):
            return f"{m.name}: all fill although delivered as present"
    return None


def _write_provenance(data: dict[str, np.ndarray], i: int, extra: dict[str, Any]) -> None:
    """Scene provenance a source reports in ``TileResult.extra`` into the shard's arrays (row ``i``)."""
    data["s2_id"][i] = str(extra.get("s2_id") or "")
    data["cloud_score"][i] = np.nan if extra.get("cloud_score") is None else extra["cloud_score"]
    data["cloud_score_source"][i] = str(extra.get("cloud_score_source") or "")
    for k, orbit in enumerate(ORBIT_NAMES):
        data["s1_ids"][i, k] = str((extra.get("s1_ids") or {}).get(orbit) or "")
        day = (extra.get("s1_date") or {}).get(orbit)
        if day is not None:
            data["s1_date"][i, k] = int((np.datetime64(day, "D") - EPOCH).astype(int))
        gap = (extra.get("s1_gap_days") or {}).get(orbit)
        data["s1_gap_days"][i, k] = np.nan if gap is None else gap


class StoreWriter(ShardLayout):
    """Writes whole shards of an existing store."""

    def __init__(self, url: str):
        self.url = url
        self.group = zarr.open_group(url, mode="r+", zarr_format=3)
        a = self.group.attrs
        self.n_tiles, self.tile_size, self.shard_tiles = a["n_tiles"], a["tile_size"], a["shard_tiles"]
        self.modalities = store_modalities(self.group)
        self.added = tuple(a.get("added_modalities") or ())  # each with its own flags and checksums

    def write_modalities(self, shard: int, names: Sequence[str], results: Sequence[TileResult | None]) -> int:
        """Write modalities added to the store (``names``) into one shard's complete tiles: ``results``
        per slot, None where the slot gets nothing now (its values of ``names`` are kept as they are).
        Writes only the added modalities' arrays (new shard files), their flags last. Returns the
        number of tiles whose added modalities are all written."""
        s0, s1 = self.shard_range(shard)
        n = s1 - s0
        if len(results) != n:
            raise ValueError(f"shard {shard} holds {n} tiles, got {len(results)} results")
        got = np.array([r is not None for r in results])
        done = {}
        for m in (get(x) for x in names):
            old_done = np.asarray(self.group[f"{m.name}_complete"][s0:s1]).astype(bool)
            data = {k: np.asarray(self.group[k][s0:s1]) for k in (m.name, f"{m.name}_present")}
            data[m.name] = data[m.name].copy()
            sums = np.asarray(self.group[f"checksum_{m.name}"][s0:s1]).copy()
            for i in np.flatnonzero(got):
                data[m.name][i] = results[i].arrays[m.name]
                data[f"{m.name}_present"][i] = results[i].present[m.name]
                sums[i] = tile_checksum(data[m.name][i])
            data[f"checksum_{m.name}"] = sums
            for k, values in data.items():
                self.group[k][s0:s1] = values
                crash_point("shard-array")
            done[m.name] = old_done | got
        for name, flags in done.items():
            self.group[f"{name}_complete"][s0:s1] = flags
        crash_point("shard-done")
        return int(complete_flags(self.group, s0, s1).sum())

    def write_shard(self, shard: int, results: Sequence[TileResult | None]) -> int:
        """Write one shard: ``results`` per slot (each with its request: the tile's place, year and
        split), None where the slot could not be filled; a slot without a result whose tile is complete
        already (a shard that an extension fills up) keeps that tile as it is. Returns the number of
        complete tiles written."""
        s0, s1 = self.shard_range(shard)
        n = s1 - s0
        if len(results) != n:
            raise ValueError(f"shard {shard} holds {n} tiles, got {len(results)} results")
        if any(r is not None and r.request is None for r in results):
            raise ValueError("every result written needs its request (TileResult.request)")
        S = self.tile_size
        data: dict[str, np.ndarray] = {}
        for m in self.modalities:
            data[m.name] = np.full(m.shape(n, S), m.fill, m.np_dtype)
            data[f"{m.name}_present"] = np.zeros(n, bool)
        for v in TILE_VARS:
            shape = (n,) + tuple(k for _, k in v.extra_dims)
            data[v.name] = (
                np.full(shape, "", dtype=object) if v.dtype is str else np.full(shape, v.fill, v.dtype)
            )
        complete = np.zeros(n, bool)
        base = [m for m in self.modalities if m.name not in self.added]  # the ``checksum`` columns
        checksum = np.zeros((n, len(base)), np.uint32)
        for name in self.added:
            data[f"checksum_{name}"] = np.zeros(n, np.uint32)
        for i, res in enumerate(results):
            if res is None:
                continue
            row = res.request
            for m in self.modalities:
                data[m.name][i] = res.arrays[m.name]
                data[f"{m.name}_present"][i] = res.present[m.name]
            data["tile_id"][i] = res.tile_id
            data["lat"][i], data["lon"][i] = row.lat, row.lon
            data["epsg"][i] = row.epsg
            data["transform"][i] = row.transform
            data["s2_date"][i] = int((res.s2_date.astype("datetime64[D]") - EPOCH).astype(int))
            data["s2_product"][i] = res.s2_product
            data["year"][i] = row.year
            data["split"][i] = row.split
            data["cloud_fraction"][i] = res.extra.get("cloud_fraction", np.nan)
            _write_provenance(data, i, res.extra)
            complete[i] = True
        for j, m in enumerate(base):  # of the values as cast to the store's dtype
            for i in np.flatnonzero(complete):
                checksum[i, j] = tile_checksum(data[m.name][i])
        for name in self.added:
            for i in np.flatnonzero(complete):
                data[f"checksum_{name}"][i] = tile_checksum(data[name][i])
        data["checksum"] = checksum
        missing = np.array([res is None for res in results])
        keep = missing & np.asarray(self.group["complete"][s0:s1]) if missing.any() else missing
        if keep.any():
            for name, values in data.items():
                old = np.asarray(self.group[name][s0:s1])
                values[keep] = plain_text(old[keep])
            complete |= keep
        for name, values in data.items():
            self.group[name][s0:s1] = values
            crash_point("shard-array")
        for name in self.added:  # a tile written whole holds its added modalities too
            self.group[f"{name}_complete"][s0:s1] = complete
        self.group["complete"][s0:s1] = complete  # last: marks the shard's tiles done
        crash_point("shard-done")
        return int(complete.sum())

    def complete(self, start: int = 0, stop: int | None = None, own: bool = False) -> np.ndarray:
        """Completeness of tiles ``start:stop``: written whole with every modality, added ones included
        (with ``own``: the ``complete`` flags alone, the tiles' build written)."""
        if own:
            return np.asarray(self.group["complete"][start:stop]).astype(bool)
        return complete_flags(self.group, start, stop)

    def drop_shard(self, shard: int) -> None:
        """Remove the shard files of ``shard`` from every per-tile array and mark its tiles incomplete
        (repair: a write into a shard reads what is there first, and fails on a damaged file)."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url)
        for name, a in self.group.arrays():
            if a.shape and a.shape[0] == self.n_tiles:
                key = _shard_key(root, name, shard)
                if fs.exists(key):
                    fs.rm(key, recursive=True)
        s0, s1 = self.shard_range(shard)
        self.group["complete"][s0:s1] = np.zeros(s1 - s0, bool)

    def write_tiles(self, start: int, data: dict[str, np.ndarray]) -> None:
        """Write per-tile arrays ``data`` (values of tiles ``start:start + n``, as stored) and then mark
        those tiles complete: for copies of tiles written whole elsewhere (``mmearth derive``)."""
        n = len(next(iter(data.values())))
        for name, values in data.items():
            self.group[name][start : start + n] = plain_text(values)
        self.group["complete"][start : start + n] = np.ones(n, bool)

    def incomplete_shards(self) -> list[int]:
        """Shards holding at least one tile not marked complete (unreadable flags count as not)."""
        out = []
        for k in range(self.n_shards):
            s0, s1 = self.shard_range(k)
            try:
                done = bool(np.all(complete_flags(self.group, s0, s1)))
            except Exception as err:  # a shard file cut short by a killed write
                log.warning("completeness flags of shard %d unreadable (%s); redoing it", k, err)
                done = False
            if not done:
                out.append(k)
        return out


def _damaged_metadata(url: str, array: str, err: Exception) -> str:
    where = f"{url.rstrip('/')}/{array + '/' if array else ''}zarr.json"
    return (
        f"{where} cannot be read ({type(err).__name__}: {str(err)[:160]}); the store's metadata is damaged. "
        f"Run `mmearth repair --store {url}` to restore it from the copy the build keeps, or restore that "
        "file from a copy of your own (nothing was changed)"
    )


def unreadable(url: str, array: str, start: int, stop: int, err: Exception) -> str:
    """The message for tiles ``start:stop`` of ``array`` that cannot be read (a damaged chunk)."""
    return (
        f"{url}: array {array!r}, tiles {start}..{stop - 1} cannot be read ({type(err).__name__}: "
        f"{str(err)[:200]}); run `mmearth validate --store {url} --deep` to list the damaged tiles and "
        f"`mmearth repair --store {url}` to re-export them"
    )


def metadata_documents(url: str) -> dict[str, bytes]:
    """Every ``zarr.json`` of the store (root and arrays) by its key in the store, as stored."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    group = zarr.open_group(url, mode="r", zarr_format=3)
    keys = ["zarr.json"] + [f"{name}/zarr.json" for name in sorted(group.array_keys())]
    return {k: fs.cat_file(f"{root.rstrip('/')}/{k}") for k in keys}


def metadata_problems(url: str, keys: Sequence[str]) -> dict[str, str]:
    """``{key: problem}`` for every ``zarr.json`` among ``keys`` (as :func:`metadata_documents` names
    them) that is missing or that zarr cannot open."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    out: dict[str, str] = {}
    for key in keys:
        if not fs.exists(f"{root.rstrip('/')}/{key}"):
            out[key] = "missing"
            continue
        name = key[: -len("/zarr.json")] if key != "zarr.json" else ""
        try:
            if name:
                zarr.open_array(url, path=name, mode="r", zarr_format=3)
            else:
                zarr.open_group(url, mode="r", zarr_format=3).attrs.asdict()
        except Exception as err:  # JSON, metadata or codec errors
            out[key] = f"{type(err).__name__}: {str(err)[:160]}"
    return out


class CorpusReader(ShardLayout):
    """The public reader of a corpus store (local path or any fsspec URL); used by stats, catalog and
    model. Reads go through zarr directly in whole chunks; :meth:`dataset` gives the xarray view."""

    def __init__(self, url: str):
        exists, is_group = _exists(url)
        if not is_group:
            raise StoreError(
                f"{url} is not a corpus store ({'no zarr group there' if exists else 'nothing there'}); "
                "build one with `mmearth build --store PATH`"
            )
        self.url = url
        self._arrays: dict[str, zarr.Array] = {}
        self._names: set[str] | None = None
        try:
            self.group = zarr.open_group(url, mode="r", zarr_format=3)
            self.attrs = dict(self.group.attrs)
        except Exception as err:  # damaged zarr.json: JSON, metadata or codec errors
            raise StoreError(_damaged_metadata(url, "", err)) from None
        if "schema_version" not in self.attrs:
            raise StoreError(f"{url} is a zarr group but not a corpus store (no schema_version attribute)")
        self.n_tiles = int(self.attrs["n_tiles"])
        self.tile_size = int(self.attrs["tile_size"])
        self.shard_tiles = int(self.attrs["shard_tiles"])
        self.chunk_tiles = int(self.attrs["chunk_tiles"])
        try:
            self.modalities = store_modalities(self.group)
        except RegistryError as err:
            raise StoreError(
                f"{url}: {err.args[0]}; the store was written by a newer version of mmearth-corpus, "
                "upgrade it to read the store"
            ) from None
        for name in [m.name for m in self.modalities] + ["complete", "tile_id"]:
            try:
                self._array(name)  # opened once here, kept for the reads
            except KeyError:
                raise StoreError(
                    f"{url}: array {name!r} is missing; the store is incomplete or damaged"
                ) from None
            except Exception as err:
                raise StoreError(_damaged_metadata(url, name, err)) from None

    @property
    def statistics(self) -> dict[str, Any]:
        return self.attrs.get("statistics", {})

    def read(self, names: Sequence[str], start: int, stop: int) -> dict[str, np.ndarray]:
        """Arrays ``names`` (modalities or per-tile variables) for tiles ``start:stop``; a damaged chunk
        raises :class:`StoreError` naming the array, the tiles and the store."""
        return {n: self._get(n, start, stop) for n in names}

    def _get(self, name: str, start: int, stop: int | None) -> np.ndarray:
        try:
            if name == "complete":  # with the flags of modalities added later
                return complete_flags(self.group, start, stop)
            return np.asarray(self._array(name)[start:stop])
        except Exception as err:  # checksum mismatch, truncated or undecodable chunk
            last = self.n_tiles if stop is None else stop
            raise StoreError(unreadable(self.url, name, start, last, err)) from err

    def _array(self, name: str) -> zarr.Array:
        """The array ``name``, opened once (its metadata is read on the first use only)."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name]
        return arr

    def has(self, name: str) -> bool:
        """Whether the store holds an array called ``name`` (e.g. the provenance of schema 1.1)."""
        return name in self.array_names

    @property
    def array_names(self) -> set[str]:
        if self._names is None:
            self._names = set(self.group.array_keys())
        return self._names

    def column(self, name: str) -> np.ndarray:
        """Per-tile array ``name`` for every tile (strings as Python str)."""
        return plain_text(self._get(name, 0, self.n_tiles))

    def eligible(self, split: str | None = None, tile_ids: Sequence[str] | None = None) -> np.ndarray:
        """Boolean mask of the complete tiles, of ``split`` when given, among ``tile_ids`` when given;
        raises :class:`StoreError` naming listed ids that the store does not hold."""
        mask = self.column("complete").astype(bool)
        if split is not None:
            mask &= self.column("split") == split
        if tile_ids is not None:
            ids = self.column("tile_id")
            unknown = sorted(set(tile_ids) - set(ids.tolist()))
            if unknown:
                raise StoreError(f"{len(unknown)} listed tile ids are not in the store (first: {unknown[0]})")
            mask &= np.isin(ids, list(tile_ids))
        return mask

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Array ``name`` at the store indices ``index`` (any order)."""
        try:
            return np.asarray(self._array(name).oindex[np.asarray(index)])
        except Exception as err:
            raise StoreError(unreadable(self.url, name, 0, self.n_tiles, err)) from err

    def blocks(self, name: str) -> Iterator[tuple[int, int, np.ndarray | None, str | None]]:
        """(start, stop, values or None, error text or None) for each chunk of array ``name``: every
        readable chunk's values, and for an unreadable one (CRC32C mismatch, truncated, undecodable)
        the reason, so that a check can go on past it."""
        arr, c = self._array(name), self.chunk_tiles
        for a in range(0, self.n_tiles, c):
            b = min(a + c, self.n_tiles)
            try:
                yield a, b, np.asarray(arr[a:b]), None
            except Exception as err:
                yield a, b, None, f"{type(err).__name__}: {err}"

    def layout(self, name: str) -> ArrayLayout:
        """How array ``name`` is written: dimension names, dtype, fill, shape and codecs."""
        a = self._array(name)
        return ArrayLayout(
            dims=tuple(a.metadata.dimension_names or ()), dtype=a.dtype, fill=a.fill_value,
            shape=a.shape, codecs=codec_names(a),
        )  # fmt: skip

    def band_names(self, m: Modality) -> list[str]:
        """The band coordinate of modality ``m`` as stored."""
        return list(strings(self._get(m.band_dim, 0, None)))

    def dask_array(self, name: str) -> Any:
        """Array ``name`` as a dask array, one block per chunk (lazy)."""
        import dask.array as da

        return da.from_zarr(self._array(name))

    def missing_shard_file(self, name: str, start: int) -> str | None:
        """The key of the shard file of array ``name`` that holds tile ``start`` when it is absent
        (deleted, or the store changed while being read), else None."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url)
        key = _shard_key(root, name, self.shard_of(start)) + "/0" * (self._array(name).ndim - 1)
        return None if fs.exists(key) else key

    def s2_dates(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        days = self._get("s2_date", start, stop)
        out = (EPOCH + days.astype("timedelta64[D]")).astype("datetime64[D]")
        return np.where(days == DATE_FILL, np.datetime64("NaT"), out)

    def tiles(self, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Per-tile metadata of store indices ``start:stop`` as a DataFrame indexed by store index."""
        stop = self.n_tiles if stop is None else min(stop, self.n_tiles)
        cols = ["tile_id", "lat", "lon", "epsg", "year", "split", "s2_product", "cloud_fraction", "complete"]
        cols += [f"{m.name}_present" for m in self.modalities]
        cols += [m.name for m in self.modalities if m.scalar]
        data = {}
        for c in cols:
            data[c] = plain_text(self._get(c, start, stop))
        df = pd.DataFrame(data, index=pd.RangeIndex(start, stop))
        df["s2_date"] = self.s2_dates(start, stop)
        if self.has("s2_id"):  # scene provenance (schema 1.1)
            df["s2_id"] = strings(self._get("s2_id", start, stop))
            df["cloud_score"] = self._get("cloud_score", start, stop)
            df["cloud_score_source"] = strings(self._get("cloud_score_source", start, stop))
            ids = self._get("s1_ids", start, stop)
            days = self._get("s1_date", start, stop)
            gaps = self._get("s1_gap_days", start, stop)
            for k, orbit in enumerate(ORBIT_NAMES):
                df[f"s1_ids_{orbit}"] = strings(ids[:, k])
                d = (EPOCH + days[:, k].astype("timedelta64[D]")).astype("datetime64[D]")
                df[f"s1_date_{orbit}"] = np.where(days[:, k] == DATE_FILL, np.datetime64("NaT"), d)
                df[f"s1_gap_days_{orbit}"] = gaps[:, k]
        df["transform"] = list(self._get("transform", start, stop))
        return df

    def dataset(self, **kwargs) -> xr.Dataset:
        """The store as an xarray Dataset (lazy, dask-backed)."""
        kwargs.setdefault("consolidated", False)
        return xr.open_zarr(self.url, zarr_format=3, **kwargs)

    def tile_dataarray(self, index: int, modality: str = "sentinel2") -> xr.DataArray:
        """One tile of a pixel modality as a georeferenced DataArray (x/y in metres of its UTM zone,
        CRS and transform set for rioxarray: ``.rio.to_raster('tile.tif')`` writes a GeoTIFF)."""
        import rioxarray  # noqa: F401  (registers the .rio accessor)
        from affine import Affine

        m = get(modality)
        if m.kind != "pixel":
            raise ValueError(f"{modality} is not a pixel modality")
        values = self._get(modality, index, index + 1)[0]
        a, b, c, d, e, f = (float(v) for v in self._get("transform", index, index + 1)[0])
        epsg = int(self._get("epsg", index, index + 1)[0])
        S = values.shape[-1]
        x = c + a * (np.arange(S) + 0.5)
        y = f + e * (np.arange(S) + 0.5)
        da = xr.DataArray(
            values, dims=("band", "y", "x"), coords={"band": list(m.bands), "y": y, "x": x}, name=modality
        )
        da = da.rio.write_crs(f"EPSG:{epsg}").rio.write_transform(Affine(a, b, c, d, e, f))
        return da.rio.write_nodata(np.nan if m.nan_fill else m.fill, encoded=False)


class TaskStoreWriter:
    """Writes the downstream task store of ``mmearth tasks build`` (refused when ``url`` exists):
    Sentinel-2 and field boundaries block by block, then the per-tile labels and the attributes."""

    def __init__(self, url: str, n_tiles: int, tile_size: int):
        n, S = n_tiles, tile_size
        self.group = zarr.open_group(url, mode="w-", zarr_format=3)
        self.s2 = self.group.create_array(
            "sentinel2", shape=(n, 13, S, S), chunks=(8, 13, S, S), dtype="uint16", compressors=COMPRESSOR,
            dimension_names=["tile", "sentinel2_band", "y", "x"],
        )  # fmt: skip
        self.boundaries = self.group.create_array(
            "boundaries", shape=(n, S, S), chunks=(8, S, S), dtype="uint8", compressors=COMPRESSOR,
            dimension_names=["tile", "y", "x"],
        )  # fmt: skip

    def write_images(self, start: int, s2: np.ndarray, boundaries: np.ndarray) -> None:
        self.s2[start : start + len(s2)] = s2
        self.boundaries[start : start + len(boundaries)] = boundaries

    def finish(self, columns: dict[str, Any], attrs: dict[str, Any]) -> None:
        """Per-tile ``columns`` (numbers, or lists of str) as arrays, then the store's ``attrs``."""
        for name, values in columns.items():
            if isinstance(values, list):  # text
                arr = self.group.create_array(name, shape=(len(values),), dtype=str, dimension_names=["tile"])
                arr[:] = np.array(values, dtype=object)
                continue
            dims = ["tile"] + (["label"] if values.ndim == 2 else [])
            arr = self.group.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=dims)
            arr[:] = values
        self.group.attrs.update(attrs)


class TaskStore:
    """Reader of a task store that :class:`TaskStoreWriter` wrote."""

    def __init__(self, path: str):
        self.group = zarr.open_group(path, mode="r")
        self.tile_size = int(self.group.attrs["tile_size"])

    def column(self, name: str) -> np.ndarray:
        """Per-tile array ``name`` for every tile (strings as Python str)."""
        return plain_text(np.asarray(self.group[name][:]))

    def select(self, name: str, selection: tuple) -> np.ndarray:
        """Array ``name`` at an orthogonal selection (tile indices first)."""
        return self.group[name].get_orthogonal_selection(selection)


def read_attrs(url: str) -> dict[str, Any]:
    """The store's attributes (build configuration, history, statistics, recorded registry); raises
    :class:`StoreError` when its root metadata cannot be read."""
    try:
        return dict(zarr.open_group(url, mode="r").attrs)
    except Exception as err:  # a damaged zarr.json: JSON, metadata or codec errors
        raise StoreError(_damaged_metadata(url, "", err)) from None


def update_attrs(url: str, **attrs: Any) -> None:
    """Set the store's attributes ``attrs`` (others are kept)."""
    zarr.open_group(url, mode="r+", zarr_format=3).attrs.update(attrs)


def tile_rows(url: str) -> int:
    """Length of the store's ``tile`` axis as its arrays have it (ahead of ``n_tiles`` while an
    extension resizes them)."""
    return int(zarr.open_array(url, path="complete", mode="r", zarr_format=3).shape[0])


def resize_tiles(url: str, n_tiles: int) -> None:
    """Give every per-tile array ``n_tiles`` rows (metadata only: no shard file is written); arrays
    resized by an earlier, killed call are left as they are."""
    group = zarr.open_group(url, mode="r+", zarr_format=3)
    for _, arr in group.arrays():
        dims = arr.metadata.dimension_names or ()
        if dims and dims[0] == "tile" and arr.shape[0] != n_tiles:
            arr.resize((n_tiles,) + arr.shape[1:])
            crash_point("extend-resized")


def read_whole_array(url: str, name: str) -> np.ndarray | None:
    """Array ``name`` of the store at ``url`` read whole, straight from its own metadata (for checks of
    a store whose root metadata may be damaged); None when it cannot be read."""
    try:
        return np.asarray(zarr.open_array(url, path=name, mode="r", zarr_format=3)[:])
    except Exception:
        return None


def open_corpus(url: str) -> CorpusReader:
    """Open a corpus store for reading; raises :class:`StoreError` when ``url`` holds none."""
    return CorpusReader(url)
