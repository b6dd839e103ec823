"""The Earth Engine source: MMEarth's recipe as real ``ee`` expressions, two requests per tile.

Data flow: :class:`TileRequest` -> :func:`tile_values_expression` (one ``computeValue``: the chosen
scenes, ERA5's 12 values, RESOLVE labels) and :func:`pixels_request` (one ``computePixels`` of every
pixel modality stacked on the tile's own grid, NUMPY_NDARRAY) -> :class:`TileResult`.

Only :class:`EETransport` talks to Earth Engine (``ee.data.computeValue`` / ``ee.data.computePixels``).
Everything above it -- the recipe, request sizing, retries with backoff and jitter, the cap on requests
in flight, failure accounting -- is plain code that tests drive with a fake transport.

The recipe (fields in the registry's ``EERecipe`` entries; MMEarth's choices with its bugs fixed):

- Sentinel-2: ``COPERNICUS/S2_SR_HARMONIZED`` (L2A) from ``l2a_from`` on, ``COPERNICUS/S2_HARMONIZED`` (L1C)
  before (``--s2-level`` forces one). Scenes of the tile's year that contain the whole tile with
  ``CLOUDY_PIXEL_PERCENTAGE`` below ``max_scene_cloud`` (10); the least cloudy one (or a seeded random
  one, ``scene_choice='random'``, as MMEarth's code did). SCL, MSK_CLDPRB and QA60 go to
  ``sentinel2_masks`` (QA60 as 1 = opaque, 2 = cirrus). L2A has no B10: stored as fill.
- The tile's grid is the plan's: its UTM zone and an integer 10 m grid, passed to ``computePixels`` as
  the exact affine transform, so no sub-pixel shift (MMEarth's export could shift by one).
- Sentinel-1 ``COPERNICUS/S1_GRD``, IW, dual polarisation: per orbit direction the scene closest in time
  to the S2 scene within ``max_gap_days`` (30; MMEarth had no bound), angle dropped.
- DEM ``COPERNICUS/DEM/GLO30`` elevation and ``ee.Terrain.slope``; ERA5-Land monthly: previous month, S2
  month, and the 12 months ending with the S2 month (MMEarth's window had 13); Dynamic World: mode of the
  S2 year's labels (+1: classes 1-9); ESA WorldCover v100; ETH canopy height 2020 and its standard
  deviation (uint8, fill 255); RESOLVE biome and ecoregion at the tile centre. Continuous bands are
  resampled bilinearly, categorical ones by nearest neighbour.

Sampling stays local and deterministic (the plan's grid and biome/year balance); the stored biome and
ecoregion labels are RESOLVE's, read in the tile-values request.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import random
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mmearth_data.registry import ERA5_BANDS, S1_BANDS, S2_BANDS, Modality, get
from mmearth_data.sources.base import SourceError, TileFailure, TileRequest, TileResult, empty_arrays

log = logging.getLogger(__name__)

YEARS = range(2016, 2026)
REQUEST_LIMIT_BYTES = 48 * 1024 * 1024  # computePixels' response limit
HIGH_VOLUME_URL = "https://earthengine-highvolume.googleapis.com"
SEP = "__"  # band names in the stacked image: <modality>__<band>
EE_DTYPES = {"uint8": "uint8", "uint16": "uint16", "float16": "float32", "float32": "float32"}
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
RETRYABLE_EE_MESSAGES = (
    "too many concurrent",
    "quota",
    "rate limit",
    "computation timed out",
    "backend error",
)


# --- configuration and credentials ------------------------------------------------------------------
@dataclass(frozen=True)
class EEConfig:
    """Options of the Earth Engine source (all have CLI flags; none is secret except ``key_file``)."""

    project: str | None = None
    key_file: str | None = None  # service-account JSON key; never logged nor stored
    high_volume: bool = True
    max_in_flight: int = 40
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 64.0
    timeout_s: float = 300.0
    max_scene_cloud: float = 10.0
    scene_choice: str = "least_cloudy"  # or "random"
    s2_level: str = "auto"  # auto | L2A | L1C
    l2a_from: str = "2019-01-01"
    max_gap_days: int = 30
    seed: int = 0
    transport: str | None = None  # name of a registered transport (tests, simulations)

    def level_for(self, year: int) -> str:
        if self.s2_level in ("L2A", "L1C"):
            return self.s2_level
        return "L2A" if np.datetime64(f"{year}-12-31") >= np.datetime64(self.l2a_from) else "L1C"


class EEAuthError(SourceError):
    """Missing or unusable Earth Engine credentials or project."""


def resolve_project(cfg: EEConfig) -> str:
    project = cfg.project or os.environ.get("EE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT")
    if not project:
        raise EEAuthError(
            "Earth Engine needs a Google Cloud project registered for Earth Engine: pass --project P "
            "(or set EE_PROJECT / GOOGLE_CLOUD_PROJECT)"
        )
    return project


def credentials(cfg: EEConfig) -> tuple[Any, str]:
    """(credentials, kind) from a service-account key file, application-default credentials, or the
    token ``earthengine authenticate`` saved; raises :class:`EEAuthError` saying how to get one."""
    import ee

    key = cfg.key_file or os.environ.get("EE_SERVICE_ACCOUNT_KEY")
    if key:
        if not os.path.isfile(key):
            raise EEAuthError(f"service-account key file {key} does not exist")
        import json

        with open(key) as f:
            email = json.load(f).get("client_email")
        if not email:
            raise EEAuthError(f"{key} is not a service-account key (no client_email)")
        return ee.ServiceAccountCredentials(email, key), "service_account"
    try:
        import google.auth

        creds, _ = google.auth.default(
            scopes=[
                "https://www.googleapis.com/auth/earthengine",
                "https://www.googleapis.com/auth/cloud-platform",
            ]
        )
        return creds, "application_default"
    except Exception:  # no ADC configured: try the earthengine CLI's token
        pass
    try:
        return ee.data.get_persistent_credentials(), "earthengine_authenticate"
    except Exception as err:
        raise EEAuthError(
            "no Earth Engine credentials found: use --ee-key KEY.json (service account), "
            "`gcloud auth application-default login`, or `earthengine authenticate`"
        ) from err


# --- the transport boundary -------------------------------------------------------------------------
class Transport(Protocol):
    """Sends one request; ``tile_id`` only labels it (logs, simulations)."""

    def compute_value(self, expression: Any, tile_id: str) -> Any: ...

    def compute_pixels(self, request: dict[str, Any], tile_id: str) -> np.ndarray: ...


class EETransport:
    """The only code that sends requests: ``ee.data.computeValue`` and ``ee.data.computePixels``."""

    def __init__(self, cfg: EEConfig):
        import ee

        creds, self.credential_kind = credentials(cfg)
        self.project = resolve_project(cfg)
        ee.Initialize(creds, project=self.project, opt_url=HIGH_VOLUME_URL if cfg.high_volume else None)
        socket.setdefaulttimeout(cfg.timeout_s)

    def compute_value(self, expression: Any, tile_id: str) -> Any:
        import ee

        return ee.data.computeValue(expression)

    def compute_pixels(self, request: dict[str, Any], tile_id: str) -> np.ndarray:
        import ee

        return ee.data.computePixels(request)


_TRANSPORTS: dict[str, Transport] = {}


def register_transport(name: str, transport: Transport) -> None:
    """Make ``transport`` available as ``EEConfig(transport=name)`` (fakes and simulations)."""
    _TRANSPORTS[name] = transport


# --- rate and failure handling ----------------------------------------------------------------------
class PermanentError(Exception):
    """A request that must not be retried (4xx other than 429, a bad expression, a malformed payload)."""


def status_of(err: BaseException) -> int | None:
    resp = getattr(err, "resp", None)  # googleapiclient.errors.HttpError
    status = getattr(resp, "status", None) if resp is not None else getattr(err, "status_code", None)
    try:
        return int(status) if status is not None else None
    except (TypeError, ValueError):
        return None


def retryable(err: BaseException) -> bool:
    """429, 5xx, timeouts and dropped connections are retried; everything else is permanent."""
    if isinstance(err, PermanentError):
        return False
    status = status_of(err)
    if status is not None:
        return status in RETRYABLE_STATUS
    if isinstance(err, (TimeoutError, socket.timeout, ConnectionError)):
        return True
    msg = str(err).lower()
    return any(s in msg for s in RETRYABLE_EE_MESSAGES)


@dataclass
class Limiter:
    """A cap on requests in flight shared by every thread of the process. Waiting requests go in
    priority order (lowest first), and a finishing request hands its slot straight to the next one
    (one wake-up, not a stampede). The source gives a shard's tiles consecutive priorities, so an
    earlier shard finishes and is written while later ones still fetch, instead of all shards
    advancing in lockstep and leaving the cap idle while they write."""

    cap: int
    in_flight: int = 0
    peak: int = 0
    requests: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _waiting: list = field(default_factory=list)
    _tickets: Any = field(default_factory=itertools.count)

    def _granted(self) -> None:  # under the lock
        self.requests += 1
        self.peak = max(self.peak, self.in_flight)

    @contextlib.contextmanager
    def slot(self, priority: tuple = ()) -> Iterator[None]:
        event = None
        with self._lock:
            if self.in_flight < self.cap and not self._waiting:
                self.in_flight += 1
                self._granted()
            else:
                event = threading.Event()
                heapq.heappush(self._waiting, ((*priority, next(self._tickets)), event))
        if event is not None:
            event.wait()  # the releasing request counted us in
        try:
            yield
        finally:
            with self._lock:
                if self._waiting:
                    _, nxt = heapq.heappop(self._waiting)
                    self._granted()
                    nxt.set()
                else:
                    self.in_flight -= 1

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1


_LIMITERS: dict[int, Limiter] = {}
_BATCHES = itertools.count()  # fetch calls (shards) in start order: earlier ones are served first
_LIMITERS_LOCK = threading.Lock()


def limiter_for(cap: int) -> Limiter:
    with _LIMITERS_LOCK:
        return _LIMITERS.setdefault(cap, Limiter(cap))


def with_retries(
    call: Callable[[], Any],
    cfg: EEConfig,
    limiter: Limiter,
    sleep: Callable[[float], None],
    rng: random.Random,
    priority: tuple = (),
) -> Any:
    """Run ``call`` under the cap (queued by ``priority``); on a retryable error wait base * 2^attempt
    (capped) times a jitter in [0.5, 1.5) and try again, at most ``max_retries`` times."""
    attempt = 0
    while True:
        try:
            with limiter.slot(priority):
                return call()
        except Exception as err:
            if not retryable(err) or attempt >= cfg.max_retries:
                raise
            delay = min(cfg.backoff_cap_s, cfg.backoff_base_s * 2**attempt) * (0.5 + rng.random())
            limiter.count_retry()
            log.debug("retrying after %s (attempt %d, %.1f s)", type(err).__name__, attempt + 1, delay)
            sleep(delay)
            attempt += 1


# --- the recipe as ee expressions -------------------------------------------------------------------
def tile_region(t: TileRequest):
    """The tile's square in its own UTM CRS (planar), as an ee.Geometry."""
    import ee

    a, _, c, _, e, f = t.transform
    x0, y1 = c, f
    x1, y0 = c + a * t.size, f + e * t.size
    return ee.Geometry.Rectangle([x0, y0, x1, y1], f"EPSG:{t.epsg}", False)


