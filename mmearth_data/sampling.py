"""Biome x year balanced sampling of global grid tiles, with reserves to backfill failures.

Data flow: world (biome map, land frame) + grid -> ``sample_plan`` -> a GeoDataFrame of planned tiles ->
the flow's shard plan -> sources.

Balance: the N primary tiles are split over the 14 biomes x the chosen years so that stratum counts
differ by at most one; a stratum whose land cannot hold its share (rare biomes at large N) is capped at
what it holds and the rest is spread over the others, still differing by at most one among uncapped
strata. Draws are area-uniform within a biome (cells weighted by cos(latitude)), the tile centre must
fall on the biome's own land, and every tile is used at most once (one year per location). Each primary
tile gets ``reserve`` alternates from its own stratum, tried in order when a source fails on it.
Everything is a pure function of (n_tiles, years, seed, tile size, reserve).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd

from mmearth_data.grid import (
    DEFAULT_TILE_SIZE,
    MAX_LAT,
    MIN_LAT,
    GlobalGrid,
    footprints,
    tile_transforms,
    utm_epsg,
)
from mmearth_data.registry import BIOME_CLASSES
from mmearth_data.world import CELL, World, get_world

log = logging.getLogger(__name__)
BIOMES = tuple(BIOME_CLASSES)
SPLITS = (("train", 0.90), ("val", 0.05), ("test", 0.05))


class SamplingError(ValueError):
    """The request cannot be sampled (bad counts, no land for a stratum)."""


def parse_years(text: str) -> tuple[int, ...]:
    """'2017-2020', '2018' or '2017,2019' (or both: '2017-2018,2020') -> the years, sorted; raises
    :class:`SamplingError` naming the accepted forms."""
    try:
        years: list[int] = []
        for part in text.split(","):
            if "-" in part.strip().lstrip("-"):
                a, b = (int(x) for x in part.split("-"))
                if b < a:
                    raise ValueError
                years += range(a, b + 1)
            else:
                years.append(int(part))
        return tuple(sorted(set(years)))
    except ValueError:
        raise SamplingError(f"years {text!r}: use a range like 2017-2020 or a list like 2017,2019") from None


DEFAULT_YEARS = (2017, 2018, 2019, 2020)  # MMEarth's four years


@dataclass(frozen=True)
class SampleConfig:
    n_tiles: int
    years: tuple[int, ...] = DEFAULT_YEARS
    seed: int = 0
    tile_size: int = DEFAULT_TILE_SIZE
    reserve: int = 2

    def __post_init__(self):
        if not isinstance(self.n_tiles, int) or self.n_tiles <= 0:
            raise SamplingError(f"number of tiles must be a positive integer, got {self.n_tiles!r}")
        if not self.years:
            raise SamplingError("at least one year is needed")
        if self.reserve < 0:
            raise SamplingError(f"reserve must be >= 0, got {self.reserve}")


def allocate(n: int, strata: list[tuple[int, int]], capacity: dict[tuple[int, int], int]) -> dict:
    """Split ``n`` over ``strata`` as evenly as possible under per-stratum ``capacity``.

    Uncapped strata differ by at most one; the remainder goes to the first strata in the given order.
    Raises :class:`SamplingError` when the total capacity is below ``n``.
    """
    total = sum(min(capacity[s], n) for s in strata)
    if total < n:
        raise SamplingError(f"only {total} tiles fit the requested strata, {n} were asked for")
    alloc = dict.fromkeys(strata, 0)
    open_ = list(strata)
    left = n
    while left > 0:
        share, extra = divmod(left, len(open_))
        capped = [s for s in open_ if capacity[s] - alloc[s] < share + (1 if extra else 0)]
        if not capped:
            for k, s in enumerate(open_):
                alloc[s] += share + (1 if k < extra else 0)
            left = 0
        else:
            for s in capped:
                left -= capacity[s] - alloc[s]
                alloc[s] = capacity[s]
            open_ = [s for s in open_ if s not in capped]
    return alloc


def split_of(lat: np.ndarray, lon: np.ndarray, splits=SPLITS, seed: int | None = None) -> np.ndarray:
    """Train / val / test by a stable hash of the 1-degree block (without ``seed``: the same for every
    corpus); ``splits`` gives (name, share) pairs."""
    out = []
    salt = "" if seed is None else f"{seed}:"
    for la, lo in zip(np.floor(lat).astype(int), np.floor(lon).astype(int), strict=True):
        u = int.from_bytes(hashlib.sha1(f"{salt}{la},{lo}".encode()).digest()[:8], "big") / 2**64
        acc = 0.0
        for name, p in splits:
            acc += p
            if u < acc:
                out.append(name)
                break
        else:  # shares summing to 1 up to rounding
            out.append(splits[-1][0])
    return np.array(out, dtype=object)


Labeler = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(lat, lon) -> (n, 3) array of (biome, ecoregion, distance_m); biome -1 where the location has no
label (outside every polygon within the labeler's reach)."""


