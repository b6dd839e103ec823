"""A local, read-only browse page for a corpus catalog: ``mmearth catalog serve --catalog DIR``.

Routes (everything else is 404):

- ``/``                        the page (``catalog/static/index.html``)
- ``/api/collection``          the collection JSON
- ``/api/land.png``            the land outline, drawn from the committed world layers (no tile server)
- ``/api/tiles?...``           tiles matching the filters of ``mmearth catalog search`` (capped by ``limit``)
- ``/api/tiles/<tile id>``     one tile: item properties and its tile-level values read from the store
- ``/quicklooks/<tile id>.png`` the tile's quicklook (the catalog's file, else drawn from the store)
- ``/api/browse/summary``      exact counts of the filters in the viewport (``bbox``), biome x year table
- ``/api/browse/density.png``  counts per screen cell of the viewport (``w`` x ``h`` cells), as an image
- ``/api/browse/footprints``   the viewport's tile footprints as GeoJSON (up to 5000)
- ``/api/browse/tiles.txt``    the selection's tile ids, one per line (``model.pretrain --tiles``)
- ``/vendor/leaflet/<file>``   the map library installed by ``make install`` (``catalog/vendor.py``)

The browse queries take the filters of ``mmearth catalog search`` (``biome``, ``year`` as 2018, 2017-2020
or 2017,2019, ``has``, ``max_cloud``, ``datetime``, ``split``); :class:`catalog.browse.BrowseIndex` answers.

Nothing is served by path: a tile id must look like a grid id and be one of the catalog's items, so no
request can reach a file outside the catalog or the store. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from catalog.browse import MAX_FOOTPRINTS, BrowseIndex, Filters
from catalog.build import resolve_store
from catalog.quicklook import PANELS, png_bytes, strip
from catalog.search import Query as SearchQuery
from catalog.search import SearchError, items_path, parse_bbox, parse_biomes, parse_datetime, search, to_rows
from catalog.vendor import VENDOR
from mmearth_data.registry import BIOME_CLASSES
from mmearth_data.sampling import SamplingError, parse_years
from mmearth_data.store import CorpusReader

VENDOR_FILES = {
    "leaflet.js": "text/javascript", "leaflet.css": "text/css", "LICENSE": "text/plain",
    "VERSION.json": "application/json", "images/layers.png": "image/png", "images/layers-2x.png": "image/png",
    "images/marker-icon.png": "image/png", "images/marker-icon-2x.png": "image/png",
    "images/marker-shadow.png": "image/png",
}  # fmt: skip
TILE_ID = re.compile(r"^G\d{1,6}_\d{1,6}[UD]_\d{1,6}[RL]$")
STATIC = Path(__file__).resolve().parent / "static"
MAX_TILES = 20_000


def land_png(width: int = 1440) -> bytes:
    """Equirectangular land/sea image (width x width/2) from the world layers' 0.05 degree land share."""
    from mmearth_data.world import get_world

    land = get_world().land  # (3600, 7200), per cent land, row 0 at 90 N
    f = land.shape[1] // width
    coarse = (
        land[: land.shape[0] // f * f, : width * f].reshape(land.shape[0] // f, f, width, f).mean(axis=(1, 3))
    )
    img = np.empty(coarse.shape + (3,), np.uint8)
    img[:] = (203, 219, 232)  # sea
    img[coarse >= 50] = (236, 231, 220)  # land
    edge = (coarse >= 50) != (np.roll(coarse, 1, 0) >= 50)
    edge |= (coarse >= 50) != (np.roll(coarse, 1, 1) >= 50)
    img[edge] = (150, 150, 140)
    return png_bytes(img)


class HeadAsGet:
    """ASGI middleware: a HEAD request is answered as its GET (same status and headers, no body)
    instead of 405."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(dict(scope, method="GET"), receive, send_headers_only)


class OpenCatalog:
    """A catalog opened for serving: its collection, the store it describes (opened on first use), the
    tile ids it holds and their store indices, and the browse index."""

    def __init__(self, catalog: str | Path):
        self.path = Path(catalog).resolve()
        items_path(self.path)
        self.coll = json.loads((self.path / "collection.json").read_text())
        self.store_url = resolve_store(self.path, self.coll["assets"]["store"]["href"])
        t = ds.dataset(items_path(self.path), format="parquet").to_table(columns=["id", "mmearth:index"])
        self.index = dict(zip(t.column("id").to_pylist(), t.column("mmearth:index").to_pylist(), strict=True))
        self.browse = BrowseIndex(self.path)
        self._reader: CorpusReader | None = None

    def reader(self) -> CorpusReader:
        if self._reader is None:
            self._reader = CorpusReader(self.store_url)
        return self._reader

    def tile_index(self, tile_id: str) -> int:
        """The store index of ``tile_id``; 404 unless it is a grid id of this catalog's store."""
        if not TILE_ID.match(tile_id) or tile_id not in self.index:
            raise HTTPException(404, "no such tile")
        i = int(self.index[tile_id])
        if i >= self.reader().n_tiles:
            raise HTTPException(404, f"tile {tile_id} is not in the catalog's store")
        return i

    def filters(self, request: Request) -> Filters:
        """The browse filters of a request; 400 for unknown parameters or bad values."""
        allowed = {"bbox", "biome", "year", "has", "max_cloud", "datetime", "split", "w", "h", "limit"}
        unknown = sorted(set(request.query_params) - allowed)
        if unknown:
            raise HTTPException(
                400, f"unknown parameters {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
            )
        try:
            return Filters.parse(dict(request.query_params), self.browse.modalities)
        except (SearchError, ValueError) as err:
            raise HTTPException(400, str(err)) from None


def create_app(catalog: str | Path, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The browse app of ``catalog``. With ``allowed_hosts`` a request whose ``Host`` header names
    another host is refused (400), so that a page on another site cannot reach the catalog through a
    DNS name rebound to this address."""
    cat = OpenCatalog(catalog)
    app = FastAPI(title=f"{cat.coll['id']} catalog", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HeadAsGet)
    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    for router in (page_routes(cat), browse_routes(cat), tile_routes(cat)):
        app.include_router(router)
    return app


def page_routes(cat: OpenCatalog) -> APIRouter:
    """The page, the collection, the land outline and the map library."""
    r = APIRouter()

    @r.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (STATIC / "index.html").read_text()

    @r.get("/api/collection")
    def collection() -> JSONResponse:
        return JSONResponse(cat.coll)

    @r.get("/api/land.png")
    def land() -> Response:
        return Response(_land(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @r.get("/vendor/leaflet/{name:path}")
    def vendor(name: str) -> Response:
        if name not in VENDOR_FILES:
            raise HTTPException(404, "no such file")
        f = VENDOR / "leaflet" / name
        if not f.is_file():
            raise HTTPException(404, "the map library is not installed: run `make install` (npm)")
        return Response(
            f.read_bytes(), media_type=VENDOR_FILES[name], headers={"Cache-Control": "max-age=86400"}
        )

    return r


@lru_cache(maxsize=1)
def _land() -> bytes:
    return land_png(3600)  # 0.1 degree: the base layer when zoomed in


def browse_routes(cat: OpenCatalog) -> APIRouter:
    """The browse queries of the map: counts, density, footprints, the selection's tile list."""
    r = APIRouter(prefix="/api/browse")

    @r.get("/summary")
    def browse_summary(request: Request) -> dict[str, Any]:
        return cat.browse.summary(cat.filters(request))

    @r.get("/density.png")
    def browse_density(
        request: Request, w: int = Query(256, ge=1, le=1024), h: int = Query(128, ge=1, le=1024)
    ):
        try:
            png = cat.browse.density_png(cat.filters(request), w, h)
        except SearchError as err:
            raise HTTPException(400, str(err)) from None
        return Response(png, media_type="image/png")

    @r.get("/footprints")
    def browse_footprints(request: Request, limit: int = Query(MAX_FOOTPRINTS, ge=1, le=MAX_FOOTPRINTS)):
        return cat.browse.footprints(cat.filters(request), limit)

    @r.get("/tiles.txt")
    def browse_tiles(request: Request) -> Response:
        ids = cat.browse.tile_ids(cat.filters(request))
        return Response(
            "".join(f"{t}\n" for t in ids), media_type="text/plain",
            headers={"Content-Disposition": 'attachment; filename="tiles.txt"'},
        )  # fmt: skip

    return r


def tile_routes(cat: OpenCatalog) -> APIRouter:
    """Tiles: the search of ``mmearth catalog search``, one tile's record, its quicklook."""
    r = APIRouter()

    @r.get("/api/tiles")
    def tiles(
        bbox: str | None = None, datetime: str | None = None, biome: str | None = None,
        year: str | None = None, has: str | None = None, max_cloud: float | None = None,
        split: str | None = None, limit: int = Query(5000, ge=1, le=MAX_TILES),
    ) -> dict[str, Any]:  # fmt: skip
        try:
            q = SearchQuery(
                bbox=parse_bbox(bbox) if bbox else None,
                datetime=parse_datetime(datetime) if datetime else None,
                biome=parse_biomes(biome) if biome else None,
                year=parse_years(year) if year else None,
                has=tuple(h for h in (has or "").split(",") if h),
                max_cloud=max_cloud,
                split=split or None,
                limit=limit + 1,
            )
            rows = to_rows(search(cat.path, q))
        except (SearchError, SamplingError, ValueError) as err:
            raise HTTPException(400, str(err)) from None
        out = [
            {"id": r["id"], "lon": round(r["lon"], 5), "lat": round(r["lat"], 5), "biome": r["mmearth:biome"],
             "year": r["mmearth:year"], "cloud": r["eo:cloud_cover"], "date": r["datetime"]}
            for r in rows[:limit]
        ]  # fmt: skip
        return {"tiles": out, "count": len(out), "truncated": len(rows) > limit}

    @r.get("/api/tiles/{tile_id}")
    def tile(tile_id: str) -> dict[str, Any]:
        return tile_record(cat, tile_id)

    @r.get("/quicklooks/{name}")
    def quicklook(name: str) -> Response:
        if not name.endswith(".png"):
            raise HTTPException(404, "no such quicklook")
        tile_id = name[: -len(".png")]
        i = cat.tile_index(tile_id)
        f = cat.path / "quicklooks" / f"{tile_id}.png"  # tile_id is a validated grid id of this catalog
        if f.is_file():
            return Response(f.read_bytes(), media_type="image/png")
        rd = cat.reader()
        names = [p for p in PANELS if p in {m.name for m in rd.modalities}]
        got = rd.read(names + [f"{n}_present" for n in names], i, i + 1)
        arrays = {n: got[n][0] for n in names if bool(got[f"{n}_present"][0])}
        return Response(png_bytes(strip(arrays)), media_type="image/png")

    return r


def tile_record(cat: OpenCatalog, tile_id: str) -> dict[str, Any]:
    """One tile for the page: its item's properties, its tile-level values read from the store (with
    units and class names), and the build's provenance."""
    from catalog.search import full_items

    i = cat.tile_index(tile_id)
    item = full_items(cat.path, [tile_id])[0]
    rd = cat.reader()
    values: dict[str, Any] = {}
    for m in rd.modalities:
        if m.kind != "tile":
            continue
        v = rd.read([m.name], i, i + 1)[m.name][0]
        if m.scalar:
            code = int(v)
            values[m.name] = {"value": code, "name": (m.classes or {}).get(code, "")}
        else:
            values[m.name] = {
                b: {"value": None if not np.isfinite(x) else round(float(x), 4), "unit": m.unit_of(b)}
                for b, x in zip(m.bands, v.tolist(), strict=True)
            }
    build = cat.coll.get("mmearth:build", {})
    return {
        "id": tile_id,
        "properties": item["properties"],
        "bbox": item["bbox"],
        "values": values,
        "biome_name": BIOME_CLASSES.get(item["properties"]["mmearth:biome"], ""),
        "provenance": {
            "source": (build.get("config") or {}).get("source"),
            "config_hash": build.get("config_hash"),
            "schema_version": build.get("schema_version"),
            "versions": build.get("versions"),
        },
        "quicklook": f"/quicklooks/{tile_id}.png",
        "panels": list(PANELS),
    }


def allowed_hosts_for(host: str) -> list[str]:
    """``Host`` header values a server bound to ``host`` answers: the address itself, and the local
    names when it listens on a loopback address."""
    local = ("127.0.0.1", "localhost", "::1")
    return [host] + ([h for h in local if h != host] if host in local else [])


def serve(catalog: str | Path, host: str = "127.0.0.1", port: int = 8765, announce=None) -> None:
    """Serve the browse page of ``catalog`` (requests naming another host are refused); ``announce(url)``
    is called once the catalog has been opened, before the server starts."""
    import uvicorn

    app = create_app(catalog, allowed_hosts=allowed_hosts_for(host))
    if announce is not None:
        announce(f"http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level="warning")
