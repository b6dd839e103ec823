"""Named crash points for testing crash safety on real processes.

With ``MMEARTH_CRASH_AT=NAME:N`` in a build's environment, the N-th time the process passes point
``NAME`` it sends itself SIGKILL, as the OOM killer would: no cleanup, no flush, nothing after. Points:

- ``created``: the new store is made (still under its staging name) but not yet renamed into place;
- ``plan``: the plan is written, its plots not yet;
- ``shard-array``: one array of a shard is written (the N-th such write lands inside a shard, some of its
  arrays written and its tiles not yet marked complete);
- ``shard-done``: a shard's tiles are marked complete;
- ``statistics``: the statistics are computed but not yet stored;
- ``extend-planned``: an extension is planned and recorded in the store's history, no array resized yet;
- ``extend-resized``: one more per-tile array is resized for an extension;
- ``modalities-added``: an extension's new modalities have their (empty) arrays, not yet filled.

Without the variable (always, outside tests) a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "MMEARTH_CRASH_AT"
POINTS = (
    "created",
    "plan",
    "shard-array",
    "shard-done",
    "statistics",
    "extend-planned",
    "extend-resized",
    "modalities-added",
)
_passed: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
