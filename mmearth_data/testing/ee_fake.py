"""Simulated Earth Engine transports, for the tests, ``bench/ee_sim.py`` and ``mmearth ee-check
--simulate``. They answer in the exact formats of ``computeValue`` (the recipe's values dictionary, the
RESOLVE label rows) and ``computePixels`` with ``NUMPY_NDARRAY`` (a structured ``(H, W)`` array, one
field per requested band, masked float pixels as ``FLOAT_FILL``), with a latency, and fail on a script:
429 bursts, 5xx, timeouts, 4xx, malformed payloads, missing bands and tiles without a Sentinel-2 scene,
as ``HttpError``s or as the ``EEException``s ``ee.data`` raises. Every request received is checked the
way the service would: serialised as strict JSON, and the pixel expression's band plumbing evaluated
(:mod:`.ee_graph`) against the archives' band lists, so a request the service would refuse fails here.
They record calls per tile and the peak number of requests in flight.

:class:`SimulatedTransport` answers with random values of the right types; :class:`OfflineWorldTransport`
answers with the offline source's physically coherent tiles, so checks of physics can run offline.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmearth_data.registry import ERA5_BANDS, S2_BANDS, get

FAILURES = (
    "no_scene",
    "malformed",
    "missing_band",
    "http_500_always",
    "http_400",
    "http_429_twice",
    "timeout_once",
)
L2A_BANDS = [b for b in S2_BANDS if b != "B10"] + [
    "AOT", "WVP", "SCL", "TCI_R", "TCI_G", "TCI_B", "MSK_CLDPRB", "MSK_SNWPRB", "QA10", "QA20", "QA60",
]  # fmt: skip
L1C_BANDS = list(S2_BANDS) + ["QA10", "QA20", "QA60"]
# Earth Engine's error texts, as ee.data's EEException carries them (the service's messages)
EE_MESSAGES = {
    "quota": "Quota exceeded for quota metric 'Number of read requests' and limit 'Number of read requests "
    "per minute per user' of service 'earthengine.googleapis.com' for consumer 'project_number:1'.",
    "concurrent": "Too many concurrent aggregations.",
    "internal": "An internal error has occurred (request: 5c1b6a9e-8f3d-4c1e-9b7a-2d4f6e8a0c12).",
    "unavailable": "The service is currently unavailable.",
    "deadline": "Deadline exceeded",
    "timed_out": "Computation timed out.",
    "user_memory": "User memory limit exceeded.",
    "invalid": 'Invalid JSON payload received. Unexpected token.\n{"constantValue": NaN}',
    "bad_band": "Image.select: Pattern 'B99' did not match any bands.",
    "too_large": "Total request size (56623104 bytes) must be less than or equal to 50331648 bytes.",
}


def http_error(status: int, message: str = "simulated"):
    """A googleapiclient HttpError with Google's JSON error body, as the API client raises it."""
    import httplib2
    from googleapiclient.errors import HttpError

    body = {"error": {"code": status, "message": message, "status": "SIMULATED"}}
    return HttpError(httplib2.Response({"status": status}), json.dumps(body).encode())


def ee_exception(message: str):
    """The exception ``ee.data`` raises for a failed call: an EEException holding only the message."""
    from ee.ee_exception import EEException

    return EEException(message)


def catalog_bands(asset: str) -> list[str]:
    """Band names of the Earth Engine assets the recipe loads (an image id or a collection id), as the
    catalog lists them. Sentinel-1 slices are dual VV+VH unless the id says 1SDH (HH+HV)."""
    if asset.startswith("COPERNICUS/S2_SR_HARMONIZED"):
        return L2A_BANDS
    if asset.startswith("COPERNICUS/S2_HARMONIZED"):
        return L1C_BANDS
    if asset.startswith("COPERNICUS/S1_GRD"):
        return ["HH", "HV", "angle"] if "_1SDH_" in asset else ["VV", "VH", "angle"]
    if asset.startswith("COPERNICUS/DEM/GLO30"):
        return ["DEM", "EDM", "FLM", "HEM", "WBM"]
    if asset.startswith("GOOGLE/DYNAMICWORLD/V1"):
        return ["water", "trees", "grass", "flooded_vegetation", "crops", "shrub_and_scrub", "built",
                "bare", "snow_and_ice", "label"]  # fmt: skip
    if asset.startswith("ESA/WorldCover"):
        return ["Map"]
    if asset.startswith("users/nlang/ETH_GlobalCanopyHeight"):
        return ["b1"]
    raise KeyError(f"no band list for asset {asset}")