def tile_point(t: TileRequest):
    import ee

    return ee.Geometry.Point([t.lon, t.lat])


def s2_scenes(t: TileRequest, cfg: EEConfig):
    """The tile's candidate Sentinel-2 scenes, best first."""
    import ee

    r = get("sentinel2").ee
    level = cfg.level_for(t.year)
    coll = r.collection if level == "L2A" else r.params["l1c_collection"]
    region = tile_region(t)
    col = (
        ee.ImageCollection(coll)
        .filterBounds(region)
        .filterDate(f"{t.year}-01-01", f"{t.year + 1}-01-01")
        .filter(ee.Filter.lt(r.params["cloud_property"], cfg.max_scene_cloud))
        .filter(ee.Filter.contains(leftField=".geo", rightValue=region))
    )
    if cfg.scene_choice == "random":
        return col.randomColumn("mmearth_random", cfg.seed).sort("mmearth_random")
    return col.sort(r.params["cloud_property"])


def s1_closest(s2, region, orbit: str, cfg: EEConfig):
    """(collection of acceptable scenes sorted by time distance to ``s2``, per-orbit image or fill)."""
    import ee

    r = get("sentinel1").ee
    t0 = s2.date()
    gap = cfg.max_gap_days
    col = (
        ee.ImageCollection(r.collection)
        .filterBounds(region)
        .filter(ee.Filter.eq("instrumentMode", r.params["instrumentMode"]))
        .filter(ee.Filter.eq("orbitProperties_pass", orbit))
        .filter(
            ee.Filter.Or(
                ee.Filter.listContains("transmitterReceiverPolarisation", "VH"),
                ee.Filter.listContains("transmitterReceiverPolarisation", "HV"),
            )
        )
        .filterDate(t0.advance(-gap, "day"), t0.advance(gap + 1, "day"))
        .map(
            lambda im: im.set(
                "mmearth_dt", ee.Number(im.get("system:time_start")).subtract(t0.millis()).abs()
            )
        )
        .sort("mmearth_dt")
    )
    pols = list(r.bands)
    empty = ee.Image.constant([0] * len(pols)).rename(pols).toFloat().updateMask(0)
    best = ee.Image(col.first())
    # the scene's own pair (VV+VH, or HH+HV near the poles) overwrites the masked placeholders
    img = ee.Image(
        ee.Algorithms.If(col.size().gt(0), empty.addBands(best.select("[VH][VH]"), None, True), empty)
    )
    return col, img


