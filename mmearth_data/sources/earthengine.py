"""The Earth Engine source: MMEarth's recipe as real ``ee`` expressions, two requests per tile.

Data flow: :class:`TileRequest` -> :func:`tile_values_expression` (one ``computeValue``: the chosen
Sentinel-2 scene and its tile-level cloud score, the Sentinel-1 passes that cover the tile, ERA5's 12
values) -> :class:`SceneChoice` -> :func:`pixels_request` (one ``computePixels`` of every pixel modality
stacked on the tile's own grid, NUMPY_NDARRAY, built from exactly the scenes the values request chose)
-> :class:`TileResult`. Before export, :func:`resolve_labels_expression` labels the plan's candidate
locations with RESOLVE biome and ecoregion in batches of :data:`LABEL_BATCH` points, so that the
biome balance of an Earth Engine build is RESOLVE's (see ``mmearth_data.sampling``).

Only :class:`EETransport` talks to Earth Engine (``ee.data.computeValue`` / ``ee.data.computePixels``).
Everything above it -- the recipe, request sizing, retries with backoff and jitter, the cap on requests
in flight, failure accounting -- is plain code that tests drive with a fake transport.

The recipe, with MMEarth's choice beside each (the README lists the same table):

- Sentinel-2 product: L2A (``COPERNICUS/S2_SR_HARMONIZED``) wherever the tile has an acceptable L2A
  scene in its year, L1C (``COPERNICUS/S2_HARMONIZED``) otherwise, in every year (``--s2-level`` forces
  one). MMEarth: both levels mixed by availability too; the previous recipe here fixed the level by year.
- Candidate scenes: the year's scenes whose footprint contains the tile (``Filter.contains`` with a 10 m
  error margin), pre-filtered on the granule's ``CLOUDY_PIXEL_PERCENTAGE`` below ``max_granule_cloud``
  (60 %, cost only), then scored on the tile itself: the share of the tile's pixels that are cloudy by
  Cloud Score+ (``cs`` below ``cs_threshold`` 0.6) where Cloud Score+ has the scene, else by SCL (cloud
  shadow, medium/high cloud, cirrus) for L2A or QA60 for L1C, computed at 20 m over the tile; scenes
  with any no-data pixel in the tile are dropped. MMEarth: granule-level ``CLOUDY_PIXEL_PERCENTAGE`` < 10.
- Choice among the scenes whose tile cloud score is at most ``max_scene_cloud`` (10 %): seeded at random
  per tile (default, ``scene_choice='random'``, spreads dates over the seasons) or the least cloudy with
  random tie-breaks (``least_cloudy``). MMEarth documented the least cloudy and its code took a random
  one; ranking by the granule's percentage made every clear region take the year's first clear scene.
- The pixels request loads exactly the chosen scene by id (``Image.load``): one search per tile.
- Bands are selected and renamed by name only (``Image.select(names, newNames)``, then the stack is put
  in registry order by name); a band the scene lacks (B10 in L2A, MSK_CLDPRB in some L2A scenes, HH/HV
  in a VV/VH scene) is a masked placeholder of that name. ``mmearth_data.sources.ee_graph`` checks this.
- Cloud masks: SCL and MSK_CLDPRB (L2A), and an opaque/cirrus band (1 = opaque, 2 = cirrus) from QA60,
  or from ``MSK_CLASSI_OPAQUE`` / ``MSK_CLASSI_CIRRUS`` for scenes processed since 2022 whose QA60 is
  empty. ``cloud_fraction`` in the store is the tile cloud score of the chosen scene.
- Sentinel-1 ``COPERNICUS/S1_GRD``, IW, dual polarisation, per orbit direction: slices are grouped into
  passes (same relative orbit, same day); a pass counts only when the union of its slices contains the
  whole tile; the pass closest in time to the Sentinel-2 scene within ``max_gap_days`` (30) is mosaicked.
  Its scene ids, date and gap to Sentinel-2 are stored. MMEarth: ``first()`` of any intersecting scene,
  no time bound, partial slices stored as present.
- DEM ``COPERNICUS/DEM/GLO30``: tiles resampled bilinearly and mosaicked, reprojected onto a 30 m grid
  in the tile's UTM zone aligned with the tile, ``ee.Terrain.slope`` on that grid, then both bands
  resampled bilinearly to the 10 m tile grid. MMEarth: slope on a nearest-neighbour EPSG:4326 grid
  (east-west gradients wrong by ~12 % rms, stripes at high latitude).
- ERA5-Land monthly: previous month, S2 month, and the 12 months ending with the S2 month (MMEarth: 13)
  at the tile centre; where ERA5-Land is masked (coasts) the mean of its cells within ``era5_buffer_m``.
- Archives with gaps: the values request counts Dynamic World images of the year and GLO-30 tiles over
  the tile; where there are none the modality is stored as fill, flagged absent, and not requested.
- Dynamic World: mode of the S2 year's labels (+1: classes 1-9); ESA WorldCover v100; ETH canopy height
  2020 and its standard deviation, rounded to whole metres before the uint8 cast (MMEarth: int8 with
  fill 255, truncated).
- RESOLVE biome and ecoregion: labelled in batches before export (nearest polygon within
  ``resolve_buffer_m``, 2 km, for coastal points); locations without a polygon in reach are not planned.
- Masked pixels are sent back as the registry fill (uint) or :data:`FLOAT_FILL` (float bands, a finite
  value outside every float band's range: a request holds no NaN, which strict JSON forbids) and turned
  into NaN on decode.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import math
import os
import random
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
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
DEFAULT_URL = "https://earthengine.googleapis.com"
TOKEN_HOST = "oauth2.googleapis.com"  # where a service-account key is exchanged for a token


def check_reachable(host: str, timeout_s: float = 5.0, port: int = 443, name: str | None = None) -> None:
    """Raise :class:`SourceError` unless a TCP connection to ``host:port`` (or to the HTTPS proxy named
    in the environment, which then carries the traffic) opens within the timeout: a build without a
    network stops before anything is written instead of retrying every request. ``name`` says what is
    unreachable in the message (the host by default)."""
    import socket
    from urllib.parse import urlsplit

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = (host, port)
    if proxy:
        u = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        target = (u.hostname or "", u.port or 80)
    try:
        with socket.create_connection(target, timeout=timeout_s):
            return
    except OSError as err:
        via = f" through the proxy {proxy}" if proxy else ""
        raise SourceError(
            f"cannot reach {name or host}{via} ({err}); check this machine's network connection or proxy "
            "(HTTPS_PROXY) and run the same command again (nothing was written)"
        ) from None


SEP = "__"  # band names in the stacked image: <modality>__<band>
EE_DTYPES = {"uint8": "uint8", "uint16": "uint16", "float16": "float32", "float32": "float32"}
# masked float pixels come back as this value: finite (strict JSON), exact in float32, and outside every
# float band's range (Sentinel-1 dB in [-60, 40], elevation in [-500, 9000] m, slope in [0, 90] degrees)
FLOAT_FILL = -32768.0
ORBITS = (("ASCENDING", "asc"), ("DESCENDING", "desc"))
LABEL_BATCH = 1000  # locations per RESOLVE labelling request
MAX_ERROR_M = 10  # error margin of geometric filters on the tile square
# asset band lists (Earth Engine catalog): what a scene of each product may hold
L2A_SPECTRAL = tuple(b for b in S2_BANDS if b != "B10")
S2_SPECTRAL = {"L2A": L2A_SPECTRAL, "L1C": S2_BANDS}
SCL_CLOUDY = (3, 8, 9, 10)  # cloud shadow, cloud medium / high probability, thin cirrus
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
# Earth Engine's own error texts (ee.data raises EEException(message) with no status code). Transient:
RETRYABLE_EE_MESSAGES = (
    "too many concurrent",  # "Too many concurrent aggregations."
    "quota exceeded",  # "Quota exceeded for quota metric 'Number of read requests' ..."
    "too many requests",  # 429's reason phrase
    "rate limit",
    "internal error",  # "An internal error has occurred (request: ...)."
    "service is currently unavailable",  # 503
    "service unavailable",
    "backend error",
    "deadline exceeded",  # "Deadline exceeded", gRPC DEADLINE_EXCEEDED
    "deadline expired",
    "computation timed out",  # interactive limit; often passes on a less loaded backend
    "capacity exceeded",  # "Earth Engine capacity exceeded." / "... memory capacity exceeded."
    "connection reset",
    "connection aborted",
    "temporarily unavailable",
)
# ... and permanent even though they mention a limit: the same request fails the same way again
PERMANENT_EE_MESSAGES = (
    "user memory limit exceeded",
    "total request size",
    "invalid json payload",
    "invalid argument",
    "did not match any bands",
    "not found",
    "permission",
    "not registered",
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
    max_scene_cloud: float = 10.0  # per cent of the tile's pixels, by the tile-level cloud score
    max_granule_cloud: float = 60.0  # per cent, granule-level pre-filter (cost only)
    cs_threshold: float = 0.6  # Cloud Score+ cs below this is cloudy
    scene_choice: str = "random"  # or "least_cloudy"
    s2_level: str = "auto"  # auto (L2A where the tile has a scene, else L1C) | L2A | L1C
    max_gap_days: int = 30
    months: tuple[int, int] | None = None  # calendar months (first, last) the scene may come from
    era5_buffer_m: float = 15_000.0
    resolve_buffer_m: float = 2_000.0
    seed: int = 0
    transport: str | None = None  # name of a registered transport (tests, simulations)
    # a Prefect global concurrency limit every request also takes a slot of, shared by the builds of
    # all machines (``mmearth deploy`` creates one named earthengine-requests)
    concurrency_limit: str | None = None

    def levels(self) -> tuple[str, ...]:
        """Sentinel-2 products to try, in order of preference."""
        return ("L2A", "L1C") if self.s2_level == "auto" else (self.s2_level,)


def collection_of(level: str) -> str:
    r = get("sentinel2").ee
    return r.collection if level == "L2A" else r.params["l1c_collection"]


class EEAuthError(SourceError):
    """Missing or unusable Earth Engine credentials or project."""


def resolve_project(cfg: EEConfig) -> str:
    project = cfg.project or os.environ.get("EE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT")
    if not project:
        raise EEAuthError(
            "Earth Engine needs a Google Cloud project registered for Earth Engine: pass `project` P "
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
        try:
            with open(key) as f:
                email = json.load(f).get("client_email")
        except (OSError, ValueError, AttributeError) as err:
            raise EEAuthError(f"{key} is not a service-account key file (JSON): {err}") from None
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
            "no Earth Engine credentials found: use `key_file` KEY.json (service account), "
            "`gcloud auth application-default login`, or `earthengine authenticate`"
        ) from err


# --- the transport boundary -------------------------------------------------------------------------
class Transport(Protocol):
    """Sends one request; ``tile_id`` only labels it (logs, simulations)."""

    def compute_value(self, expression: Any, tile_id: str) -> Any: ...

    def compute_pixels(self, request: dict[str, Any], tile_id: str) -> np.ndarray: ...


class PooledHttp:
    """An httplib2-style transport over one ``requests`` session whose connection pool holds as many
    connections as requests may be in flight (``requests``' default pool keeps 10 and discards the rest,
    reconnecting every time). Network failures surface as ``ConnectionError`` / ``TimeoutError``, which
    :func:`retryable` retries."""

    def __init__(self, pool_size: int, timeout_s: float):
        import requests
        from requests.adapters import HTTPAdapter

        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(pool_size, 1), max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.timeout_s = timeout_s

    def request(self, uri, method="GET", body=None, headers=None, redirections=None, connection_type=None):
        import httplib2
        import requests

        try:
            resp = self.session.request(method, uri, data=body, headers=headers, timeout=self.timeout_s)
        except requests.exceptions.Timeout as err:
            raise TimeoutError(str(err)) from err
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
            raise ConnectionError(str(err)) from err
        headers_out = dict(resp.headers)
        headers_out["status"] = resp.status_code
        return httplib2.Response(headers_out), resp.content


class EETransport:
    """The only code that sends requests: ``ee.data.computeValue`` and ``ee.data.computePixels``.

    ``ee``'s own retries are switched off (``ee.data.setMaxRetries(0)``): :func:`with_retries` is the one
    retry layer, so a request is tried at most ``max_retries + 1`` times, not that many squared."""

    def __init__(self, cfg: EEConfig):
        import ee

        creds, self.credential_kind = credentials(cfg)
        self.project = resolve_project(cfg)
        self.http = PooledHttp(cfg.max_in_flight, cfg.timeout_s)
        ee.Initialize(
            creds,
            project=self.project,
            url=HIGH_VOLUME_URL if cfg.high_volume else None,
            http_transport=self.http,
        )
        ee.data.setMaxRetries(0)

    def compute_value(self, expression: Any, tile_id: str) -> Any:
        import ee

        return ee.data.computeValue(expression)

    def compute_pixels(self, request: dict[str, Any], tile_id: str) -> np.ndarray:
        import ee

        return ee.data.computePixels(request)


_TRANSPORTS: dict[str, Transport] = {}
_EE_TRANSPORTS: dict[tuple, EETransport] = {}
_EE_LOCK = threading.Lock()


def ee_transport(cfg: EEConfig) -> EETransport:
    """One :class:`EETransport` per process and account: ``ee`` keeps its state globally, so shards
    running on threads share one initialisation (and one connection pool) instead of re-initialising
    it under each other's requests."""
    key = (cfg.project, cfg.key_file, os.environ.get("EE_SERVICE_ACCOUNT_KEY"), cfg.high_volume,
           cfg.max_in_flight, cfg.timeout_s)  # fmt: skip
    with _EE_LOCK:
        if key not in _EE_TRANSPORTS:
            _EE_TRANSPORTS[key] = EETransport(cfg)
        return _EE_TRANSPORTS[key]


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
    """429, 5xx, timeouts and dropped connections are retried; everything else is permanent.

    ``googleapiclient``'s ``HttpError`` carries the status; ``ee.data`` turns it into an ``EEException``
    holding only the service's message, which is classified by Earth Engine's own texts (permanent
    texts first: "User memory limit exceeded." mentions a limit but fails again the same way)."""
    if isinstance(err, PermanentError):
        return False
    status = status_of(err)
    if status is not None:
        return status in RETRYABLE_STATUS
    if isinstance(err, (TimeoutError, socket.timeout, ConnectionError)):
        return True
    msg = str(err).lower()
    if any(s in msg for s in PERMANENT_EE_MESSAGES):
        return False
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


