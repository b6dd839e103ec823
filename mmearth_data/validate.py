"""Check a corpus store against the contract of shared/DESIGN.md and summarise what it holds.

Data flow: store -> ``validate_store`` -> report (``valid``, ``problems``, summary tables) -> CLI.
Checks: schema version; every modality's array (dims, dtype, fill, shape, band names); per-tile
variables; completeness; georeferencing (UTM EPSG, north-up 10 m transform whose centre is the tile's
lat/lon); unique, well-formed tile ids; absent modalities stored as pure fill; statistics present;
every array compressed with lossless codecs only. ``deep=True`` also re-reads every chunk of every
per-tile array (failing CRC32C chunk checksums, truncated or undecodable chunks) and compares each
complete tile's values of each modality with the checksum recorded when it was written (a deleted
shard file reads back as fill and fails there); damaged tiles are listed by index, id and array, and
``mmearth repair`` re-exports them (:func:`repair_store`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mmearth_data.grid import GlobalGrid, tile_center_lonlat
from mmearth_data.registry import BIOME_CLASSES
from mmearth_data.store import (
    SCHEMA_VERSION,
    TILE_VARS,
    CorpusReader,
    StoreError,
    read_whole_array,
    strings,
    tile_checksum,
)

# codecs that give back exactly what was written (lossy ones such as bitround or quantize are refused)
LOSSLESS_CODECS = frozenset(
    {"bytes", "blosc", "zstd", "gzip", "crc32c", "transpose", "numcodecs.pcodec", "vlen-utf8", "vlen-bytes"}
)


def _same_fill(a: Any, b: Any) -> bool:
    try:
        if np.isnan(float(a)) and np.isnan(float(b)):
            return True
    except (TypeError, ValueError):
        pass
    return a == b


def deep_check(r: CorpusReader) -> list[dict[str, Any]]:
    """Damaged tiles: ``{"index", "tile_id", "array", "problem"}`` for every complete tile whose chunk of
    some per-tile array cannot be read, or whose values of a modality differ from their checksum."""
    n = r.n_tiles
    damaged: list[dict[str, Any]] = []
    complete = np.zeros(n, bool)
    unreadable_flags = []
    for a, b, v, err in r.blocks("complete"):
        if err:
            unreadable_flags.append((a, b, err))
            complete[a:b] = True  # unknown: check the tiles as if complete
        else:
            complete[a:b] = v
    ids = np.full(n, "", dtype=object)
    for a, b, v, _ in r.blocks("tile_id"):
        if v is not None:
            ids[a:b] = strings(v)

    def mark(a, b, array, problem):
        damaged.extend(
            {"index": i, "tile_id": str(ids[i]), "array": array, "problem": problem}
            for i in range(a, b)
            if complete[i]
        )

    for a, b, err in unreadable_flags:
        mark(a, b, "complete", f"unreadable ({err})")
    per_tile = [v.name for v in TILE_VARS if r.has(v.name)] + [f"{m.name}_present" for m in r.modalities]
    for name in per_tile:
        for a, b, _, err in r.blocks(name):
            if err:
                mark(a, b, name, f"unreadable ({err})")
    for m, own, own_ok in _recorded_checksums(r, mark):
        for a, b, v, err in r.blocks(m.name):
            if err:
                mark(a, b, m.name, f"unreadable ({err})")
                continue
            for i in range(a, b):
                if own_ok[i] and tile_checksum(v[i - a]) != own[i]:
                    mark(i, i + 1, m.name, "values differ from the checksum written with them")
    return sorted(damaged, key=lambda d: (d["index"], d["array"]))


def _recorded_checksums(r: CorpusReader, mark) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    """(modality, checksum per tile, whether it is known) for each modality of the store: from the
    ``checksum`` columns, or for a modality added later from its own ``checksum_<name>`` and
    ``<name>_complete``; unreadable chunks of those are reported through ``mark``."""
    n = r.n_tiles
    names = list(r.column("modality")) if r.has("checksum") else []
    sums = np.zeros((n, max(len(names), 1)), np.uint32)
    sums_ok = np.zeros(n, bool)
    if names:
        for a, b, v, err in r.blocks("checksum"):
            if err:
                mark(a, b, "checksum", f"unreadable ({err})")
            else:
                sums[a:b], sums_ok[a:b] = v, True
    for m in r.modalities:
        own, own_ok = sums[:, 0].copy(), sums_ok.copy()
        if r.has(f"checksum_{m.name}"):
            own_ok[:] = False
            pairs = zip(r.blocks(f"checksum_{m.name}"), r.blocks(f"{m.name}_complete"), strict=True)
            for (a, b, v, err), (_, _, f, ferr) in pairs:
                if err or ferr:
                    which = f"checksum_{m.name}" if err else f"{m.name}_complete"
                    mark(a, b, which, f"unreadable ({err or ferr})")
                else:
                    own[a:b], own_ok[a:b] = v, f
        elif m.name in names:
            own = sums[:, names.index(m.name)]
        else:
            own_ok[:] = False
        yield m, own, own_ok


def metadata_damage(url: str) -> list[dict[str, Any]]:
    """Damaged tiles by metadata: for every missing or unreadable ``zarr.json`` (checked against the
    copy the build keeps), every complete tile of that array (the root's: of every array) is listed as
    in :func:`deep_check`; tile ids and flags are read straight from their arrays where those can be."""
    from mmearth_data.artifacts import damaged_metadata

    copy, problems = damaged_metadata(url)
    if not problems:
        return []

    def array(name: str) -> np.ndarray | None:
        if f"{name}/zarr.json" in problems:
            return None
        return read_whole_array(url, name)

    ids, complete = array("tile_id"), array("complete")
    if ids is None and complete is None:
        import json

        n = int(json.loads(copy["zarr.json"])["attributes"]["n_tiles"]) if copy else 0
    else:
        n = len(ids) if ids is not None else len(complete)
    ids = strings(ids) if ids is not None else np.full(n, "", dtype=object)
    complete = complete if complete is not None else np.ones(n, bool)
    out = []
    for key, problem in sorted(problems.items()):
        name = "zarr.json (root: every array)" if key == "zarr.json" else key[: -len("/zarr.json")]
        out += [
            {"index": int(i), "tile_id": str(ids[i]), "array": name, "problem": f"{key} {problem}"}
            for i in np.flatnonzero(complete)
        ]
    return out


def _damage_report(url: str, damaged: list[dict[str, Any]]) -> list[str]:
    by_array: dict[str, list] = {}
    for d in damaged:
        by_array.setdefault(d["array"], []).append(d)
    problems = []
    for array, ds in by_array.items():
        shown = ", ".join(f"{d['index']} ({d['tile_id'] or '?'})" for d in ds[:6])
        more = f" and {len(ds) - 6} more" if len(ds) > 6 else ""
        problems.append(f"{array}: {len(ds)} damaged tiles ({ds[0]['problem']}): {shown}{more}")
    problems.append(f"run `mmearth repair --store {url}` to restore them")
    return problems


def validate_store(url: str, deep: bool = False) -> dict[str, Any]:
    """The report on the store at ``url``: ``valid``, ``problems`` (each naming what is wrong and what
    to do), the summary tables, and with ``deep`` the ``damaged`` tiles."""
    if deep:
        damaged = metadata_damage(url)
        if damaged:
            return {
                "store": url,
                "valid": False,
                "problems": _damage_report(url, damaged),
                "damaged": damaged,
            }
    try:
        r = CorpusReader(url)
    except StoreError as err:
        return {"store": url, "valid": False, "problems": [str(err)]}
    problems: list[str] = []
    if deep:
        damaged = deep_check(r)
        if damaged:
            return {
                "store": url,
                "valid": False,
                "problems": _damage_report(url, damaged),
                "damaged": damaged,
            }
        if not r.has("checksum"):
            problems.append("no per-tile checksums (a store of schema < 1.2): only chunk reads were checked")
    problems += _schema_problems(r)
    if problems:
        return {"store": url, "valid": False, "problems": problems}
    meta = r.tiles()
    problems += _content_problems(r, meta)
    summary = _summary(r, meta)
    return {"store": url, "valid": not problems, "problems": problems, "summary": summary}


def _schema_problems(r: CorpusReader) -> list[str]:
    """How the store's arrays differ from the contract (schema version, dims, dtype, fill, shape, band
    names, flags, lossless codecs, per-tile variables)."""
    problems = []
    if r.attrs.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema version {r.attrs.get('schema_version')!r}, expected {SCHEMA_VERSION!r}")
    names = r.array_names
    for m in r.modalities:
        if m.name not in names:
            problems.append(f"modality {m.name}: array missing")
            continue
        a = r.layout(m.name)
        if a.dims != m.dims():
            problems.append(f"{m.name}: dims {a.dims}, expected {m.dims()}")
        if a.dtype != m.np_dtype:
            problems.append(f"{m.name}: dtype {a.dtype}, expected {m.dtype}")
        if not _same_fill(a.fill, m.fill):
            problems.append(f"{m.name}: fill value {a.fill}, expected {m.fill}")
        if a.shape != m.shape(r.n_tiles, r.tile_size):
            problems.append(f"{m.name}: shape {a.shape}, expected {m.shape(r.n_tiles, r.tile_size)}")
        if not m.scalar:
            if m.band_dim not in names:
                problems.append(f"{m.name}: band coordinate {m.band_dim} missing")
            elif r.band_names(m) != list(m.bands):
                problems.append(f"{m.name}: band names differ from the registry")
        if f"{m.name}_present" not in names:
            problems.append(f"{m.name}_present flag missing")
        if m.name in (r.attrs.get("added_modalities") or ()):
            for extra in (f"{m.name}_complete", f"checksum_{m.name}"):
                if extra not in names:
                    problems.append(f"{m.name} was added to the tiles, but {extra} is missing")
        lossy = [c for c in a.codecs if c not in LOSSLESS_CODECS]
        if lossy:
            problems.append(
                f"{m.name}: codec {', '.join(lossy)} is not lossless; the contract allows "
                f"{', '.join(sorted(LOSSLESS_CODECS))} (rebuild with `compression` compact or portable)"
            )
    problems += [f"per-tile variable {v.name} missing" for v in TILE_VARS if v.name not in names]
    return problems


def _content_problems(r: CorpusReader, meta: Any) -> list[str]:
    """What the tiles' values break: completeness, ids, georeferencing, absent modalities that hold
    data, missing statistics."""
    problems = []
    complete = meta["complete"].to_numpy()
    if not complete.all():
        problems.append(
            f"{int((~complete).sum())} of {r.n_tiles} tiles are not complete (re-run the build to resume)"
        )
    done = meta[complete]
    ids = done["tile_id"].astype(str)
    if ids.duplicated().any():
        problems.append(f"{int(ids.duplicated().sum())} duplicate tile ids")
    bad_ids = [t for t in ids if not _well_formed(t)]
    if bad_ids:
        problems.append(f"{len(bad_ids)} malformed tile ids, e.g. {bad_ids[0]!r}")
    if len(done):
        problems += _georef_problems(done, r.tile_size)
        for m in r.modalities:
            absent = np.nonzero(complete & ~meta[f"{m.name}_present"].to_numpy())[0]
            for i in absent[:8]:
                if not np.all(m.is_fill(r.read([m.name], int(i), int(i) + 1)[m.name])):
                    problems.append(f"{m.name}: tile {i} flagged absent but holds data")
                    break
    stats = r.statistics
    for m in r.modalities:
        if m.name == "sentinel2_masks":
            continue
        if m.name not in stats:
            problems.append(f"statistics for {m.name} missing (run the build's statistics step)")
        elif m.name == "sentinel2":
            for level in set(done["s2_product"].astype(str)):
                if level not in stats[m.name]:
                    problems.append(f"statistics for sentinel2 {level} missing")
    return problems


def _georef_problems(done: Any, tile_size: int) -> list[str]:
    """UTM EPSG codes, north-up 10 m transforms on the integer grid, centres at the tiles' lat/lon."""
    problems = []
    epsg = done["epsg"].to_numpy()
    if not np.all(((epsg > 32600) & (epsg <= 32660)) | ((epsg > 32700) & (epsg <= 32760))):
        problems.append("EPSG codes outside the UTM zones")
    tr = np.stack(done["transform"].to_numpy())
    if not (np.allclose(tr[:, 0], 10) and np.allclose(tr[:, 4], -10) and np.allclose(tr[:, [1, 3]], 0)):
        problems.append("transforms are not north-up 10 m grids")
    if not np.allclose(np.mod(tr[:, [2, 5]], 10), 0):
        problems.append("transform origins are not on the integer 10 m grid")
    lon, lat = tile_center_lonlat(tr, epsg, tile_size)
    off = np.hypot(lat - done["lat"], (lon - done["lon"]) * np.cos(np.radians(lat)))
    if np.any(off > 0.01):
        problems.append(f"{int((off > 0.01).sum())} tiles whose transform centre is >1 km from lat/lon")
    return problems