def scene_bands(s2_bands: list[str] | tuple[str, ...] | None):
    """:func:`catalog_bands`, except that a Sentinel-2 scene has the bands its values answer listed
    (scenes processed since 2022 add MSK_CLASSI_*; some L2A scenes lack MSK_CLDPRB)."""

    def bands(asset: str) -> list[str]:
        if s2_bands is not None and asset.startswith(
            ("COPERNICUS/S2_SR_HARMONIZED/", "COPERNICUS/S2_HARMONIZED/")
        ):
            return list(s2_bands)
        return catalog_bands(asset)

    return bands


def strict_json(text: str) -> Any:
    """Parse as the service does: NaN, Infinity and -Infinity are not JSON."""

    def refuse(token: str):
        raise ValueError(f"Invalid JSON payload received. Unexpected token {token}")

    return json.loads(text, parse_constant=refuse)


def _nodes(x: Any):
    """Every dictionary of a serialised expression graph, depth first."""
    if isinstance(x, dict):
        yield x
        for v in x.values():
            yield from _nodes(v)
    elif isinstance(x, list):
        for v in x:
            yield from _nodes(v)


def pinned_scene_id(graph: dict) -> str | None:
    """The scene id a values request pins its tile to (``Filter.equals`` on ``system:index``), if any."""
    values = graph.get("values", {})

    def const(arg: Any) -> Any:
        while isinstance(arg, dict) and "valueReference" in arg:
            arg = values.get(arg["valueReference"])
        return arg.get("constantValue") if isinstance(arg, dict) else None

    for node in _nodes(graph):
        f = node.get("functionInvocationValue")
        if f and f.get("functionName") == "Filter.equals":
            a = f.get("arguments", {})
            if const(a.get("leftField")) == "system:index":
                return const(a.get("rightValue"))
    return None


def label_coordinates(graph: dict) -> list[list[float]]:
    """The [lon, lat] list that a RESOLVE labelling request carries (its one constant list of pairs)."""
    for node in _nodes(graph):
        v = node.get("constantValue")
        if isinstance(v, list) and v and all(isinstance(p, list) and len(p) == 2 for p in v):
            return v
    return []