def shared_slot(name: str | None) -> Any:
    """One slot of the Prefect global concurrency limit ``name`` for the length of a request (nothing
    without a name). The limit must exist: a missing one fails the request with Prefect's error."""
    if not name:
        return contextlib.nullcontext()
    from prefect.concurrency.sync import concurrency

    return concurrency(name, occupy=1, strict=True)


def check_concurrency_limit(name: str) -> None:
    """Raise SourceError unless the Prefect API this process talks to holds an active global
    concurrency limit ``name``."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise SourceError(
            f"`concurrency_limit` {name}: a global concurrency limit lives on a Prefect server, and no "
            "PREFECT_API_URL is set; point PREFECT_API_URL at the server whose limit the builds share"
        )
    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        raise SourceError(
            f"`concurrency_limit` {name}: no such global concurrency limit on {PREFECT_API_URL.value()}; "
            f"create it with `mmearth deploy` or `prefect gcl create {name} --limit 40`"
        ) from None
    if not limit.active:
        raise SourceError(f"`concurrency_limit` {name} is inactive; `prefect gcl enable {name}`")


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
            with limiter.slot(priority), shared_slot(cfg.concurrency_limit):
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


def _map(col, body: Callable[[Any], Any], name: str, element: str = "Image"):
    """``col.map(body)`` with the mapped function's argument named ``name``. ee builds a function with
    named arguments by calling the body twice; an unnamed one (what ``Collection.map`` makes of a
    lambda) costs a third call and a serialisation of the whole body to choose a name: most of the
    recipe's client-side time per tile. Names must differ between nested functions."""
    import ee

    sig = {"name": "", "returns": element, "args": [{"name": name, "type": element}]}
    mapped = ee.ApiFunction.call_("Collection.map", col, ee.CustomFunction(sig, body))
    return ee.ImageCollection(mapped) if element == "Image" else ee.FeatureCollection(mapped)