def _s1_image(s2, region, cfg: EEConfig):
    import ee

    bands = []
    for orbit, suffix in (("ASCENDING", "asc"), ("DESCENDING", "desc")):
        _, img = s1_closest(s2, region, orbit, cfg)
        bands.append(img.resample("bilinear").rename([f"{p}_{suffix}" for p in get("sentinel1").ee.bands]))
    return ee.Image.cat(bands).select(list(S1_BANDS))


def _monthly(s2):
    import ee

    r = get("era5").ee
    d = s2.date()
    m0 = ee.Date.fromYMD(d.get("year"), d.get("month"), 1)
    col = ee.ImageCollection(r.collection).select(list(r.bands), ["t2m", "t2m_min", "t2m_max", "precip"])
    prev = ee.Image(col.filterDate(m0.advance(-1, "month"), m0).first())
    cur = ee.Image(col.filterDate(m0, m0.advance(1, "month")).first())
    window = col.filterDate(m0.advance(-(r.params["window_months"] - 1), "month"), m0.advance(1, "month"))
    year = ee.Image.cat(
        [
            window.select("t2m").mean(),
            window.select("t2m_min").min(),
            window.select("t2m_max").max(),
            window.select("precip").sum(),
        ]
    ).rename(["t2m", "t2m_min", "t2m_max", "precip"])
    names = list(ERA5_BANDS)
    return ee.Image.cat([prev, cur, year]).rename(names)


