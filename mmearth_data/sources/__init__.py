"""Sources: (planned tiles, modalities) -> arrays on each tile's grid. See :mod:`.base`."""

from __future__ import annotations

from typing import Any

from mmearth_data.sources.base import Source, SourceError, TileFailure, TileRequest, TileResult

SOURCES = ("offline", "earthengine", "local")


def make_source(name: str, **options: Any) -> Source:
    """Instantiate the source called ``name`` with its options (seed, credentials, ...); option
    ``faults`` (a :class:`~mmearth_data.sources.faults.FaultSpec` text) wraps it in fault injection."""
    if options.get("faults"):
        from mmearth_data.sources.faults import FaultSpec, FaultySource

        inner = make_source(name, **{k: v for k, v in options.items() if k != "faults"})
        return FaultySource(inner, FaultSpec.parse(options["faults"]))
    if name == "offline":
        from mmearth_data.sources.offline import OfflineSource

        return OfflineSource(seed=options.get("seed", 0))
    if name == "earthengine":
        from mmearth_data.sources.earthengine import make_earthengine_source

        return make_earthengine_source(options)
    if name == "local":
        from mmearth_data.sources.local import make_local_source

        return make_local_source(options)
    raise SourceError(f"unknown source {name!r}; available sources: {', '.join(SOURCES)}")


def source_class(name: str) -> type:
    """The class of the source called ``name`` (its ``years`` and ``version``), without building one."""
    if name == "offline":
        from mmearth_data.sources.offline import OfflineSource

        return OfflineSource
    if name == "earthengine":
        from mmearth_data.sources.earthengine import EarthEngineSource

        return EarthEngineSource
    if name == "local":
        from mmearth_data.sources.local import LocalSource

        return LocalSource
    raise SourceError(f"unknown source {name!r}; available sources: {', '.join(SOURCES)}")


def source_years(name: str) -> range:
    return source_class(name).years


def source_version(name: str) -> str:
    """Version of what the source delivers for a tile; a store is resumed only by the same version."""
    return source_class(name).version


__all__ = [
    "Source",
    "SourceError",
    "TileFailure",
    "TileRequest",
    "TileResult",
    "make_source",
    "source_class",
    "source_version",
    "source_years",
]
