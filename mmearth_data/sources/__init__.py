"""Sources: (planned tiles, modalities) -> arrays on each tile's grid. See :mod:`.base`."""

from __future__ import annotations

from typing import Any

from mmearth_data.sources.base import Source, SourceError, TileFailure, TileRequest, TileResult

SOURCES = ("offline", "earthengine")


def make_source(name: str, **options: Any) -> Source:
    """Instantiate the source called ``name`` with its options (seed, credentials, ...)."""
    if name == "offline":
        from mmearth_data.sources.offline import OfflineSource

        return OfflineSource(seed=options.get("seed", 0))
    if name == "earthengine":
        from mmearth_data.sources.earthengine import make_earthengine_source

        return make_earthengine_source(options)
    raise SourceError(f"unknown source {name!r}; available sources: {', '.join(SOURCES)}")


def source_years(name: str) -> range:
    if name == "offline":
        from mmearth_data.sources.offline import YEARS

        return YEARS
    if name == "earthengine":
        from mmearth_data.sources.earthengine import YEARS as EE_YEARS

        return EE_YEARS
    raise SourceError(f"unknown source {name!r}; available sources: {', '.join(SOURCES)}")


__all__ = ["Source", "SourceError", "TileFailure", "TileRequest", "TileResult", "make_source", "source_years"]