def tile_seed(t: TileRequest, cfg: EEConfig) -> int:
    """The per-tile seed of the random scene choice (a function of the build seed and the tile)."""
    return zlib.crc32(f"{cfg.seed}/{t.tile_id}".encode()) % 2**31


def _cloudy_image(im, level: str, cfg: EEConfig):
    """One band ``cloudy`` (1 cloudy, 0 clear) and one band ``cs_plus`` (1 if Cloud Score+ judged it) of
    a Sentinel-2 scene: Cloud Score+ where it has the scene, else SCL (L2A) or QA60 (L1C)."""
    import ee

    r = get("sentinel2").ee
    cs_band = r.params["cloud_score_band"]
    linked = im.linkCollection(ee.ImageCollection(r.params["cloud_score_collection"]), [cs_band])
    by_cs = linked.select([cs_band], ["cloudy"]).lt(cfg.cs_threshold)
    if level == "L2A":
        scl = im.select(["SCL"], ["cloudy"])
        fallback = scl.eq(SCL_CLOUDY[0])
        for v in SCL_CLOUDY[1:]:
            fallback = fallback.Or(scl.eq(v))
    else:
        fallback = im.select(["QA60"], ["cloudy"]).rightShift(10).bitwiseAnd(3).gt(0)
    has_cs = linked.bandNames().contains(cs_band)
    cloudy = ee.Image(ee.Algorithms.If(has_cs, by_cs, fallback))
    return cloudy, has_cs


