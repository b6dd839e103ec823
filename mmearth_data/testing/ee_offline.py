"""Initialise earthengine-api without a network, from the algorithm table it ships
(``ee/tests/algorithms.json``, read by ``ee.apitestcase.GetAlgorithms``). Real expressions can then be
built and serialised; nothing can be sent (no API resource is installed). Used by the simulated
transport, the golden-file script and the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import ee
from ee import _state
from ee.apitestcase import GetAlgorithms

OFFLINE_PROJECT = "offline-simulation"


def init_offline() -> None:
    """Initialise ``ee`` offline (idempotent)."""
    ee.Reset()
    ee.data._install_cloud_api_resource = lambda: None
    ee.data.getAlgorithms = GetAlgorithms
    ee.Initialize(None, "", project=OFFLINE_PROJECT)


@contextlib.contextmanager
def offline_ee() -> Iterator[object]:
    """``ee`` initialised offline for the block, reset afterwards."""
    saved = ee.data.getAlgorithms, ee.data._install_cloud_api_resource
    init_offline()
    try:
        yield ee
    finally:
        ee.data.getAlgorithms, ee.data._install_cloud_api_resource = saved
        _state.reset_state()
        ee.Reset()