def tile_values_expression(t: TileRequest, cfg: EEConfig):
    """One ee.Dictionary with everything tile-level: the chosen S2 scene (id, time, cloud), whether each
    S1 orbit has a scene, ERA5's 12 values, RESOLVE biome and ecoregion. ``n_scenes`` is 0 when the tile
    has no acceptable S2 scene (the rest is then absent)."""
    import ee

    scenes = s2_scenes(t, cfg)
    s2 = ee.Image(scenes.first())
    region = tile_region(t)
    point = tile_point(t)
    asc, _ = s1_closest(s2, region, "ASCENDING", cfg)
    desc, _ = s1_closest(s2, region, "DESCENDING", cfg)
    era5 = _monthly(s2).reduceRegion(ee.Reducer.first(), point, 11132)
    eco = ee.Feature(ee.FeatureCollection(get("biome").ee.collection).filterBounds(point).first())
    full = ee.Dictionary(
        {
            "n_scenes": scenes.size(),
            "s2_id": s2.get("system:index"),
            "s2_time": s2.get("system:time_start"),
            "s2_cloud": s2.get(get("sentinel2").ee.params["cloud_property"]),
            "s1_asc": asc.size().gt(0),
            "s1_desc": desc.size().gt(0),
            "era5": era5.values(list(ERA5_BANDS)),
            "biome": eco.get("BIOME_NUM"),
            "ecoregion": eco.get("ECO_ID"),
        }
    )
    return ee.Dictionary(ee.Algorithms.If(scenes.size().gt(0), full, ee.Dictionary({"n_scenes": 0})))