def s2_candidates(t: TileRequest, level: str, cfg: EEConfig):
    """The tile's acceptable scenes of one product, each with its tile cloud score (``mmearth_cloud``,
    per cent of the tile's pixels), the mask that scored it (``mmearth_cloud_source``) and a per-tile
    random number (``mmearth_random``); only scenes that cover every pixel of the tile and score at most
    ``max_scene_cloud``. A tile pinned to a stored scene (``t.s2_id``) gets that scene alone, scored,
    without the choice's filters (the archive's cloud scores may have changed since it was chosen)."""
    import ee

    r = get("sentinel2").ee
    region = tile_region(t)
    fallback_name = "scl" if level == "L2A" else "qa60"

    def score(im):
        cloudy, has_cs = _cloudy_image(im, level, cfg)
        valid = im.select(["B2"], ["valid"]).mask()
        stats = ee.Image.cat([cloudy, valid]).reduceRegion(
            reducer=ee.Reducer.mean(), geometry=region, scale=20, crs=f"EPSG:{t.epsg}", maxPixels=1e6
        )
        return im.set(
            {
                "mmearth_cloud": ee.Number(stats.get("cloudy")).multiply(100),
                "mmearth_valid": stats.get("valid"),
                "mmearth_cloud_source": ee.Algorithms.If(has_cs, "cloud_score_plus", fallback_name),
            }
        )

    if t.s2_id:
        pinned = ee.ImageCollection(collection_of(level)).filter(ee.Filter.eq("system:index", t.s2_id))
        return _map(pinned, score, "_mm_scene")
    col = (
        ee.ImageCollection(collection_of(level))
        .filterBounds(region)
        .filterDate(f"{t.year}-01-01", f"{t.year + 1}-01-01")
        .filter(ee.Filter.lt(r.params["granule_cloud_property"], cfg.max_granule_cloud))
        .filter(ee.Filter.contains(leftField=".geo", rightValue=region, maxError=MAX_ERROR_M))
    )
    if cfg.months is not None:
        col = col.filter(ee.Filter.calendarRange(int(cfg.months[0]), int(cfg.months[1]), "month"))
    col = (
        _map(col, score, "_mm_scene")
        .filter(ee.Filter.gte("mmearth_valid", 0.999))
        .filter(ee.Filter.lte("mmearth_cloud", cfg.max_scene_cloud))
        .randomColumn("mmearth_random", tile_seed(t, cfg))
    )
    if cfg.scene_choice == "random":
        return col.sort("mmearth_random")
    # least cloudy; ties (many clear scenes score 0) broken at random, not by date
    col = _map(
        col,
        lambda im: im.set(
            "mmearth_rank",
            ee.Number(im.get("mmearth_cloud")).add(ee.Number(im.get("mmearth_random")).multiply(1e-3)),
        ),
        "_mm_ranked",
    )
    return col.sort("mmearth_rank")


def s1_pass(t0, region, orbit: str, cfg: EEConfig):
    """The Sentinel-1 pass of one orbit direction for a tile: slices grouped by (relative orbit, day),
    passes whose slices together contain the whole tile, the one closest in time to ``t0`` within
    ``max_gap_days``. A dictionary: ``ids`` (slice ids, empty when no pass qualifies), ``time``,
    ``pols`` and ``rel_orbit``."""
    import ee

    r = get("sentinel1").ee
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
        .filterDate(t0.advance(-gap, "day"), t0.advance(gap, "day"))
    )
    col = _map(
        col,
        lambda im: im.set(
            {
                "mmearth_day": ee.Date(im.get("system:time_start")).format("YYYY-MM-dd"),
                "mmearth_dt": ee.Number(im.get("system:time_start")).subtract(t0.millis()).abs(),
            }
        ),
        "_mm_slice",
    )

    def coverage(rep):
        same = col.filter(ee.Filter.eq("relativeOrbitNumber_start", rep.get("relativeOrbitNumber_start")))
        same = same.filter(ee.Filter.eq("mmearth_day", rep.get("mmearth_day")))
        full = same.geometry(MAX_ERROR_M).contains(region, MAX_ERROR_M)
        return rep.set(
            {
                "mmearth_covered": ee.Algorithms.If(full, 1, 0),
                "mmearth_ids": same.aggregate_array("system:index"),
            }
        )

    passes = (
        _map(col.distinct(["relativeOrbitNumber_start", "mmearth_day"]), coverage, "_mm_pass")
        .filter(ee.Filter.eq("mmearth_covered", 1))
        .sort("mmearth_dt")
    )
    best = ee.Image(passes.first())
    found = ee.Dictionary(
        {
            "ids": best.get("mmearth_ids"),
            "time": best.get("system:time_start"),
            "pols": best.get("transmitterReceiverPolarisation"),
            "rel_orbit": best.get("relativeOrbitNumber_start"),
        }
    )
    return ee.Dictionary(ee.Algorithms.If(passes.size().gt(0), found, ee.Dictionary({"ids": []})))


def era5_values(s2, point, cfg: EEConfig):
    """ERA5-Land's 12 tile-level values (registry order) for the month before the scene, its month and
    the 12 months ending with it, at the tile centre, or the mean of the cells within
    ``era5_buffer_m`` where ERA5-Land is masked there (coasts, lakes)."""
    import ee

    r = get("era5").ee
    short = ["t2m", "t2m_min", "t2m_max", "precip"]
    d = s2.date()
    m0 = ee.Date.fromYMD(d.get("year"), d.get("month"), 1)
    col = _map(ee.ImageCollection(r.collection), lambda im: im.select(list(r.bands), short), "_mm_era5")

    def named(img, period: str):
        return img.select(short, [f"{period}_{v}" for v in short])

    window = col.filterDate(m0.advance(-(r.params["window_months"] - 1), "month"), m0.advance(1, "month"))
    year = ee.Image.cat(
        [
            window.mean().select(["t2m"]),
            window.min().select(["t2m_min"]),
            window.max().select(["t2m_max"]),
            window.sum().select(["precip"]),
        ]
    )
    img = ee.Image.cat(
        [
            named(ee.Image(col.filterDate(m0.advance(-1, "month"), m0).first()), "prev_month"),
            named(ee.Image(col.filterDate(m0, m0.advance(1, "month")).first()), "month"),
            named(year, "year"),
        ]
    )
    at_point = img.reduceRegion(ee.Reducer.first(), point, 11132)
    nearby = img.reduceRegion(ee.Reducer.mean(), point.buffer(cfg.era5_buffer_m), 11132)
    masked = ee.Algorithms.IsEqual(at_point.get(ERA5_BANDS[-1]), None)
    return ee.Dictionary(ee.Algorithms.If(masked, nearby, at_point)).values(list(ERA5_BANDS))