def _summary(r: CorpusReader, meta: Any) -> dict[str, Any]:
    """Tiles per biome x year, share present and codec per modality, Sentinel-2 levels, history."""
    complete = meta["complete"].to_numpy()
    done = meta[complete]
    summary: dict[str, Any] = {
        "n_tiles": r.n_tiles,
        "complete": int(complete.sum()),
        "tile_size": r.tile_size,
    }
    summary["codecs"] = {
        m.name: [c for c in r.layout(m.name).codecs if c not in ("bytes", "crc32c")] for m in r.modalities
    }
    if "biome" in meta and len(done):
        years = sorted(int(y) for y in done["year"].unique())
        summary["biome_x_year"] = {
            int(b): {y: int(((done["biome"] == b) & (done["year"] == y)).sum()) for y in years}
            for b in BIOME_CLASSES
        }
    summary["present_share"] = {
        m.name: float(done[f"{m.name}_present"].mean()) if len(done) else 0.0 for m in r.modalities
    }
    summary["s2_products"] = done["s2_product"].astype(str).value_counts().to_dict()
    shown = ("action", "tiles", "added", "modalities", "complete", "years", "version", "started", "finished")
    summary["history"] = [
        {k: h.get(k) for k in shown} | {"source": (h.get("source") or {}).get("source")}
        for h in r.attrs.get("history") or []
    ]
    return summary