def _typed(img, m: Modality):
    """Unmask with the registry fill and cast to the dtype requested from Earth Engine."""
    fill = m.fill
    if isinstance(fill, float) and np.isnan(fill):
        img = img.unmask(float("nan"), False)
    else:
        img = img.unmask(fill, False)
    return {"uint8": img.toUint8, "uint16": img.toUint16, "float32": img.toFloat}[EE_DTYPES[m.dtype]]()


def pixel_image(t: TileRequest, modalities: tuple[Modality, ...], cfg: EEConfig):
    """Every requested pixel modality stacked into one ee.Image, bands named ``<modality>__<band>``."""
    import ee

    level = cfg.level_for(t.year)
    s2 = ee.Image(s2_scenes(t, cfg).first())
    region = tile_region(t)
    parts = []
    for m in modalities:
        if m.kind != "pixel":
            continue
        if m.name == "sentinel2":
            bands = [b for b in S2_BANDS if not (level == "L2A" and b == "B10")]
            img = s2.select(bands).resample("bilinear")
            if level == "L2A":
                img = img.addBands(ee.Image.constant(0).toUint16().rename("B10").updateMask(0))
            img = img.select(list(S2_BANDS))
        elif m.name == "sentinel2_masks":
            qa = s2.select("QA60").rightShift(10).bitwiseAnd(3)
            qa = qa.where(qa.eq(3), 1).rename("QA60")
            if level == "L2A":
                img = ee.Image.cat([s2.select("SCL"), s2.select("MSK_CLDPRB"), qa])
            else:
                img = ee.Image.cat(
                    [ee.Image.constant([255, 255]).rename(["SCL", "MSK_CLDPRB"]).updateMask(0), qa]
                )
        elif m.name == "sentinel1":
            img = _s1_image(s2, region, cfg)
        elif m.name == "dem":
            r = m.ee
            dem = ee.ImageCollection(r.collection).filterBounds(region).select(list(r.bands)).mosaic()
            dem = dem.setDefaultProjection(ee.Projection("EPSG:4326").atScale(30)).rename("elevation")
            img = ee.Image.cat([dem, ee.Terrain.slope(dem).rename("slope")]).resample("bilinear")
        elif m.name == "dynamic_world":
            d = s2.date()
            col = ee.ImageCollection(m.ee.collection).filterBounds(region)
            col = col.filterDate(
                ee.Date.fromYMD(d.get("year"), 1, 1), ee.Date.fromYMD(d.get("year").add(1), 1, 1)
            )
            img = col.select("label").mode().add(1).rename("label")
        elif m.name == "esa_worldcover":
            img = ee.ImageCollection(m.ee.collection).first().select(list(m.ee.bands)).rename("map")
        elif m.name == "canopy_height":
            h = ee.Image(m.ee.collection).select([0]).rename("height")
            sd = ee.Image(m.ee.params["std_asset"]).select([0]).rename("std")
            img = ee.Image.cat([h, sd]).resample("bilinear")
        else:
            raise SourceError(f"the earthengine source has no recipe for pixel modality {m.name}")
        img = _typed(img.rename([f"{m.name}{SEP}{b}" for b in m.bands]), m)
        parts.append(img)
    return ee.Image.cat(parts)


def request_bytes(modalities: tuple[Modality, ...], size: int) -> int:
    """Bytes of one tile's computePixels response: each band's bytes per pixel plus one mask byte."""
    per_pixel = sum(
        m.n_bands * (np.dtype(EE_DTYPES[m.dtype]).itemsize + 1) for m in modalities if m.kind == "pixel"
    )
    return per_pixel * size * size