def tile_values_expression(t: TileRequest, cfg: EEConfig):
    """One ee.Dictionary with everything tile-level: the chosen Sentinel-2 scene (collection, id,
    time, band names, tile cloud score and its source), the Sentinel-1 pass per orbit, and ERA5's 12
    values. ``n_scenes`` is 0 when the tile has no acceptable scene (nothing else is then returned)."""
    import ee

    levels = (t.s2_product,) if t.s2_id and t.s2_product else cfg.levels()
    cands = {lv: s2_candidates(t, lv, cfg) for lv in levels}
    if len(levels) == 2:  # L2A where the tile has a scene, L1C otherwise (evaluated only then)
        has_l2a = cands["L2A"].size().gt(0)
        scenes = ee.ImageCollection(ee.Algorithms.If(has_l2a, cands["L2A"], cands["L1C"]))
        level = ee.Algorithms.If(has_l2a, "L2A", "L1C")
    else:
        scenes, level = cands[levels[0]], levels[0]
    s2 = ee.Image(scenes.first())
    region = tile_region(t)
    full = ee.Dictionary(
        {
            "n_scenes": scenes.size(),
            "s2_product": level,
            "s2_id": s2.get("system:index"),
            "s2_time": s2.get("system:time_start"),
            "s2_bands": s2.bandNames(),
            "s2_cloud": s2.get("mmearth_cloud"),
            "s2_cloud_source": s2.get("mmearth_cloud_source"),
            "s2_granule_cloud": s2.get(get("sentinel2").ee.params["granule_cloud_property"]),
            "s1_asc": s1_pass(s2.date(), region, "ASCENDING", cfg),
            "s1_desc": s1_pass(s2.date(), region, "DESCENDING", cfg),
            "era5": era5_values(s2, tile_point(t), cfg),
            # archives with gaps: a modality without an image here is stored as absent, not requested
            "n_dynamic_world": dynamic_world_images(t, t.year).size(),
            "n_dem": dem_tiles(t).size(),
        }
    )
    return ee.Dictionary(ee.Algorithms.If(scenes.size().gt(0), full, ee.Dictionary({"n_scenes": 0})))


@dataclass(frozen=True)
class S1Pass:
    """One Sentinel-1 pass chosen for a tile (``ids`` empty: none within the gap covers the tile)."""

    ids: tuple[str, ...] = ()
    time_ms: int | None = None
    pols: tuple[str, ...] = ()
    rel_orbit: int | None = None

    @property
    def present(self) -> bool:
        return bool(self.ids)


@dataclass(frozen=True)
class SceneChoice:
    """What the values request chose for a tile; the pixels request is built from exactly this."""

    s2_product: str
    s2_id: str
    s2_time_ms: int
    s2_bands: tuple[str, ...]
    cloud: float  # per cent of the tile's pixels, by ``cloud_source``
    cloud_source: str  # cloud_score_plus | scl | qa60
    s1: dict[str, S1Pass]  # "asc" / "desc"
    era5: tuple[float | None, ...]
    n_scenes: int = 1
    granule_cloud: float | None = None
    n_dynamic_world: int = 1  # Dynamic World images over the tile in its year
    n_dem: int = 1  # GLO-30 tiles over the tile (GLO-30 has gaps)

    @property
    def s2_collection(self) -> str:
        return collection_of(self.s2_product)

    @property
    def s2_date(self) -> np.datetime64:
        return np.datetime64(int(self.s2_time_ms), "ms").astype("datetime64[D]")

    def s1_date(self, orbit: str) -> np.datetime64 | None:
        p = self.s1[orbit]
        return None if p.time_ms is None else np.datetime64(int(p.time_ms), "ms").astype("datetime64[D]")

    def s1_gap_days(self, orbit: str) -> float | None:
        p = self.s1[orbit]
        return None if p.time_ms is None else abs(p.time_ms - self.s2_time_ms) / 86_400_000


def _placeholder(names: Sequence[str]):
    """Masked bands called ``names`` (a band the scene lacks)."""
    import ee

    if len(names) == 1:  # Earth Engine names one constant band "constant", several "constant_<k>"
        return ee.Image.constant(0).select(["constant"], list(names)).updateMask(0)
    const = ee.Image.constant([0] * len(names))
    return const.select([f"constant_{k}" for k in range(len(names))], list(names)).updateMask(0)


def _bands(img, mapping: Sequence[tuple[str, str]], available: Sequence[str]):
    """``img``'s bands renamed by name (source -> output); outputs whose source ``img`` lacks are masked
    placeholders. The result's band order is the mapping's, chosen by name."""
    import ee

    have = [(s, o) for s, o in mapping if s in available]
    lack = [o for s, o in mapping if s not in available]
    parts = []
    if have:
        parts.append(img.select([s for s, _ in have], [o for _, o in have]))
    if lack:
        parts.append(_placeholder(lack))
    return ee.Image.cat(parts).select([o for _, o in mapping])


def _name(m: Modality, band: str) -> str:
    return f"{m.name}{SEP}{band}"


def _typed(img, m: Modality):
    """Unmask with the registry fill (uint) or :data:`FLOAT_FILL` (float), round continuous bands
    before an integer cast, and cast to the dtype requested from Earth Engine."""
    kind = EE_DTYPES[m.dtype]
    if kind == "float32":
        return img.unmask(FLOAT_FILL, False).toFloat()
    if m.resampling == "bilinear":
        img = img.round()
    img = img.unmask(m.fill, False)
    return {"uint8": img.toUint8, "uint16": img.toUint16}[kind]()


def _sentinel2(scene: SceneChoice, m: Modality):
    import ee

    s2 = ee.Image(f"{scene.s2_collection}/{scene.s2_id}")
    mapping = [(b, _name(m, b)) for b in m.bands]
    return _bands(s2, mapping, S2_SPECTRAL[scene.s2_product]).resample("bilinear")


def _sentinel2_masks(scene: SceneChoice, m: Modality):
    import ee

    s2 = ee.Image(f"{scene.s2_collection}/{scene.s2_id}")
    maps = _bands(s2, [("SCL", _name(m, "SCL")), ("MSK_CLDPRB", _name(m, "MSK_CLDPRB"))], scene.s2_bands)
    out = _name(m, "QA60")
    if "MSK_CLASSI_OPAQUE" in scene.s2_bands:  # processing baseline 04.00+: QA60 is empty
        opaque = s2.select(["MSK_CLASSI_OPAQUE"], [out]).gt(0)
        cirrus = s2.select(["MSK_CLASSI_CIRRUS"], [out]).gt(0)
        flags = cirrus.multiply(2).where(opaque, 1)
    elif "QA60" in scene.s2_bands:
        qa = s2.select(["QA60"], [out]).rightShift(10).bitwiseAnd(3)
        flags = qa.where(qa.eq(3), 1)  # opaque and cirrus both set: opaque
    else:
        flags = _placeholder([out])
    return ee.Image.cat([maps, flags])


def _sentinel1(scene: SceneChoice, m: Modality):
    import ee

    parts = []
    for _, suffix in ORBITS:
        p = scene.s1[suffix]
        mapping = [(pol, _name(m, f"{pol}_{suffix}")) for pol in get("sentinel1").ee.bands]
        if p.present:
            slices = [ee.Image(f"{m.ee.collection}/{i}").resample("bilinear") for i in p.ids]
            img = ee.ImageCollection.fromImages(slices).mosaic()
            parts.append(_bands(img, mapping, p.pols))
        else:
            parts.append(_placeholder([o for _, o in mapping]))
    return ee.Image.cat(parts).select([_name(m, b) for b in S1_BANDS])


