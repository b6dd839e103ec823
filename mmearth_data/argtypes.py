"""What the command lines (``mmearth``, ``mmearth catalog``, ``python -m model.*``) share: argparse types,
each turning a bad value into argparse's usage error naming the option and the accepted values, and
:func:`cli_terms`, which words the library's errors in the command line's flags."""

from __future__ import annotations

import argparse
import math
import re


def int_in(lo: int, hi: int | None, what: str):
    """An argparse type: an integer in [lo, hi] (argparse prints the message and exits 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < lo or (hi is not None and v > hi):
            rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{text!r}: {what} must be an integer {rng}")
        return v

    return parse


def percent(text: str) -> float:
    """An argparse type: a cloud cover in per cent, 0-100."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (0.0 <= v <= 100.0):  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r}: a cloud cover in per cent, from 0 to 100, is needed")
    return v


def years(text: str) -> tuple[int, ...]:
    """An argparse type: :func:`mmearth_data.sampling.parse_years`."""
    from mmearth_data.sampling import SamplingError, parse_years

    try:
        return parse_years(text)
    except SamplingError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# library parameters whose flag is not the parameter's name with dashes
FLAG_OF = {"n_tiles": "--tiles", "dst": "--out", "key_file": "--ee-key", "balance": "--no-balance"}
_PARAM = re.compile(r"`([a-z][a-z0-9_]*)`")


def cli_terms(message: object) -> str:
    """A library error in the command line's terms: the library names the parameter at fault in
    backquotes (`tile_size`), the command line the flag that sets it (--tile-size)."""
    return _PARAM.sub(lambda m: FLAG_OF.get(m[1], "--" + m[1].replace("_", "-")), str(message))