class _BiomeStream:
    """Deterministic stream of accepted, unique grid cells inside one biome: cells are drawn from the
    world's biome map and accepted where the biome label (the world's, or ``labeler``'s) is this one."""

    def __init__(
        self,
        world: World,
        grid: GlobalGrid,
        biome: int,
        seed: int,
        labeler: Labeler | None = None,
        exclude: frozenset[tuple[int, int]] = frozenset(),
    ):
        self.world, self.grid, self.biome, self.labeler = world, grid, biome, labeler
        self.labels: dict[tuple[int, int], tuple[int, float]] = {}  # cell -> (ecoregion, distance_m)
        self.rejected = {"outside": 0, "other_biome": 0}
        cells = world.sampling_cells[biome]
        lat = 90 - (cells // 7200 + 0.5) * CELL
        w = np.cos(np.radians(lat))
        self.cells, self.p = cells, w / w.sum() if len(cells) else w
        self.rng = np.random.default_rng([seed, biome, 7])
        self.seen: set[tuple[int, int]] = set(exclude)  # grid cells taken already (an earlier plan)
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.exhausted = len(cells) == 0

    def take(self, k: int, max_rounds: int = 200) -> tuple[np.ndarray, np.ndarray]:
        rounds = 0
        while len(self.rows) < k and not self.exhausted:
            batch = max(256, 2 * (k - len(self.rows)))
            pick = self.rng.choice(len(self.cells), size=batch, p=self.p)
            c = self.cells[pick]
            lat = 90 - (c // 7200 + self.rng.random(batch)) * CELL
            lon = -180 + (c % 7200 + self.rng.random(batch)) * CELL
            rows, cols = self.grid.cell_of(lat, lon)
            clat, clon = self.grid.center(rows, cols)
            ok = (self.world.land_pct(clat, clon) >= 50) & (clat <= MAX_LAT) & (clat >= MIN_LAT)
            if self.labeler is None:
                ok &= self.world.biome(clat, clon) == self.biome
            before = len(self.rows)
            fresh = []
            for r, cc in zip(rows[ok], cols[ok], strict=True):
                key = (int(r), int(cc))
                if key not in self.seen:
                    self.seen.add(key)
                    fresh.append(key)
            if self.labeler is not None and fresh:
                fr = np.array([k[0] for k in fresh]), np.array([k[1] for k in fresh])
                labels = np.asarray(self.labeler(*self.grid.center(*fr)))
                keep = []
                for key, (b, eco, dist) in zip(fresh, labels, strict=True):
                    if b < 1:
                        self.rejected["outside"] += 1
                    elif int(b) != self.biome:
                        self.rejected["other_biome"] += 1
                    else:
                        self.labels[key] = (int(eco), float(dist))
                        keep.append(key)
                fresh = keep
            for key in fresh:
                self.rows.append(key[0])
                self.cols.append(key[1])
            rounds += 1
            if len(self.rows) == before and rounds > 3 or rounds >= max_rounds:
                self.exhausted = True
        n = min(k, len(self.rows))
        return np.array(self.rows[:n], np.int64), np.array(self.cols[:n], np.int64)


def biome_capacity(world: World, grid: GlobalGrid) -> dict[int, int]:
    """Conservative number of distinct grid tiles each biome can supply."""
    cap = {}
    for b, cells in world.sampling_cells.items():
        lat = 90 - (cells // 7200 + 0.5) * CELL
        area = np.sum(np.cos(np.radians(lat))) * (CELL * 111_195.0) ** 2
        cap[b] = int(0.3 * area / grid.spacing_m**2)
    return cap


def sample_plan(
    cfg: SampleConfig,
    world: World | None = None,
    labeler: Labeler | None = None,
    exclude: frozenset[tuple[int, int]] = frozenset(),
    first_slot: int = 0,
) -> gpd.GeoDataFrame:
    """Plan ``cfg.n_tiles`` primary tiles plus ``cfg.reserve`` alternates each.

    ``exclude`` holds grid cells ``(row, col)`` that must not be drawn (those an earlier plan of the
    same store holds, when a build extends it); slots then start at ``first_slot``.

    Strata are the world's biome map's, or ``labeler``'s when one is given (an Earth Engine build
    labels candidates with RESOLVE): candidates are drawn from the world's biome map and kept where the
    labeler agrees; ecoregions then come from the labeler too, and the plan records how many candidates
    were dropped (``attrs['labels']``: no label within reach, or another biome).

    Returns one row per candidate: ``slot`` (store index of the primary it stands for), ``rank`` (0 for
    the primary, 1.. for alternates), ``tile_id``, ``row``, ``col``, ``lat``, ``lon``, ``epsg``,
    ``transform`` (6 numbers), ``biome``, ``ecoregion``, ``year``, ``split`` and the WGS84 footprint.
    """
    world = world or get_world()
    grid = GlobalGrid(cfg.tile_size)
    years = tuple(sorted(set(cfg.years)))
    ny = len(years)
    per = 1 + cfg.reserve
    cap_biome = biome_capacity(world, grid)
    streams = {b: _BiomeStream(world, grid, b, cfg.seed, labeler, frozenset(exclude)) for b in BIOMES}
    # strata in a seeded order so that remainders do not always favour the same biomes
    order = np.random.default_rng([cfg.seed, 11]).permutation(len(BIOMES) * ny)
    strata = [(BIOMES[k // ny], years[k % ny]) for k in order]
    while True:
        capacity = {(b, y): cap_biome[b] // (ny * per) for b, y in strata}
        alloc = allocate(cfg.n_tiles, strata, capacity)
        short = False
        for b in BIOMES:
            need = sum(alloc[(b, y)] for y in years) * per
            rows, _ = streams[b].take(need)
            if len(rows) < need:
                cap_biome[b] = len(rows)
                short = True
                log.info("biome %d holds only %d candidate tiles; rebalancing", b, len(rows))
        if not short:
            break

    records = []
    for b in BIOMES:
        counts = {y: alloc[(b, y)] for y in years}
        total = sum(counts.values())
        rows, cols = streams[b].take(total * per)
        # primaries round-robin over years, then alternates the same way
        yr_seq = []
        for phase_count in (counts, {y: c * cfg.reserve for y, c in counts.items()}):
            left = dict(phase_count)
            while any(left.values()):
                for y in years:
                    if left[y]:
                        yr_seq.append(y)
                        left[y] -= 1
        for k, (r, c, y) in enumerate(zip(rows, cols, yr_seq, strict=True)):
            records.append((b, y, int(r), int(c), k < total))
    df = pd.DataFrame(records, columns=["biome", "year", "row", "col", "primary"])
    labels = None
    if labeler is not None:
        got = [streams[b].labels[(r, c)] for b, r, c in zip(df["biome"], df["row"], df["col"], strict=True)]
        labels = (np.array([g[0] for g in got], np.int64), np.array([g[1] for g in got], np.float64))
    gdf = assemble_plan(df, cfg, grid, world, first_slot, labels)
    if labeler is not None:
        gdf.attrs["labels"] = {
            "outside": sum(st.rejected["outside"] for st in streams.values()),
            "other_biome": sum(st.rejected["other_biome"] for st in streams.values()),
            "accepted": sum(len(st.labels) for st in streams.values()),
        }
    return gdf


def assemble_plan(
    df: pd.DataFrame,
    cfg: SampleConfig,
    grid: GlobalGrid,
    world: World,
    first_slot: int = 0,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
) -> gpd.GeoDataFrame:
    """The plan from drawn cells (``df``: biome, year, row, col, primary; alternates of a stratum in
    the order they are tried): primaries get store slots in a seeded random order (every shard mixes
    strata), each primary its stratum's next ``cfg.reserve`` alternates; then ids, UTM grids,
    ecoregions (the world's, or ``labels``' (ecoregion, distance)), splits and WGS84 footprints."""
    df = df.reset_index(drop=True)
    # store slots: primaries in a seeded random order, so every shard mixes strata
    prim = df.index[df.primary].to_numpy()
    perm = np.random.default_rng([cfg.seed, 13]).permutation(len(prim))
    slot = np.full(len(df), -1, np.int64)
    rank = np.zeros(len(df), np.int64)
    slot[prim[perm]] = first_slot + np.arange(len(prim))
    # alternates: the j-th primary of a stratum gets the stratum's alternates j*reserve .. +reserve
    if cfg.reserve:
        primary = df["primary"].to_numpy()
        for idx in df.groupby(["biome", "year"], sort=False).indices.values():
            p, alts = idx[primary[idx]], idx[~primary[idx]]
            n = min(len(alts), len(p) * cfg.reserve)
            slot[alts[:n]] = slot[p[np.arange(n) // cfg.reserve]]
            rank[alts[:n]] = np.arange(n) % cfg.reserve + 1
    df["slot"], df["rank"] = slot, rank
    order = df.sort_values(["slot", "rank"]).index.to_numpy()
    df = df.loc[order].reset_index(drop=True)

    lat, lon = grid.center(df["row"].to_numpy(), df["col"].to_numpy())
    epsg = utm_epsg(lat, lon)
    transforms = tile_transforms(lat, lon, epsg, cfg.tile_size)
    df["tile_id"] = grid.tile_ids(df["row"].to_numpy(), df["col"].to_numpy())
    df["lat"], df["lon"], df["epsg"] = lat, lon, epsg
    df["transform"] = list(transforms)
    if labels is None:
        df["ecoregion"] = world.ecoregion(lat, lon)
    else:  # in the drawn order, before the sort by slot
        df["ecoregion"] = labels[0][order]
        df["label_distance_m"] = labels[1][order]
    df["split"] = split_of(lat, lon)
    df = df.drop(columns=["primary"])
    cols = [
        "slot",
        "rank",
        "tile_id",
        "row",
        "col",
        "lat",
        "lon",
        "epsg",
        "transform",
        "biome",
        "ecoregion",
        "year",
        "split",
    ]
    if labels is not None:
        cols.append("label_distance_m")
    gdf = gpd.GeoDataFrame(df[cols], geometry=footprints(transforms, epsg, cfg.tile_size), crs="EPSG:4326")
    gdf.attrs.update(
        n_tiles=cfg.n_tiles,
        years=sorted(set(cfg.years)),
        seed=cfg.seed,
        tile_size=cfg.tile_size,
        reserve=cfg.reserve,
        grid_spacing_m=grid.spacing_m,
    )
    return gdf


def cells_in(footprint, grid: GlobalGrid) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the grid cells whose whole tile lies inside ``footprint`` (a WGS84 polygon)."""
    import shapely

    lon0, lat0, lon1, lat1 = footprint.bounds
    rows = np.arange(int(np.floor(lat0 / grid.dlat)), int(np.ceil(lat1 / grid.dlat)) + 1)
    out_r, out_c = [], []
    for r in rows:
        n = int(grid.n_cols(np.array([r]))[0])
        step = 360.0 / n
        cols = np.arange(int(np.floor(lon0 / step)), int(np.ceil(lon1 / step)) + 1)
        out_r.append(np.full(len(cols), r)), out_c.append(cols)
    rows, cols = np.concatenate(out_r), np.concatenate(out_c)
    lat, lon = grid.center(rows, cols)
    epsg = utm_epsg(lat, lon)
    polys = footprints(tile_transforms(lat, lon, epsg, grid.size), epsg, grid.size)
    inside = shapely.contains(footprint, polys)
    return rows[inside], cols[inside]


def sample_in_footprints(
    cfg: SampleConfig,
    scenes: list[tuple[object, int]],
    world: World | None = None,
    exclude: frozenset[tuple[int, int]] = frozenset(),
    first_slot: int = 0,
) -> gpd.GeoDataFrame:
    """Plan tiles inside the footprints of a source's own scenes (``scenes``: WGS84 polygon, year), for
    sources that hold only some places (local rasters): every grid cell whose whole tile lies in a
    scene of one of ``cfg.years`` is a candidate (once per year it is covered), strata are the world's
    biomes x years, and the tiles are split over the strata the scenes reach as evenly as their
    candidates allow (the balance is what the footprints hold, recorded in ``attrs['balance']``, not
    promised); alternates as in :func:`sample_plan`. Raises :class:`SamplingError` when the footprints
    hold fewer cells than tiles asked."""
    world = world or get_world()
    grid = GlobalGrid(cfg.tile_size)
    cand, n_cells = _footprint_cells(cfg, scenes, grid, exclude)
    lat, lon = grid.center(cand["row"].to_numpy(), cand["col"].to_numpy())
    cand["biome"] = np.asarray(world.biome(lat, lon), np.int64)
    cand = cand.iloc[np.random.default_rng([cfg.seed, 17]).permutation(len(cand))].reset_index(drop=True)
    df = _pick_in_footprints(cand, cfg)
    gdf = assemble_plan(df, cfg, grid, world, first_slot)
    prim = df[df["primary"]]
    gdf.attrs["balance"] = {
        "candidates": n_cells,
        "strata": {f"{b}/{y}": int(n) for (b, y), n in prim.groupby(["biome", "year"]).size().items()},
        "note": "tiles inside the rasters' footprints: strata as even as the footprints allow",
    }
    return gdf


def _footprint_cells(
    cfg: SampleConfig, scenes: list[tuple[object, int]], grid: GlobalGrid, exclude: frozenset[tuple[int, int]]
) -> tuple[pd.DataFrame, int]:
    """(grid cells whose whole tile lies in a scene of one of the years, once per year covered; how
    many distinct cells), or :class:`SamplingError` when they are fewer than the tiles asked."""
    years = sorted(set(cfg.years))
    parts = []
    for poly, year in scenes:
        if year in years:
            r, c = cells_in(poly, grid)
            parts.append(pd.DataFrame({"row": r, "col": c, "year": year}))
    cand = pd.concat(parts) if parts else pd.DataFrame({"row": [], "col": [], "year": []}, dtype=np.int64)
    cand = cand.drop_duplicates().reset_index(drop=True)
    if exclude:
        keep = [(r, c) not in exclude for r, c in zip(cand["row"], cand["col"], strict=True)]
        cand = cand[np.array(keep, bool)].reset_index(drop=True)
    n_cells = len(cand[["row", "col"]].drop_duplicates())
    if n_cells < cfg.n_tiles:
        raise SamplingError(
            f"the rasters' scenes of {', '.join(map(str, years))} hold {n_cells} tiles of {cfg.tile_size} px"
            f" (whole tiles inside a scene), fewer than the {cfg.n_tiles} asked; ask for fewer `n_tiles`, a "
            "smaller `tile_size`, other `years`, or add rasters"
        )
    return cand, n_cells


def _pick_in_footprints(cand: pd.DataFrame, cfg: SampleConfig) -> pd.DataFrame:
    """Primaries spread over the (biome, year) strata as evenly as the cells allow, each cell used
    once, then alternates: rows (biome, year, row, col, primary)."""
    per = 1 + cfg.reserve
    strata = sorted({(int(b), int(y)) for b, y in zip(cand["biome"], cand["year"], strict=True)})
    counts = cand.groupby(["biome", "year"]).size()
    capacity = {s: int(counts[s]) // per for s in strata}
    if sum(capacity.values()) < cfg.n_tiles:  # too few for full reserves: fewer alternates
        capacity = {s: int(counts[s]) for s in strata}
    while True:  # a cell covered in two years counts in two strata: take, then rebalance if short
        alloc = allocate(cfg.n_tiles, strata, capacity)
        used: set[tuple[int, int]] = set()
        picks: dict[tuple[int, int], list[int]] = {s: [] for s in strata}
        groups = cand.groupby(["biome", "year"]).indices
        for s in strata:
            for i in groups[s]:
                if len(picks[s]) == alloc[s]:
                    break
                cell = (int(cand.at[i, "row"]), int(cand.at[i, "col"]))
                if cell not in used:
                    used.add(cell)
                    picks[s].append(i)
        short = {s: len(picks[s]) for s in strata if len(picks[s]) < alloc[s]}
        if not short:
            break
        capacity |= short
    records = []
    for s in strata:
        alts = []
        for i in groups[s]:
            if len(alts) == alloc[s] * cfg.reserve:
                break
            cell = (int(cand.at[i, "row"]), int(cand.at[i, "col"]))
            if cell not in used:
                used.add(cell)
                alts.append(i)
        records += [(s[0], s[1], int(cand.at[i, "row"]), int(cand.at[i, "col"]), True) for i in picks[s]]
        records += [(s[0], s[1], int(cand.at[i, "row"]), int(cand.at[i, "col"]), False) for i in alts]
    return pd.DataFrame(records, columns=["biome", "year", "row", "col", "primary"])


def primaries(plan: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    return plan[plan["rank"] == 0]


def stratum_counts(plan: gpd.GeoDataFrame) -> pd.DataFrame:
    """Primary tiles per biome (rows) x year (columns)."""
    p = primaries(plan)
    return pd.crosstab(p["biome"], p["year"]).reindex(BIOMES, fill_value=0)