def check_request_size(modalities: tuple[Modality, ...], size: int) -> None:
    """Raise SourceError when one tile's computePixels response would exceed Earth Engine's limit."""
    n = request_bytes(modalities, size)
    if n > REQUEST_LIMIT_BYTES:
        raise SourceError(
            f"one tile of {size} px is {n / 2**20:.0f} MB per computePixels request, over Earth "
            "Engine's 48 MB limit; use a smaller --tile-size or fewer --modalities"
        )


def pixels_request(t: TileRequest, modalities: tuple[Modality, ...], cfg: EEConfig) -> dict[str, Any]:
    """The computePixels request of one tile: the stacked expression on the tile's exact grid."""
    check_request_size(modalities, t.size)
    a, b, c, d, e, f = t.transform
    return {
        "expression": pixel_image(t, modalities, cfg),
        "fileFormat": "NUMPY_NDARRAY",
        "bandIds": [f"{m.name}{SEP}{band}" for m in modalities if m.kind == "pixel" for band in m.bands],
        "grid": {
            "dimensions": {"width": t.size, "height": t.size},
            "affineTransform": {
                "scaleX": a,
                "shearX": b,
                "translateX": c,
                "shearY": d,
                "scaleY": e,
                "translateY": f,
            },
            "crsCode": f"EPSG:{t.epsg}",
        },
    }


# --- decoding ---------------------------------------------------------------------------------------
def decode_pixels(arr: Any, t: TileRequest, modalities: tuple[Modality, ...]) -> dict[str, np.ndarray]:
    """Structured (H, W) array from computePixels -> registry arrays; PermanentError if malformed."""
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None:
        raise PermanentError(f"computePixels returned {type(arr).__name__}, not a structured numpy array")
    if arr.shape != (t.size, t.size):
        raise PermanentError(f"computePixels returned shape {arr.shape}, expected {(t.size, t.size)}")
    out = {}
    for m in modalities:
        if m.kind != "pixel":
            continue
        missing = [b for b in m.bands if f"{m.name}{SEP}{b}" not in arr.dtype.names]
        if missing:
            raise PermanentError(f"band {m.name}{SEP}{missing[0]} missing from the computePixels response")
        out[m.name] = np.stack([np.asarray(arr[f"{m.name}{SEP}{b}"]) for b in m.bands]).astype(m.np_dtype)
    return out