def _dem(t: TileRequest, scene: SceneChoice, m: Modality):
    """GLO-30 onto a 30 m grid in the tile's UTM zone, aligned with the tile's corner; slope there;
    both resampled bilinearly to the tile grid by the request."""
    import ee

    if not scene.n_dem:
        return _placeholder([_name(m, "elevation"), _name(m, "slope")])
    r = m.ee
    native = r.params["native_m"]
    _, _, c, _, _, f = t.transform
    dem = (
        _map(dem_tiles(t), lambda im: im.select(list(r.bands)).resample("bilinear"), "_mm_dem")
        .mosaic()
        .reproject(crs=f"EPSG:{t.epsg}", crsTransform=[native, 0, c, 0, -native, f])
    )
    slope = ee.Terrain.slope(dem)
    return ee.Image.cat(
        [dem.select([r.bands[0]], [_name(m, "elevation")]), slope.select(["slope"], [_name(m, "slope")])]
    ).resample("bilinear")


def dynamic_world_images(t: TileRequest, year: int):
    """Dynamic World's images over the tile in ``year`` (the values request counts them)."""
    import ee

    m = get("dynamic_world")
    return (
        ee.ImageCollection(m.ee.collection)
        .filterBounds(tile_region(t))
        .filterDate(f"{year}-01-01", f"{year + 1}-01-01")
    )


def dem_tiles(t: TileRequest):
    """The GLO-30 tiles around the tile (a margin of two DEM pixels, for the slope at the edges)."""
    import ee

    r = get("dem").ee
    return ee.ImageCollection(r.collection).filterBounds(tile_region(t).buffer(2 * r.params["native_m"]))


def _dynamic_world(t: TileRequest, scene: SceneChoice, m: Modality):
    if not scene.n_dynamic_world:
        return _placeholder([_name(m, b) for b in m.bands])
    col = _map(dynamic_world_images(t, t.year), lambda im: im.select(list(m.ee.bands)), "_mm_dw")
    return col.mode().add(1).select(list(m.ee.bands), [_name(m, b) for b in m.bands])


def _first_of(m: Modality):
    import ee

    return (
        ee.ImageCollection(m.ee.collection).first().select(list(m.ee.bands), [_name(m, b) for b in m.bands])
    )


def _canopy(m: Modality):
    import ee

    h = ee.Image(m.ee.collection).select([m.ee.bands[0]], [_name(m, "height")])
    sd = ee.Image(m.ee.params["std_asset"]).select([m.ee.bands[0]], [_name(m, "std")])
    return ee.Image.cat([h, sd]).resample("bilinear")


def pixel_image(t: TileRequest, modalities: tuple[Modality, ...], scene: SceneChoice):
    """Every requested pixel modality stacked into one ee.Image, bands named ``<modality>__<band>`` and
    put in registry order by name."""
    import ee

    recipes: dict[str, Callable[[Modality], Any]] = {
        "sentinel2": lambda m: _sentinel2(scene, m),
        "sentinel2_masks": lambda m: _sentinel2_masks(scene, m),
        "sentinel1": lambda m: _sentinel1(scene, m),
        "dem": lambda m: _dem(t, scene, m),
        "dynamic_world": lambda m: _dynamic_world(t, scene, m),
        "esa_worldcover": _first_of,
        "canopy_height": _canopy,
    }
    parts = []
    for m in modalities:
        if m.kind != "pixel":
            continue
        if m.name not in recipes:
            raise SourceError(f"the earthengine source has no recipe for pixel modality {m.name}")
        parts.append(_typed(recipes[m.name](m), m))
    return ee.Image.cat(parts).select(band_ids(modalities))


def band_ids(modalities: tuple[Modality, ...]) -> list[str]:
    return [_name(m, b) for m in modalities if m.kind == "pixel" for b in m.bands]


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
            "Engine's 48 MB limit; use a smaller `tile_size` or fewer `modalities`"
        )