@dataclass
class SimulatedTransport:
    """``plan`` maps tile ids to one of :data:`FAILURES`; ``failure_share`` picks a failure for other
    tiles from a hash of the id (0: all succeed). ``burst_429``: the first N tile requests of the run get 429.
    ``ee_errors``: fail as ``ee.data`` does (EEException with the service's text) instead of HttpError.
    RESOLVE labels come from the offline world's biome map, with ``label_noise`` of the points given
    another biome and ``label_outside`` of them no polygon in reach."""

    latency_s: float = 0.0
    plan: dict[str, str] = field(default_factory=dict)
    failure_share: float = 0.0
    burst_429: int = 0
    seed: int = 0
    ee_errors: bool = False
    label_noise: float = 0.1
    label_outside: float = 0.02
    calls: Counter = field(default_factory=Counter)
    in_flight: int = 0
    peak: int = 0
    total: int = 0
    label_points: int = 0
    label_requests: int = 0
    label_failures: int = 0  # the first N labelling requests answer 503
    first_start: float | None = None
    last_end: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _answers: dict = field(default_factory=dict)
    _pixel_cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from mmearth_data.testing.ee_offline import init_offline

        init_offline()  # expressions are built for real, offline

    def failure_of(self, tile_id: str) -> str | None:
        if tile_id in self.plan:
            return self.plan[tile_id]
        if self.failure_share <= 0:
            return None
        h = zlib.crc32(f"{self.seed}/{tile_id}".encode())
        if (h % 10_000) / 10_000 >= self.failure_share:
            return None
        return FAILURES[(h // 10_000) % len(FAILURES)]

    def _enter(self, tile_id: str, kind: str) -> int:
        with self._lock:
            self.in_flight += 1
            if kind != "labels":
                self.total += 1
            self.peak = max(self.peak, self.in_flight)
            self.calls[(tile_id, kind)] += 1
            if kind == "labels":
                self.label_requests += 1
            elif self.first_start is None:  # the export's first request
                self.first_start = time.perf_counter()
            return self.total

    def _exit(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self.last_end = time.perf_counter()

    def _error(self, status: int, key: str):
        return ee_exception(EE_MESSAGES[key]) if self.ee_errors else http_error(status, EE_MESSAGES[key])

    def _common(self, tile_id: str, kind: str) -> str | None:
        n = self._enter(tile_id, kind)
        try:
            if self.latency_s:
                time.sleep(self.latency_s)
            if kind == "labels":
                with self._lock:
                    self.label_failures -= 1
                    fail = self.label_failures >= 0
                if fail:
                    raise self._error(503, "unavailable")
                return None
            if n <= self.burst_429:
                raise self._error(429, "quota")
            f = self.failure_of(tile_id)
            k = self.calls[(tile_id, kind)]
            if f == "http_500_always":
                raise self._error(500, "internal")
            if f == "http_400" and kind == "pixels":
                raise self._error(400, "bad_band")
            if f == "http_429_twice" and k <= 2:
                raise self._error(429, "concurrent")
            if f == "timeout_once" and k == 1:
                raise TimeoutError("The read operation timed out")
            return f
        finally:
            self._exit()

    # --- computeValue ---------------------------------------------------------------------------
    def compute_value(self, expression: Any, tile_id: str) -> Any:
        graph = strict_json(expression.serialize(for_cloud_api=True))
        if tile_id.startswith("resolve-labels"):
            return self._labels(graph, tile_id)
        f = self._common(tile_id, "values")
        if f == "no_scene":
            return {"n_scenes": 0}
        answer = self.values_answer(tile_id)
        pinned = pinned_scene_id(graph)
        if pinned is not None and pinned != answer["s2_id"]:  # the archive holds no such scene
            return {"n_scenes": 0}
        with self._lock:
            self._answers[tile_id] = answer
        return answer

    def _labels(self, graph: dict, tile_id: str) -> list:
        from mmearth_data.world import get_world

        self._common(tile_id, "labels")
        coords = np.array(label_coordinates(graph), float)
        with self._lock:
            self.label_points += len(coords)
        lon, lat = coords[:, 0], coords[:, 1]
        w = get_world()
        biome = w.biome(lat, lon).astype(int)
        eco = w.ecoregion(lat, lon).astype(int)
        rows = []
        for i, (la, lo, b, e) in enumerate(zip(lat, lon, biome, eco, strict=True)):
            u = (zlib.crc32(f"{self.seed}/{la:.5f},{lo:.5f}".encode()) % 10_000) / 10_000
            if u < self.label_outside or b < 1:
                rows.append([i, -1, -1, -1])
                continue
            if u < self.label_outside + self.label_noise:  # RESOLVE disagrees with the proxy map
                b = b % 14 + 1
            rows.append([i, int(b), int(e), 0.0 if u > 0.3 else round(u * 3000, 1)])
        return rows

    def values_answer(self, tile_id: str) -> dict[str, Any]:
        r = np.random.default_rng(zlib.crc32(tile_id.encode()))
        year = 2017 + zlib.crc32(tile_id.encode()) % 4
        t = np.datetime64(f"{year}-01-01") + int(r.integers(0, 365))
        t_ms = int(t.astype("datetime64[ms]").astype(np.int64)) + 37_000_000
        product = "L2A" if year >= 2019 or r.random() < 0.4 else "L1C"
        day = str(t).replace("-", "")
        out: dict[str, Any] = {
            "n_scenes": int(r.integers(1, 30)),
            "s2_product": product,
            "s2_id": f"{day}T101031_{day}T101029_T32TNS",
            "s2_time": t_ms,
            "s2_bands": L2A_BANDS if product == "L2A" else L1C_BANDS,
            "s2_cloud": float(r.uniform(0, 10)),
            "s2_cloud_source": "cloud_score_plus",
            "s2_granule_cloud": float(r.uniform(0, 60)),
            "era5": [float(v) for v in r.uniform(250, 300, len(ERA5_BANDS))],
            "n_dynamic_world": int(r.integers(0, 40)) if r.random() < 0.97 else 0,
            "n_dem": 1 if r.random() < 0.98 else 0,
        }
        polar = r.random() < 0.05
        for orbit, p in (("s1_asc", 0.85), ("s1_desc", 0.85)):
            if r.random() >= p:
                out[orbit] = {"ids": []}
                continue
            dt = int(r.integers(-30, 31)) * 86_400_000
            mode = "1SDH" if polar else "1SDV"
            ids = [
                f"S1A_IW_GRDH_{mode}_{day}T0{k}0000_{day}T0{k}0025_0{k}" for k in range(int(r.integers(1, 3)))
            ]
            out[orbit] = {"ids": ids, "time": t_ms + dt, "pols": ["HH", "HV"] if polar else ["VV", "VH"],
                          "rel_orbit": int(r.integers(1, 176))}  # fmt: skip
        return out

    # --- computePixels --------------------------------------------------------------------------
    def compute_pixels(self, request: dict[str, Any], tile_id: str) -> Any:
        from mmearth_data.sources.ee_graph import band_plumbing

        graph = strict_json(request["expression"].serialize(for_cloud_api=True))
        answer = self._answers.get(tile_id) or {}
        plumbing = band_plumbing(graph, scene_bands(answer.get("s2_bands")))  # refused as the service would
        grid = request["grid"]
        assert request["fileFormat"] == "NUMPY_NDARRAY", request["fileFormat"]
        assert grid["crsCode"].startswith("EPSG:"), grid
        assert list(plumbing) == list(request["bandIds"]), "bandIds differ from the expression's bands"
        f = self._common(tile_id, "pixels")
        if f == "malformed":
            return b"\x89HDF\r\n truncated"
        w, h = grid["dimensions"]["width"], grid["dimensions"]["height"]
        bands = list(request["bandIds"])
        if f == "missing_band":
            bands = bands[:-1]
        out = self.pixels_answer(tile_id, bands, h, w)
        for b in bands:  # a masked placeholder comes back as the value it was unmasked with
            if plumbing[b].masked:
                out[b] = _unmasked_fill(b)
        return out

    def pixels_answer(self, tile_id: str, bands: list[str], h: int, w: int) -> np.ndarray:
        """Random values of each band's kind: one field per band, drawn once per (bands, size) and
        shifted per tile (so that a simulated service costs little CPU beside the code under test)."""
        key = (tuple(bands), h, w)
        with self._lock:
            base = self._pixel_cache.get(key)
        if base is None:
            base = self._random_pixels(bands, h, w)
            with self._lock:
                self._pixel_cache[key] = base
        return np.roll(base, zlib.crc32(tile_id.encode()) % (h * w))

    def _random_pixels(self, bands: list[str], h: int, w: int) -> np.ndarray:
        r = np.random.default_rng(self.seed + 1)
        dtype = [(b, _ee_dtype(b)) for b in bands]
        out = np.zeros((h, w), dtype=dtype)
        for b, _ in dtype:
            name = b.split("__")[0]
            if name == "sentinel2":
                out[b] = r.integers(200, 4000, (h, w))
            elif name == "sentinel2_masks":
                out[b] = r.integers(0, 3, (h, w)) if b.endswith("QA60") else r.integers(4, 7, (h, w))
            elif name == "dynamic_world":
                out[b] = r.integers(1, 10, (h, w))
            elif name == "esa_worldcover":
                out[b] = r.choice([10, 20, 30, 40, 50, 60, 80], (h, w))
            elif name == "canopy_height":
                out[b] = r.integers(0, 30, (h, w))
            elif name == "sentinel1":
                out[b] = r.normal(-12, 3, (h, w))
            else:
                out[b] = r.normal(300, 50, (h, w))
        return out


def _unmasked_fill(band_id: str) -> float:
    from mmearth_data.sources.earthengine import EE_DTYPES, FLOAT_FILL

    m = get(band_id.split("__")[0])
    return FLOAT_FILL if EE_DTYPES[m.dtype] == "float32" else m.fill


def _ee_dtype(band_id: str) -> str:
    from mmearth_data.sources.earthengine import EE_DTYPES

    m = get(band_id.split("__")[0])
    return {"uint8": "u1", "uint16": "<u2", "float32": "<f4"}[EE_DTYPES[m.dtype]]


@dataclass
class OfflineWorldTransport(SimulatedTransport):
    """Answers with the offline source's tile for each requested tile (``tiles``: tile id -> request):
    the scene date, Sentinel-1 orbits and ERA5 values in the values answer, and the tile's arrays in the
    pixels answer, in Earth Engine's formats (masked float pixels as ``FLOAT_FILL``). For exercising
    code that checks physics (``mmearth ee-check --simulate``) without the service."""

    tiles: dict = field(default_factory=dict)
    label_noise: float = 0.0
    label_outside: float = 0.0
    _results: dict = field(default_factory=dict)

    def _result(self, tile_id: str):
        from mmearth_data.registry import stored_modalities
        from mmearth_data.sources.offline import OfflineSource

        with self._lock:
            if tile_id not in self._results:
                t = self.tiles[tile_id]
                self._results[tile_id] = OfflineSource(seed=self.seed).fetch([t], stored_modalities())[0]
            return self._results[tile_id]

    def values_answer(self, tile_id: str) -> dict[str, Any]:
        res = self._result(tile_id)
        base = super().values_answer(tile_id)
        t_ms = int(res.s2_date.astype("datetime64[ms]").astype(np.int64)) + 37_000_000
        day = str(res.s2_date).replace("-", "")
        base.update(
            s2_product=res.s2_product,
            s2_id=f"{day}T101031_{day}T101029_T00XXX",
            s2_time=t_ms,
            s2_bands=L2A_BANDS if res.s2_product == "L2A" else L1C_BANDS,
            s2_cloud=100.0 * float(res.extra.get("cloud_fraction", 0.0)),
            era5=[None if not np.isfinite(v) else float(v) for v in res.arrays["era5"]],
        )
        for orbit, key in (("asc", "s1_asc"), ("desc", "s1_desc")):
            s1 = res.arrays["sentinel1"][0 if orbit == "asc" else 4 : 4 if orbit == "asc" else 8]
            pols = [
                p for p, band in zip(("VV", "VH", "HH", "HV"), s1, strict=True) if np.isfinite(band).any()
            ]
            if not pols:
                base[key] = {"ids": []}
            else:
                mode = "1SDH" if "HH" in pols else "1SDV"
                dt = (-2 if orbit == "asc" else 3) * 86_400_000 + 3_600_000  # passes near the S2 date
                sid = f"S1A_IW_GRDH_{mode}_{day}T050000_{day}T050025_{orbit}"
                base[key] = {"ids": [sid], "time": t_ms + dt, "pols": pols, "rel_orbit": 1}
        return base

    def pixels_answer(self, tile_id: str, bands: list[str], h: int, w: int) -> np.ndarray:
        from mmearth_data.sources.earthengine import FLOAT_FILL

        res = self._result(tile_id)
        out = np.zeros((h, w), dtype=[(b, _ee_dtype(b)) for b in bands])
        for b in bands:
            name, band = b.split("__")
            m = get(name)
            v = res.arrays[name][list(m.bands).index(band)]
            if v.dtype.kind == "f":
                v = np.where(np.isfinite(v), v, FLOAT_FILL)
            out[b] = v
        return out
