"""``mmearth ee-check``: the first thing to run after setting up Earth Engine.

Data flow: four fixed tiles (desert, rainforest on a river, boreal forest in late winter, high
mountains) -> RESOLVE labels (one batched request) -> the earthengine source's two requests per tile,
sent one after the other under Earth Engine's profiler -> a temporary store (the real writer) -> read
back -> physical checks that real data pass and broken plumbing fails: every band that the scene has
holds data, VV above VH over land, forest NDVI above desert NDVI, water dark in the near infrared,
slope consistent with the DEM's own gradient, annual temperature falling with latitude. Prints each
check with its value and threshold, and the EECU the requests used (from Earth Engine's computation
profiles). Exit 0 when every check passes, 1 when one fails, 2 when it cannot run (no network, no
credentials, no project), before anything is written.

``--simulate`` runs the same code against the offline world (:class:`OfflineWorldTransport`), to see
what the command does without an account; it says so in every line it prints.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmearth_data.registry import ERA5_BANDS, S2_BANDS, stored_modalities
from mmearth_data.sources.base import SourceError, TileFailure, TileRequest, TileResult

# name: (lat, lon, year, months the scene may come from, what it shows)
CHECK_TILES: dict[str, tuple[float, float, int, tuple[int, int] | None, str]] = {
    "desert": (23.0, 12.0, 2019, None, "Sahara, bare sand and rock"),
    "rainforest": (-2.62, -60.85, 2019, None, "Anavilhanas, forest islands in the Rio Negro"),
    "boreal_winter": (61.9, 25.9, 2019, (3, 3), "Finnish taiga under snow, March"),
    "mountains": (46.55, 8.0, 2020, (7, 9), "Bernese Alps, summer"),
}
B = {b: i for i, b in enumerate(S2_BANDS)}
WC_TREES, WC_WATER = 10, 80


HOST_OVERRIDE: tuple[str, int] | None = None  # (host, port) to probe as well (tests: a dead port)


class EECheckError(RuntimeError):
    """ee-check cannot run (no network, credentials or project); nothing was written."""


@dataclass
class Check:
    name: str
    passed: bool
    value: str
    expect: str


def check_tiles(size: int = 128) -> list[TileRequest]:
    return [TileRequest.at(lat, lon, year, size) for lat, lon, year, _, _ in CHECK_TILES.values()]


def reach(host: str, port: int = 443, timeout_s: float = 5.0) -> None:
    """Raise :class:`EECheckError` unless ``host:port`` can be reached (the source's own probe,
    :func:`~mmearth_data.sources.earthengine.check_reachable`, proxy included)."""
    from mmearth_data.sources.base import SourceError
    from mmearth_data.sources.earthengine import check_reachable

    try:
        check_reachable(host, timeout_s, port=port, name=f"Earth Engine at {host}:{port}")
    except SourceError as err:
        raise EECheckError(str(err)) from None


def eecu_from_profile(text: str) -> float | None:
    """Total EECU-seconds in the text of Earth Engine's computation profiles (``Profile.getProfiles``):
    the sum of the column whose header says EECU; None when no such column is found."""
    total, col, found = 0.0, None, False
    for line in text.splitlines():
        cells = line.split()
        if col is None:
            for k, cell in enumerate(cells):
                if "EECU" in cell.upper():
                    col = k
            continue
        if len(cells) > col and re.fullmatch(r"[0-9.]+(e-?[0-9]+)?", cells[col]):
            total += float(cells[col])
            found = True
    return total if found else None


# --- checks on the tiles, as read back from the store ------------------------------------------------
def _clear(a: dict[str, np.ndarray]) -> np.ndarray:
    """Pixels without cloud or shadow by the stored masks (QA60 flags, and SCL where the scene has it)."""
    scl, _, flags = a["sentinel2_masks"]
    return (flags == 0) & ~np.isin(scl, (3, 8, 9, 10))


def _ndvi(s2: np.ndarray, sel: np.ndarray) -> float:
    nir, red = s2[B["B8"]][sel].astype(float), s2[B["B4"]][sel].astype(float)
    ok = (nir + red) > 0
    return float(np.median((nir[ok] - red[ok]) / (nir[ok] + red[ok]))) if ok.any() else float("nan")


def physical_checks(tiles: dict[str, dict[str, Any]]) -> list[Check]:
    """``tiles``: name -> {'request', 'arrays', 'present', 's2_product'} as read back from the store."""
    return [check(tiles) for check in PHYSICAL_CHECKS]


def _bands_present(tiles: dict[str, dict[str, Any]]) -> Check:
    """Every band that the scene has holds data."""
    empty = []
    for name, t in tiles.items():
        a = t["arrays"]
        for k, b in enumerate(S2_BANDS):
            if not (b == "B10" and t["s2_product"] == "L2A") and (a["sentinel2"][k] == 0).all():
                empty.append(f"{name}:sentinel2.{b}")
        for k, b in enumerate(("elevation", "slope")):
            if np.isnan(a["dem"][k]).all():
                empty.append(f"{name}:dem.{b}")
        if not np.isfinite(a["era5"]).all():
            empty.append(f"{name}:era5")
        s1 = a["sentinel1"].astype(np.float32)
        for orbit, base in (("asc", 0), ("desc", 4)):
            got = [np.isfinite(s1[base + k]).any() for k in range(4)]
            if t["s1_ids"][orbit] and not any(got):
                empty.append(f"{name}:sentinel1.{orbit}")
    return Check("no band all-empty where the scene exists", not empty, ", ".join(empty) or "none", "none")


def _vv_above_vh(tiles: dict[str, dict[str, Any]]) -> Check:
    """VV above VH over land (median dB per tile and orbit)."""
    diffs = []
    for t in tiles.values():
        s1 = t["arrays"]["sentinel1"].astype(np.float32)
        land = t["arrays"]["esa_worldcover"][0] != WC_WATER
        for base in (0, 4):
            vv, vh = s1[base], s1[base + 1]
            ok = land & np.isfinite(vv) & np.isfinite(vh)
            if ok.sum() > 100:
                diffs.append(float(np.median(vv[ok] - vh[ok])))
    return Check(
        "VV above VH over land (median dB per tile and orbit)",
        bool(diffs) and min(diffs) > 3.0,
        ", ".join(f"{d:.1f}" for d in diffs) or "no VV/VH data",
        "> 3 dB each",
    )


def _forest_greener_than_desert(tiles: dict[str, dict[str, Any]]) -> Check:
    """NDVI of forest above desert."""
    rf, de = tiles["rainforest"]["arrays"], tiles["desert"]["arrays"]
    forest = _ndvi(rf["sentinel2"], (rf["esa_worldcover"][0] == WC_TREES) & _clear(rf))
    desert = _ndvi(de["sentinel2"], _clear(de))
    return Check(
        "NDVI of forest above desert (clear pixels)",
        bool(forest - desert > 0.3),
        f"forest {forest:.2f}, desert {desert:.2f}",
        "forest > desert + 0.3",
    )


def _water_dark_in_nir(tiles: dict[str, dict[str, Any]]) -> Check:
    """Water dark in NIR."""
    water, land = [], []
    for t in tiles.values():
        a = t["arrays"]
        wc, nir = a["esa_worldcover"][0], a["sentinel2"][B["B8"]].astype(float)
        clear = _clear(a) & (nir > 0)
        water += nir[(wc == WC_WATER) & clear].tolist()
        land += nir[(wc == WC_TREES) & clear].tolist()
    w = float(np.median(water)) if len(water) >= 50 else float("nan")
    ln = float(np.median(land)) if land else float("nan")
    return Check(
        "water dark in NIR (B8 over WorldCover water vs trees)",
        bool(w < 1000 and w < 0.5 * ln),
        f"water {w:.0f} ({len(water)} px), trees {ln:.0f}",
        "water < 1000 and < half of trees",
    )


def _slope_matches_dem(tiles: dict[str, dict[str, Any]]) -> Check:
    """Slope consistent with the DEM's gradient (mountains): the stored slope is GLO-30's on its 30 m
    grid, resampled, so it agrees with the 10 m gradient of the resampled elevation loosely (r about 0.7
    on rough terrain) and not at all when slope and elevation come from different places."""
    z, slope = tiles["mountains"]["arrays"]["dem"].astype(float)
    gy, gx = np.gradient(z, 10.0)
    own = np.degrees(np.arctan(np.hypot(gx, gy)))[2:-2, 2:-2]
    st = slope[2:-2, 2:-2]
    ok = np.isfinite(own) & np.isfinite(st)
    r = float(np.corrcoef(own[ok], st[ok])[0, 1]) if ok.sum() > 100 else float("nan")
    ratio = float(np.median(st[ok]) / max(np.median(own[ok]), 1e-6)) if ok.any() else float("nan")
    med = float(np.median(st[ok])) if ok.any() else float("nan")
    return Check(
        "slope consistent with the DEM's gradient (mountains)",
        bool(r > 0.6 and 0.7 < ratio < 1.3),
        f"r = {r:.2f}, median ratio {ratio:.2f}, median slope {med:.1f} deg",
        "r > 0.6, ratio 0.7-1.3",
    )


def _temperature_falls_with_latitude(tiles: dict[str, dict[str, Any]]) -> Check:
    """Annual 2 m temperature falling with latitude."""
    k = ERA5_BANDS.index("year_t2m")
    lat = np.array([abs(t["request"].lat) for t in tiles.values()])
    t2m = np.array([float(t["arrays"]["era5"][k]) for t in tiles.values()])
    corr = float(np.corrcoef(lat, t2m)[0, 1]) if np.isfinite(t2m).all() else float("nan")
    return Check(
        "annual 2 m temperature falling with latitude",
        bool(corr < -0.7),
        ", ".join(f"{la:.0f}: {v - 273.15:.1f} C" for la, v in zip(lat, t2m, strict=True))
        + f" (r = {corr:.2f})",
        "r(|lat|, t2m) < -0.7",
    )


PHYSICAL_CHECKS = (
    _bands_present,
    _vv_above_vh,
    _forest_greener_than_desert,
    _water_dark_in_nir,
    _slope_matches_dem,
    _temperature_falls_with_latitude,
)


# --- the run ----------------------------------------------------------------------------------------
def run_ee_check(
    options: dict[str, Any],
    simulate: bool = False,
    keep: str | None = None,
    say: Callable[[str], None] = print,
) -> tuple[list[Check], dict[str, Any]]:
    """Build the four tiles and check them. Raises :class:`EECheckError` when it cannot run."""
    from mmearth_data.sources.earthengine import (
        EarthEngineSource,
        EEConfig,
        register_transport,
    )
    from mmearth_data.store import CorpusReader, StoreWriter, create_store

    tiles = check_tiles()
    base = {k: v for k, v in options.items() if v is not None}
    if simulate:
        from mmearth_data.testing.ee_fake import OfflineWorldTransport

        register_transport("ee-check-simulated", OfflineWorldTransport(tiles={t.tile_id: t for t in tiles}))
        base["transport"] = "ee-check-simulated"
    probe = EarthEngineSource(EEConfig(**base))
    try:
        probe.check(128, stored_modalities())
    except SourceError as err:
        raise EECheckError(str(err)) from None
    if not simulate and HOST_OVERRIDE:  # the real endpoint was probed by the source's check above
        reach(*HOST_OVERRIDE)
    profile_ids: list[str] = []
    t0 = time.perf_counter()
    with _profiling(simulate, profile_ids.append):
        try:
            labels = probe.label_locations([t.lat for t in tiles], [t.lon for t in tiles])
        except SourceError as err:
            raise EECheckError(str(err)) from None
        results: list[TileResult | TileFailure] = []
        for name, t, (biome, eco, _) in zip(CHECK_TILES, tiles, labels, strict=True):
            months = CHECK_TILES[name][3]
            src = EarthEngineSource(EEConfig(**base, months=months))
            req = TileRequest(
                t.tile_id, t.lat, t.lon, t.epsg, t.transform, t.size, t.year, int(biome), int(eco), "test"
            )
            say(f"{'(simulated) ' if simulate else ''}{name}: {t.tile_id} ({t.lat:.3f}, {t.lon:.3f}) ...")
            res = src.fetch_one(req, stored_modalities())
            if isinstance(res, TileResult):
                res.request = req
            results.append(res)
    seconds = time.perf_counter() - t0
    failed = [r for r in results if isinstance(r, TileFailure)]
    if failed:
        return [
            Check(f"tile {f.tile_id} delivered", False, f"{f.stage}: {f.reason}", "a scene and both requests")
            for f in failed
        ], {"seconds": seconds, "eecu_s": None}
    folder = keep or tempfile.mkdtemp(prefix="mmearth-ee-check-")
    store = f"{folder.rstrip('/')}/ee-check.zarr"
    try:
        mods = stored_modalities()
        create_store(store, n_tiles=4, tile_size=128, modalities=mods, chunk_tiles=4, shard_tiles=4,
                     attrs={"build": {"source": probe.describe(), "purpose": "ee-check"}})  # fmt: skip
        StoreWriter(store).write_shard(0, results)
        reader = CorpusReader(store)
        arrays = reader.read([m.name for m in mods], 0, 4)
        meta = reader.tiles()
        by_name = {}
        for k, name in enumerate(CHECK_TILES):
            by_name[name] = {
                "request": tiles[k],
                "arrays": {m.name: arrays[m.name][k] for m in mods},
                "s2_product": meta["s2_product"].iloc[k],
                "s1_ids": {o: meta[f"s1_ids_{o}"].iloc[k] for o in ("asc", "desc")},
            }
        checks = physical_checks(by_name)
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    eecu = None if simulate else _eecu(profile_ids)
    return checks, {"seconds": seconds, "eecu_s": eecu, "store": store if keep else None, "tiles": meta}


class _profiling:
    """``ee.data.profiling`` around the real requests (they run on this thread); nothing when simulated."""

    def __init__(self, simulate: bool, hook: Callable[[str], None]):
        self.simulate, self.hook, self.ctx = simulate, hook, None

    def __enter__(self):
        if not self.simulate:
            import ee

            self.ctx = ee.data.profiling(self.hook)
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _eecu(profile_ids: list[str]) -> float | None:
    if not profile_ids:
        return None
    try:
        import ee

        text = ee.data.computeValue(
            ee.ApiFunction.lookup("Profile.getProfiles").call(ids=profile_ids, format="text")
        )
        return eecu_from_profile(str(text))
    except Exception:  # the profile service is best effort; the checks stand without it
        return None