def pixels_request(t: TileRequest, modalities: tuple[Modality, ...], scene: SceneChoice) -> dict[str, Any]:
    """The computePixels request of one tile: the stacked expression on the tile's exact grid."""
    check_request_size(modalities, t.size)
    a, b, c, d, e, f = t.transform
    return {
        "expression": pixel_image(t, modalities, scene),
        "fileFormat": "NUMPY_NDARRAY",
        "bandIds": band_ids(modalities),
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


def resolve_labels_expression(lat: Sequence[float], lon: Sequence[float], buffer_m: float):
    """RESOLVE Ecoregions 2017 labels of many locations in one ``computeValue``: a list of
    ``[index, BIOME_NUM, ECO_ID, distance_m]`` per location, from a spatial join that keeps, for each
    point, the nearest ecoregion polygon within ``buffer_m`` (0 m inside a polygon); ``-1`` labels
    where no polygon is in reach. The coordinates travel once, as one constant list."""
    import ee

    coords = ee.List([[round(float(x), 6), round(float(y), 6)] for x, y in zip(lon, lat, strict=True)])
    points = ee.FeatureCollection(
        ee.List.sequence(0, len(lat) - 1).map(
            lambda i: ee.Feature(ee.Geometry.Point(coords.get(i)), {"i": i})
        )
    )
    near = ee.Filter.withinDistance(
        distance=buffer_m, leftField=".geo", rightField=".geo", maxError=MAX_ERROR_M
    )
    joined = ee.Join.saveBest(matchKey="eco", measureKey="dist", outer=True).apply(
        points, ee.FeatureCollection(get("biome").ee.collection), near
    )

    def row(f):
        eco = f.get("eco")
        return ee.Feature(
            None,
            {
                "i": f.get("i"),
                "biome": ee.Algorithms.If(eco, ee.Feature(eco).get("BIOME_NUM"), -1),
                "eco": ee.Algorithms.If(eco, ee.Feature(eco).get("ECO_ID"), -1),
                "dist": ee.Algorithms.If(eco, f.get("dist"), -1),
            },
        )

    return (
        _map(joined, row, "_mm_point", "Feature")
        .reduceColumns(ee.Reducer.toList(4), ["i", "biome", "eco", "dist"])
        .get("list")
    )


# --- decoding ---------------------------------------------------------------------------------------
def decode_pixels(arr: Any, t: TileRequest, modalities: tuple[Modality, ...]) -> dict[str, np.ndarray]:
    """Structured (H, W) array from computePixels -> registry arrays (``FLOAT_FILL`` -> NaN);
    PermanentError if malformed."""
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None:
        raise PermanentError(f"computePixels returned {type(arr).__name__}, not a structured numpy array")
    if arr.shape != (t.size, t.size):
        raise PermanentError(f"computePixels returned shape {arr.shape}, expected {(t.size, t.size)}")
    out = {}
    for m in modalities:
        if m.kind != "pixel":
            continue
        missing = [b for b in m.bands if _name(m, b) not in arr.dtype.names]
        if missing:
            raise PermanentError(f"band {_name(m, missing[0])} missing from the computePixels response")
        stack = np.stack([np.asarray(arr[_name(m, b)]) for b in m.bands])
        if EE_DTYPES[m.dtype] == "float32":
            stack = np.where(stack == FLOAT_FILL, np.nan, stack)
        out[m.name] = stack.astype(m.np_dtype)
    return out


def _s1_of(v: Any) -> S1Pass:
    if not isinstance(v, dict) or not isinstance(v.get("ids", []), list):
        raise PermanentError(f"computeValue returned a Sentinel-1 pass of type {type(v).__name__}")
    ids = tuple(str(i) for i in v.get("ids") or ())
    if not ids:
        return S1Pass()
    pols = tuple(str(p) for p in v.get("pols") or ())
    if v.get("time") is None or not pols:
        raise PermanentError("computeValue returned a Sentinel-1 pass without time or polarisations")
    return S1Pass(ids, int(v["time"]), pols, None if v.get("rel_orbit") is None else int(v["rel_orbit"]))


def decode_values(v: Any) -> SceneChoice | None:
    """The values response -> :class:`SceneChoice`; None when the tile has no acceptable scene."""
    if not isinstance(v, dict) or "n_scenes" not in v:
        raise PermanentError(f"computeValue returned {type(v).__name__} without n_scenes")
    if not v["n_scenes"]:
        return None
    need = ("s2_product", "s2_id", "s2_time", "s2_bands", "s2_cloud", "s1_asc", "s1_desc", "era5")
    missing = [k for k in need if v.get(k) is None]
    if missing:
        raise PermanentError(f"computeValue response lacks {', '.join(missing)}")
    if v["s2_product"] not in S2_SPECTRAL:
        raise PermanentError(f"computeValue returned an unknown Sentinel-2 product {v['s2_product']!r}")
    if not isinstance(v["era5"], list) or len(v["era5"]) != len(ERA5_BANDS):
        raise PermanentError("computeValue response lacks the 12 ERA5 values")
    return SceneChoice(
        s2_product=str(v["s2_product"]),
        s2_id=str(v["s2_id"]),
        s2_time_ms=int(v["s2_time"]),
        s2_bands=tuple(str(b) for b in v["s2_bands"]),
        cloud=float(v["s2_cloud"]),
        cloud_source=str(v.get("s2_cloud_source") or "unknown"),
        s1={"asc": _s1_of(v["s1_asc"]), "desc": _s1_of(v["s1_desc"])},
        era5=tuple(None if x is None else float(x) for x in v["era5"]),
        n_scenes=int(v["n_scenes"]),
        granule_cloud=None if v.get("s2_granule_cloud") is None else float(v["s2_granule_cloud"]),
        n_dynamic_world=int(v.get("n_dynamic_world", 1) or 0),
        n_dem=int(v.get("n_dem", 1) or 0),
    )


def decode_labels(v: Any, n: int) -> np.ndarray:
    """The labels response -> an (n, 3) float array of (biome, ecoregion, distance_m); -1 where no
    RESOLVE polygon is within reach."""
    if not isinstance(v, list) or len(v) != n:
        raise PermanentError(f"RESOLVE labels: expected {n} rows, got {type(v).__name__} of {len(v or [])}")
    out = np.full((n, 3), -1.0)
    for row in v:
        if not isinstance(row, list) or len(row) != 4:
            raise PermanentError(f"RESOLVE labels: malformed row {row!r}")
        i = int(row[0])
        out[i] = [-1 if x is None else float(x) for x in row[1:]]
    return out


# --- the source -------------------------------------------------------------------------------------
class EarthEngineSource:
    name = "earthengine"
    years = YEARS
    version = "2"  # the recipe; changes whenever the requests it sends for a tile do
    labels = "RESOLVE/ECOREGIONS/2017"  # the plan's biome labels come from here (see label_locations)

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
                self._transport = ee_transport(self.cfg)
        return self._transport

    def check(self, tile_size: int, modalities: tuple[Modality, ...]) -> None:
        """Everything that can be checked without a request: scene policy, request size, project and
        credentials (skipped with a registered transport). Raises SourceError naming the problem."""
        c = self.cfg
        if c.scene_choice not in ("least_cloudy", "random"):
            raise SourceError(f"`scene_choice` {c.scene_choice!r}: use random or least_cloudy")
        if c.s2_level not in ("auto", "L2A", "L1C"):
            raise SourceError(f"`s2_level` {c.s2_level!r}: use auto, L2A or L1C")
        if c.max_in_flight < 1:
            raise SourceError("`max_in_flight` must be at least 1")
        for flag, v, lo, hi in (
            ("`max_scene_cloud`", c.max_scene_cloud, 0, 100),
            ("`max_granule_cloud`", c.max_granule_cloud, 0, 100),
            ("`cs_threshold`", c.cs_threshold, 0, 1),
        ):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi):
                raise SourceError(f"{flag} {v!r}: use a number from {lo} to {hi}")
        if c.months is not None and not (
            len(c.months) == 2 and all(isinstance(m, int) and 1 <= m <= 12 for m in c.months)
        ):
            raise SourceError(f"`months` {c.months!r}: use FIRST-LAST calendar months, e.g. 6-8 or 11-2")
        if c.max_gap_days < 0 or c.era5_buffer_m < 0 or c.resolve_buffer_m < 0:
            raise SourceError("`max_gap_days` and the buffers must not be negative")
        check_request_size(modalities, tile_size)
        if c.concurrency_limit:
            check_concurrency_limit(c.concurrency_limit)
        if c.transport is None:
            resolve_project(c)
            credentials(c)
            host = (HIGH_VOLUME_URL if c.high_volume else DEFAULT_URL).split("://", 1)[1]
            for h in (host, TOKEN_HOST):
                check_reachable(h)

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "source": self.name,
            "recipe_version": self.version,
            "project": c.project or os.environ.get("EE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT"),
            "endpoint": HIGH_VOLUME_URL if c.high_volume else "default",
            "max_scene_cloud": c.max_scene_cloud,
            "max_granule_cloud": c.max_granule_cloud,
            "cloud_score": f"{get('sentinel2').ee.params['cloud_score_collection']} cs < {c.cs_threshold}",
            "scene_choice": c.scene_choice,
            "s2_level": c.s2_level,
            "max_gap_days": c.max_gap_days,
            "months": list(c.months) if c.months else None,
            "era5_buffer_m": c.era5_buffer_m,
            "biome_labels": f"{self.labels} (nearest polygon within {c.resolve_buffer_m:g} m)",
            "max_in_flight": c.max_in_flight,
        }

    def _call(self, send: Callable[[], Any], rng: random.Random, priority: tuple = ()) -> Any:
        return with_retries(send, self.cfg, self.limiter, self.sleep, rng, priority)

    def label_locations(self, lat: Sequence[float], lon: Sequence[float]) -> np.ndarray:
        """RESOLVE (biome, ecoregion, distance_m) of each location, -1 where no polygon lies within
        ``resolve_buffer_m``; batches of :data:`LABEL_BATCH` points, sent concurrently under the cap.
        Raises SourceError when a batch fails for good (nothing is planned on half the labels)."""
        lat, lon = np.asarray(lat, float), np.asarray(lon, float)
        n = len(lat)
        if n == 0:
            return np.zeros((0, 3))
        self.transport  # noqa: B018 (initialises ee before expressions are built)
        starts = list(range(0, n, LABEL_BATCH))

        def one(k: int) -> np.ndarray:
            s = slice(k, min(k + LABEL_BATCH, n))
            expr = resolve_labels_expression(lat[s], lon[s], self.cfg.resolve_buffer_m)
            rng = random.Random(zlib.crc32(f"{self.cfg.seed}/labels/{k}".encode()))
            got = self._call(lambda: self.transport.compute_value(expr, f"resolve-labels-{k}"), rng, (-1, k))
            return decode_labels(got, s.stop - s.start)

        try:
            if len(starts) == 1:  # on this thread (ee's profiler hooks are per thread)
                parts = [one(0)]
            else:
                with ThreadPoolExecutor(max(1, min(len(starts), self.cfg.max_in_flight, 8))) as pool:
                    parts = list(pool.map(one, starts))
        except SourceError:
            raise
        except Exception as err:
            raise SourceError(
                f"labelling {n} locations with {self.labels} failed ({failure_text(err)}); "
                "nothing was written: check the project's Earth Engine access and re-run"
            ) from err
        return np.concatenate(parts)

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
            scene = decode_values(
                self._call(lambda: self.transport.compute_value(expr, t.tile_id), rng, priority)
            )
            if scene is None and t.s2_id:
                return TileFailure(
                    t.tile_id,
                    "sentinel2",
                    f"the tile's stored scene {t.s2_id} is no longer in "
                    f"{collection_of(t.s2_product or 'L2A')}",
                )
            if scene is None:
                return TileFailure(
                    t.tile_id,
                    "sentinel2",
                    f"no {'/'.join(self.cfg.levels())} scene of {t.year} covers the tile with at most "
                    f"{self.cfg.max_scene_cloud:g} % cloudy pixels",
                )
            stage = "pixels"
            req = pixels_request(t, modalities, scene)
            raw = self._call(lambda: self.transport.compute_pixels(req, t.tile_id), rng, priority)
            stage = "decode"
            pixels = decode_pixels(raw, t, modalities)
        except SourceError:
            raise
        except Exception as err:
            return TileFailure(t.tile_id, stage, failure_text(err))
        return tile_result(t, modalities, scene, pixels)


