"""The code's layout: no import cycles, one module per store format touches zarr, short functions,
readers that use the registry recorded in the store. Read from the source with ``ast``: fast, no
imports executed."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmearth_data", "flows", "model", "catalog")
# store.py owns every Zarr store: the corpus store and the downstream task store
ZARR_OWNERS = {"mmearth_data/store.py"}
MAX_LINES = 80
# functions allowed over MAX_LINES, with their length: none may grow, none may be added, and one that
# shrinks under the limit must leave the list (the test says so); empty now
LONG: dict[str, int] = {}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports, at the top or inside functions (deferred imports
    close cycles too); ``from pkg import sub`` counts as importing the submodule alone."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [node.module, *subs]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    g = import_graph()
    assert cycles(g) == []
    g["mmearth_data.registry"] = g["mmearth_data.registry"] | {"mmearth_data.store"}  # store imports registry
    (found,) = cycles(g)
    assert {"mmearth_data.registry", "mmearth_data.store"} <= set(found)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_layers_import_downwards_only():
    """mmearth_data (the corpus) imports none of the others; model and catalog import mmearth_data
    only; flows may import them all."""
    below = {"mmearth_data": set(), "model": {"mmearth_data"}, "catalog": {"mmearth_data"}}
    wrong = [
        f"{m} imports {t}"
        for m, targets in import_graph().items()
        for t in targets
        if m.split(".")[0] in below and t.split(".")[0] not in below[m.split(".")[0]] | {m.split(".")[0]}
    ]
    assert not wrong, wrong


def test_the_store_depends_on_the_tile_records_not_on_the_sources():
    g = import_graph()
    assert "mmearth_data.tiles" in g["mmearth_data.store"]
    assert not {m for m in g["mmearth_data.store"] if m.startswith("mmearth_data.sources")}


def test_only_the_store_modules_open_zarr():
    offenders = []
    for path in modules().values():
        rel = str(path.relative_to(ROOT))
        if rel in ZARR_OWNERS:
            continue
        tree = ast.parse(path.read_text())
        called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}  # m.group(1) of a regex
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "group" and id(node) not in called:
                offenders.append(f"{rel}:{node.lineno} .group")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "zarr"
                and node.attr.startswith("open")
            ):
                offenders.append(f"{rel}:{node.lineno} zarr.{node.attr}")
    assert not offenders, "zarr groups opened or indexed outside the store modules: " + ", ".join(offenders)


def function_lengths() -> dict[str, int]:
    """``file:Class.function`` -> lines, for every function and method (nested ones included)."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, rel: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    key = f"{rel}:{name}"
                    out[key] = max(out.get(key, 0), child.end_lineno - child.lineno + 1)
                visit(child, rel, f"{name}.")
            else:
                visit(child, rel, prefix)

    for path in modules().values():
        visit(ast.parse(path.read_text()), str(path.relative_to(ROOT)), "")
    return out


def test_functions_are_short():
    lengths = function_lengths()
    new = {k: v for k, v in lengths.items() if v > MAX_LINES and k not in LONG}
    grown = {k: (LONG[k], v) for k, v in lengths.items() if k in LONG and v > LONG[k]}
    done = sorted(k for k in LONG if lengths.get(k, 0) <= MAX_LINES)
    assert not new, f"functions over {MAX_LINES} lines: {new}"
    assert not grown, f"long functions that grew (listed, now): {grown}"
    assert not done, f"now {MAX_LINES} lines or shorter: remove {done} from LONG"


def test_reader_uses_the_registry_recorded_in_the_store(tmp_path):
    from mmearth_data.registry import MODALITIES, Modality
    from mmearth_data.store import CorpusReader, StoreError, create_store

    url = str(tmp_path / "s.zarr")
    mods = tuple(m for m in MODALITIES if m.name in ("sentinel2", "dem", "biome"))
    create_store(url, n_tiles=4, tile_size=32, modalities=mods, chunk_tiles=4, shard_tiles=4, attrs={})
    for m in MODALITIES:  # the record reads back as the live registry wrote it
        assert Modality.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    g = zarr.open_group(url, mode="r+")
    recorded = dict(g.attrs["registry"])
    recorded["dem"] = recorded["dem"] | {"description": "DEM as this store recorded it", "units": "ft"}
    g.attrs["registry"] = recorded
    r = CorpusReader(url)
    dem = next(m for m in r.modalities if m.name == "dem")
    assert (dem.description, dem.units) == ("DEM as this store recorded it", "ft")
    assert np.isnan(dem.fill) and dem.nan_fill and dem.nodata is None
    recorded["dem"] = recorded["dem"] | {"colour": "brown"}
    g.attrs["registry"] = recorded
    with pytest.raises(StoreError, match=r"unknown registry fields \['colour'\].*newer"):
        CorpusReader(url)
