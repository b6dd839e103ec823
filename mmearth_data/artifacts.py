"""The build's artifacts beside a store (``<store without .zarr>.build/``) and the copy of the store's
metadata kept there, from which a damaged ``zarr.json`` is restored.

Data flow: :mod:`.build` writes the plan, plots and failures there and takes the metadata copy when it
creates or changes a store; :mod:`.validate` compares the store with the copy; repair restores from it.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec

from mmearth_data.store import StoreError, metadata_documents, metadata_problems


def build_dir(store: str) -> str:
    """Folder (path or URL) for the build's artifacts: the store's name without .zarr, plus .build."""
    base = store.rstrip("/")
    return (base[: -len(".zarr")] if base.endswith(".zarr") else base) + ".build"


def write_whole(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` on ``fs`` whole or not at all (beside it, then moved into place)."""
    fs.pipe_file(f"{path}.tmp", data)
    fs.mv(f"{path}.tmp", path)


METADATA_COPY = "metadata.json"


def save_metadata_copy(store: str, source: str | None = None) -> None:
    """Keep every ``zarr.json`` of the store (read from ``source``, by default the store itself) in
    ``<store>.build/metadata.json``, written whole or not at all, for :func:`restore_metadata`. Taken
    when the store is created; whatever changes the store's layout must take it again."""
    docs = {k: v.decode() for k, v in metadata_documents(source or store).items()}
    fs, path = fsspec.core.url_to_fs(f"{build_dir(store)}/{METADATA_COPY}")
    fs.makedirs(fs._parent(path), exist_ok=True)
    write_whole(fs, path, json.dumps(docs, indent=0).encode())


def load_metadata_copy(store: str) -> dict[str, str] | None:
    """The copy :func:`save_metadata_copy` keeps, or None when there is none (or it is unreadable)."""
    fs, path = fsspec.core.url_to_fs(f"{build_dir(store)}/{METADATA_COPY}")
    try:
        docs = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    return docs if isinstance(docs, dict) and "zarr.json" in docs else None


def damaged_metadata(store: str) -> tuple[dict[str, str] | None, dict[str, str]]:
    """(the build's metadata copy or None, ``{key: problem}`` for every missing or damaged
    ``zarr.json``); no problems where there is no store at all (the reader says so)."""
    copy = load_metadata_copy(store)
    fs, root = fsspec.core.url_to_fs(store)
    root = root.rstrip("/")
    found = [p[len(root) + 1 :] for p in fs.glob(f"{root}/*/zarr.json")]
    problems = metadata_problems(store, sorted(set(copy or ()) | set(found) | {"zarr.json"}))
    if copy is None and problems.get("zarr.json") == "missing":
        return None, {}
    return copy, problems


def restore_metadata(store: str) -> list[str]:
    """Rewrite every missing or damaged ``zarr.json`` of the store from the build's copy; returns the
    keys restored. Raises :class:`StoreError` when some are damaged and there is no copy."""
    copy, problems = damaged_metadata(store)
    if not problems:
        return []
    if copy is None or any(k not in copy for k in problems):
        listed = ", ".join(f"{k} ({v})" for k, v in problems.items())
        raise StoreError(
            f"{store}: damaged metadata {listed} and no copy of it in {build_dir(store)}/{METADATA_COPY}; "
            "restore those files from a copy of your own, or rebuild into a new `store` (nothing was changed)"
        )
    fs, root = fsspec.core.url_to_fs(store)
    for key in sorted(problems):
        target = f"{root.rstrip('/')}/{key}"
        fs.makedirs(fs._parent(target), exist_ok=True)
        write_whole(fs, target, copy[key].encode())
    return sorted(problems)