def _well_formed(tile_id: str) -> bool:
    try:
        GlobalGrid.parse_id(tile_id)
        return True
    except ValueError:
        return False


def print_report(report: dict[str, Any], console) -> None:
    from rich.table import Table

    s = report.get("summary", {})
    if "biome_x_year" in s:
        years = sorted({y for row in s["biome_x_year"].values() for y in row})
        t = Table(title=f"tiles per biome x year ({s['complete']}/{s['n_tiles']} complete)")
        t.add_column("biome")
        for y in years:
            t.add_column(str(y), justify="right")
        for b, row in s["biome_x_year"].items():
            t.add_row(f"{b} {BIOME_CLASSES[b][:40]}", *[str(row[y]) for y in years])
        console.print(t)
    if "present_share" in s:
        t = Table(title="share of tiles with each modality, and its codec")
        t.add_column("modality")
        t.add_column("present", justify="right")
        t.add_column("codec")
        codecs = s.get("codecs", {})
        for name, share in s["present_share"].items():
            t.add_row(name, f"{share:.1%}", " + ".join(codecs.get(name, [])))
        console.print(t)
    if s.get("history"):
        t = Table(title="history: the builds that wrote this store")
        for col in ("build", "tiles", "added", "complete", "years", "source", "version", "started"):
            t.add_column(col)
        t.add_column("finished")

        def when(iso: str | None) -> str:
            return iso[:16].replace("T", " ") if iso else "-"

        for h in s["history"]:
            a, b = h["tiles"]
            t.add_row(
                h["action"], f"{a}..{b - 1}",
                "+" + ",".join(h["modalities"]) if h.get("modalities") else str(h["added"]),
                str(h.get("complete", "-")),
                ",".join(map(str, h["years"])), str(h["source"]), str(h["version"]), when(h["started"]),
                when(h["finished"]) if h["finished"] else "running or stopped",
            )  # fmt: skip
        console.print(t)
    if report["valid"]:
        console.print(f"[bold green]valid[/]: {report['store']}")
    else:
        console.print(f"[bold red]not valid[/]: {report['store']}")
        for p in report["problems"]:
            console.print(f"  - {p}")
