"""``mmearth catalog build|search|serve``: the catalog's command line (registered into ``mmearth`` by
``flows.cli``; also ``python -m catalog.cli build|search|serve``)."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from mmearth_data.argtypes import cli_terms, int_in, percent, years
from mmearth_data.store import StoreError

console = Console(stderr=False)
err_console = Console(stderr=True, soft_wrap=True)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``catalog`` and its subcommands on ``sub`` (a parser's subparsers)."""
    c = sub.add_parser("catalog", help="STAC catalog of a store: build, search, serve")
    csub = c.add_subparsers(dest="catalog_command", required=True)
    cb = csub.add_parser("build", help="write collection.json, items.parquet and quicklooks")
    cb.add_argument("--store", required=True)
    cb.add_argument("--out", required=True, help="catalog directory")
    cb.add_argument("--quicklooks", default="auto", help="auto (up to 20000 tiles), all or none")
    cb.add_argument("--json-items", action="store_true", help="also write static JSON items (small corpora)")
    cb.add_argument(
        "--batch-tiles",
        type=int_in(1, None, "--batch-tiles"),
        default=50_000,
        help="tiles per streamed batch",
    )
    cs = csub.add_parser("search", help="find tiles; print a table or GeoJSON, or write a tile list")
    cs.add_argument("--catalog", required=True)
    cs.add_argument("--bbox", help="west,south,east,north (degrees)")
    cs.add_argument("--datetime", help="YYYY-MM-DD or START/END (.. for open)")
    cs.add_argument("--biome", help="biome numbers or names, comma separated")
    cs.add_argument("--year", type=years, help="years, comma separated or a range 2017-2020")
    cs.add_argument("--has", default="", help="modalities the tiles must have, comma separated")
    cs.add_argument("--max-cloud", type=percent, help="maximum cloud cover, per cent")
    cs.add_argument("--split", choices=["train", "val", "test"])
    cs.add_argument("--limit", type=int_in(1, None, "--limit"), default=None)
    cs.add_argument("--format", choices=["table", "geojson"], default="table")
    cs.add_argument("--write-tiles", help="write the matching tile ids here (for model.pretrain --tiles)")
    cv = csub.add_parser("serve", help="local read-only browse page")
    cv.add_argument("--catalog", required=True)
    cv.add_argument("--host", default="127.0.0.1")
    cv.add_argument("--port", type=int_in(0, 65535, "the port"), default=8765)
    return c


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``catalog`` command; 0 on success, 2 on a user error (printed)."""
    from catalog.build import CatalogError
    from catalog.search import SearchError

    try:
        if args.catalog_command == "build":
            from catalog.build import build_catalog

            res = build_catalog(
                args.store, args.out, args.batch_tiles, quicklooks=args.quicklooks, json_items=args.json_items
            )
            console.print(
                f"catalog of {res['n_items']} items in {res['seconds']:.1f} s: {res['collection']}, "
                f"{res['items']} ({res['quicklooks']} quicklooks)"
            )
            return 0
        if args.catalog_command == "search":
            return _catalog_search(args)
        if args.catalog_command == "serve":
            from catalog.serve import serve

            def announce(url: str) -> None:
                console.print(f"browse the catalog at {url}  (Ctrl-C stops)")

            serve(args.catalog, args.host, args.port, announce=announce)
            return 0
    except (SearchError, CatalogError, StoreError, FileNotFoundError) as err:
        err_console.print(f"[bold red]error:[/] {cli_terms(err)}")
        return 2
    return 2


def _catalog_search(args: argparse.Namespace) -> int:
    from rich.table import Table

    from catalog.search import (
        Query,
        check_tile_list_path,
        geojson,
        parse_bbox,
        parse_biomes,
        parse_datetime,
        search,
        to_rows,
        write_tile_list,
    )

    q = Query(
        bbox=parse_bbox(args.bbox) if args.bbox else None,
        datetime=parse_datetime(args.datetime) if args.datetime else None,
        biome=parse_biomes(args.biome) if args.biome else None,
        year=args.year,
        has=tuple(h.strip() for h in args.has.split(",") if h.strip()),
        max_cloud=args.max_cloud,
        split=args.split,
        limit=args.limit,
    )
    if args.write_tiles:
        check_tile_list_path(args.write_tiles)  # before searching: nothing is overwritten
    table = search(args.catalog, q)
    if args.write_tiles:
        n = write_tile_list(table, args.write_tiles, " ".join(sys.argv[1:]))
        err_console.print(f"{n} tile ids written to {args.write_tiles}")
    if args.format == "geojson":
        print(json.dumps(geojson(args.catalog, table)))
        return 0
    rows = to_rows(table)
    t = Table(title=f"{len(rows)} tiles")
    for col in ("id", "date", "biome", "year", "split", "S2", "cloud %", "lat", "lon"):
        t.add_column(col)
    for r in rows[:200]:
        cloud = r["eo:cloud_cover"]
        t.add_row(
            r["id"], r["datetime"], f"{r['mmearth:biome']} {r['biome_name'][:28]}", str(r["mmearth:year"]),
            r["mmearth:split"], r["mmearth:s2_product"], "" if cloud is None else f"{cloud:.1f}",
            f"{r['lat']:.4f}", f"{r['lon']:.4f}",
        )  # fmt: skip
    console.print(t)
    if len(rows) > 200:
        console.print(f"... {len(rows) - 200} more (use --write-tiles or --format geojson for all)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m catalog.cli")
    sub = ap.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(ap.parse_args(["catalog", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
