"""A simulated Earth Engine transport: answers in the exact formats of ``computeValue`` (a dict) and
``computePixels`` with ``NUMPY_NDARRAY`` (a structured ``(H, W)`` array, one field per requested band),
with a latency, and fails on a script: 429 bursts, 5xx, timeouts, 4xx, malformed payloads, missing
bands and tiles without a Sentinel-2 scene. It checks every request it receives (band ids, grid) and
records calls per tile and the peak number of requests in flight. Used by the tests and bench/ee_sim.py.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmearth_data.registry import ERA5_BANDS

FAILURES = (
    "no_scene",
    "malformed",
    "missing_band",
    "http_500_always",
    "http_400",
    "http_429_twice",
    "timeout_once",
)


def http_error(status: int, message: str = "simulated"):
    """A googleapiclient HttpError with Google's JSON error body, as ee.data raises for HTTP failures."""
    import json

    import httplib2
    from googleapiclient.errors import HttpError

    body = {"error": {"code": status, "message": message, "status": "SIMULATED"}}
    return HttpError(httplib2.Response({"status": status}), json.dumps(body).encode())


@dataclass
class SimulatedTransport:
    """``plan`` maps tile ids to one of :data:`FAILURES`; ``rule`` picks a failure for other tiles from a
    hash of the id (``None``: all succeed). ``burst_429``: the first N requests of the run get 429."""

    latency_s: float = 0.0
    plan: dict[str, str] = field(default_factory=dict)
    failure_share: float = 0.0
    burst_429: int = 0
    seed: int = 0
    calls: Counter = field(default_factory=Counter)
    in_flight: int = 0
    peak: int = 0
    total: int = 0
    first_start: float | None = None
    last_end: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        from mmearth_data.sources.ee_offline import init_offline

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
            self.total += 1
            self.peak = max(self.peak, self.in_flight)
            self.calls[(tile_id, kind)] += 1
            if self.first_start is None:
                self.first_start = time.perf_counter()
            return self.total

    def _exit(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self.last_end = time.perf_counter()

    def _common(self, tile_id: str, kind: str) -> str | None:
        n = self._enter(tile_id, kind)
        try:
            if self.latency_s:
                time.sleep(self.latency_s)
            if n <= self.burst_429:
                raise http_error(429, "Too many concurrent requests")
            f = self.failure_of(tile_id)
            k = self.calls[(tile_id, kind)]
            if f == "http_500_always":
                raise http_error(500, "Internal error")
            if f == "http_400" and kind == "pixels":
                raise http_error(400, "Image.select: Pattern 'B99' did not match any bands")
            if f == "http_429_twice" and k <= 2:
                raise http_error(429, "Quota exceeded")
            if f == "timeout_once" and k == 1:
                raise TimeoutError("The read operation timed out")
            return f
        finally:
            self._exit()

    def compute_value(self, expression: Any, tile_id: str) -> Any:
        expression.serialize(for_cloud_api=True)  # a real, serialisable expression
        f = self._common(tile_id, "values")
        if f == "no_scene":
            return {"n_scenes": 0}
        r = np.random.default_rng(zlib.crc32(tile_id.encode()))
        year = 2017 + zlib.crc32(tile_id.encode()) % 4
        t = np.datetime64(f"{year}-01-01") + int(r.integers(0, 365))
        return {
            "n_scenes": int(r.integers(1, 30)),
            "s2_id": f"{year}0601T101031_{year}0601T101029_T32TNS",
            "s2_time": int(t.astype("datetime64[ms]").astype(np.int64)),
            "s2_cloud": float(r.uniform(0, 10)),
            "s1_asc": bool(r.random() < 0.85),
            "s1_desc": bool(r.random() < 0.85),
            "era5": [float(v) for v in r.uniform(250, 300, len(ERA5_BANDS))],
            "biome": int(r.integers(1, 15)),
            "ecoregion": int(r.integers(1, 847)),
        }

    def compute_pixels(self, request: dict[str, Any], tile_id: str) -> Any:
        request["expression"].serialize(for_cloud_api=True)
        grid = request["grid"]
        assert request["fileFormat"] == "NUMPY_NDARRAY", request["fileFormat"]
        assert grid["crsCode"].startswith("EPSG:"), grid
        f = self._common(tile_id, "pixels")
        if f == "malformed":
            return b"\x89HDF\r\n truncated"
        w, h = grid["dimensions"]["width"], grid["dimensions"]["height"]
        bands = list(request["bandIds"])
        if f == "missing_band":
            bands = bands[:-1]
        r = np.random.default_rng(zlib.crc32(tile_id.encode()) + 1)
        dtype = []
        for b in bands:
            name = b.split("__")[0]
            dtype.append((b, {"sentinel2": "<u2", "sentinel2_masks": "u1", "dynamic_world": "u1",
                              "esa_worldcover": "u1", "canopy_height": "u1"}.get(name, "<f4")))  # fmt: skip
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