def decode_values(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or "n_scenes" not in v:
        raise PermanentError(f"computeValue returned {type(v).__name__} without n_scenes")
    if v["n_scenes"] == 0:
        return v
    need = ("s2_id", "s2_time", "s1_asc", "s1_desc", "era5", "biome", "ecoregion")
    missing = [k for k in need if k not in v]
    if missing or len(v["era5"]) != len(ERA5_BANDS):
        raise PermanentError(f"computeValue response lacks {', '.join(missing) or 'the 12 ERA5 values'}")
    return v


# --- the source -------------------------------------------------------------------------------------
class EarthEngineSource:
    name = "earthengine"
    years = YEARS
    version = "1"  # the recipe; changes whenever the requests it sends for a tile do

    def __init__(self, cfg: EEConfig, sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self.sleep = sleep
        self._transport: Transport | None = None
        self.limiter = limiter_for(cfg.max_in_flight)

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            if self.cfg.transport is not None:
                if self.cfg.transport not in _TRANSPORTS:
                    raise SourceError(f"no Earth Engine transport registered as {self.cfg.transport!r}")
                self._transport = _TRANSPORTS[self.cfg.transport]
            else:
                self._transport = EETransport(self.cfg)
        return self._transport

    def check(self, tile_size: int, modalities: tuple[Modality, ...]) -> None:
        """Everything that can be checked without a request: scene policy, request size, project and
        credentials (skipped with a registered transport). Raises SourceError naming the problem."""
        c = self.cfg
        if c.scene_choice not in ("least_cloudy", "random"):
            raise SourceError(f"--scene-choice {c.scene_choice!r}: use least_cloudy or random")
        if c.s2_level not in ("auto", "L2A", "L1C"):
            raise SourceError(f"--s2-level {c.s2_level!r}: use auto, L2A or L1C")
        if c.max_in_flight < 1:
            raise SourceError("--max-in-flight must be at least 1")
        check_request_size(modalities, tile_size)
        if c.transport is None:
            resolve_project(c)
            credentials(c)

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "source": self.name,
            "project": c.project or os.environ.get("EE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT"),
            "endpoint": HIGH_VOLUME_URL if c.high_volume else "default",
            "max_scene_cloud": c.max_scene_cloud,
            "scene_choice": c.scene_choice,
            "s2_level": c.s2_level,
            "l2a_from": c.l2a_from,
            "max_gap_days": c.max_gap_days,
            "max_in_flight": c.max_in_flight,
        }

    def fetch(
        self, tiles: list[TileRequest], modalities: tuple[Modality, ...]
    ) -> list[TileResult | TileFailure]:
        self.transport  # noqa: B018 (initialises ee, or fails with a clear message, before any tile)
        # twice the cap: tiles building their expressions queue up while the cap is kept full
        workers = max(1, min(len(tiles), 2 * self.cfg.max_in_flight))
        batch = next(_BATCHES)
        with ThreadPoolExecutor(workers, thread_name_prefix="ee") as pool:
            return list(
                pool.map(lambda it: self.fetch_one(it[1], modalities, (batch, it[0])), enumerate(tiles))
            )

    def fetch_one(
        self, t: TileRequest, modalities: tuple[Modality, ...], priority: tuple = ()
    ) -> TileResult | TileFailure:
        rng = random.Random(zlib.crc32(f"{self.cfg.seed}/{t.tile_id}".encode()))
        if t.year not in self.years:
            return TileFailure(
                t.tile_id, "sentinel2", f"year {t.year} outside {self.years.start}-{self.years.stop - 1}"
            )
        stage = "values"
        try:
            expr = tile_values_expression(t, self.cfg)
            values = decode_values(
                with_retries(
                    lambda: self.transport.compute_value(expr, t.tile_id),
                    self.cfg,
                    self.limiter,
                    self.sleep,
                    rng,
                    priority,
                )
            )
            if values["n_scenes"] == 0:
                return TileFailure(
                    t.tile_id,
                    "sentinel2",
                    f"no scene below {self.cfg.max_scene_cloud:g} % cloud containing the tile",
                )
            stage = "pixels"
            req = pixels_request(t, modalities, self.cfg)
            raw = with_retries(
                lambda: self.transport.compute_pixels(req, t.tile_id),
                self.cfg,
                self.limiter,
                self.sleep,
                rng,
                priority,
            )
            stage = "decode"
            pixels = decode_pixels(raw, t, modalities)
        except SourceError:
            raise
        except Exception as err:
            kind = f"HTTP {status_of(err)}" if status_of(err) else type(err).__name__
            detail = getattr(err, "reason", None) or str(err)
            return TileFailure(t.tile_id, stage, f"{kind}: {str(detail)[:200]}")
        arrays = empty_arrays(modalities, t.size)
        arrays.update(pixels)
        present = {m.name: True for m in modalities}
        if "sentinel1" in arrays:
            present["sentinel1"] = bool(values["s1_asc"] or values["s1_desc"])
        if "era5" in arrays:
            arrays["era5"] = np.array([np.nan if v is None else v for v in values["era5"]], np.float32)
            present["era5"] = bool(np.isfinite(arrays["era5"]).any())
        for name in ("biome", "ecoregion"):
            if name in arrays:
                m = get(name)
                arrays[name] = np.asarray(values[name] or m.fill, m.np_dtype)
        date = np.datetime64(int(values["s2_time"]), "ms").astype("datetime64[D]")
        cloud = float("nan")
        if "sentinel2_masks" in arrays:
            cloud = float((arrays["sentinel2_masks"][2] == 1).mean())  # QA60 opaque
        return TileResult(
            tile_id=t.tile_id,
            arrays=arrays,
            present=present,
            s2_date=date,
            s2_product=self.cfg.level_for(t.year),
            extra={"s2_id": values["s2_id"], "cloud_fraction": cloud},
        )


def make_earthengine_source(options: dict[str, Any]) -> EarthEngineSource:
    known = set(EEConfig.__dataclass_fields__)
    unknown = set(options) - known
    if unknown:
        raise SourceError(
            f"unknown earthengine options {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
        )
    return EarthEngineSource(EEConfig(**options))