def failure_text(err: BaseException) -> str:
    """'HTTP 429: message' or 'EEException: message', at most 200 characters of the message."""
    kind = f"HTTP {status_of(err)}" if status_of(err) else type(err).__name__
    detail = getattr(err, "reason", None) or str(err)
    return f"{kind}: {str(detail)[:200]}"


def tile_result(
    t: TileRequest, modalities: tuple[Modality, ...], scene: SceneChoice, pixels: dict[str, np.ndarray]
) -> TileResult:
    """A tile's arrays and provenance from the chosen scenes and the decoded pixels. Biome and
    ecoregion are the plan's (RESOLVE's, labelled before export)."""
    arrays = empty_arrays(modalities, t.size)
    arrays.update(pixels)
    present = {m.name: True for m in modalities}
    if "sentinel1" in arrays:
        present["sentinel1"] = any(p.present for p in scene.s1.values())
    for name, n in (("dynamic_world", scene.n_dynamic_world), ("dem", scene.n_dem)):
        if name in arrays:
            present[name] = n > 0
    if "era5" in arrays:
        arrays["era5"] = np.array([np.nan if v is None else v for v in scene.era5], np.float32)
        present["era5"] = bool(np.isfinite(arrays["era5"]).any())
    for name, value in (("biome", t.biome), ("ecoregion", t.ecoregion)):
        if name in arrays:
            m = get(name)
            arrays[name] = np.asarray(value if value and value > 0 else m.fill, m.np_dtype)
            present[name] = bool(value and value > 0)
    return TileResult(
        tile_id=t.tile_id,
        arrays=arrays,
        present=present,
        s2_date=scene.s2_date,
        s2_product=scene.s2_product,
        extra={
            "cloud_fraction": scene.cloud / 100.0,
            "s2_id": scene.s2_id,
            "cloud_score": scene.cloud,
            "cloud_score_source": scene.cloud_source,
            "s1_ids": {o: ",".join(p.ids) for o, p in scene.s1.items()},
            "s1_date": {o: scene.s1_date(o) for o in scene.s1},
            "s1_gap_days": {o: scene.s1_gap_days(o) for o in scene.s1},
        },
    )


def make_earthengine_source(options: dict[str, Any]) -> EarthEngineSource:
    known = set(EEConfig.__dataclass_fields__)
    unknown = set(options) - known
    if unknown:
        raise SourceError(
            f"unknown earthengine options {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
        )
    return EarthEngineSource(EEConfig(**options))
