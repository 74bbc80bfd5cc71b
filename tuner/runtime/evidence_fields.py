"""The optional evidence of a table measured in rounds (issue 19), checked like the rest.

`validate` adds these to a table's optional `evidence` fields; a file without them (every
table written before rounds) loads as before. Each check is (predicate, what was expected):

- ``rounds``: how many (run, round) keys the fit had (pairs are made within one) (0: runs without rounds, the
  evidence is in-sample only);
- ``aa``: the A/A figure of those rounds (`bench.analysis.rounds.aa_spread`: ``median_pct``,
  ``p90_pct``, ``points``, ``rounds``), or null;
- ``heldout``: regret on rounds held out of the fit (``method``, ``regret_geomean``,
  ``regret_worst``, ``worst_bytes``, ``worst_in``, ``cells``, ``missing``), or null;
- ``validation``: the same summary on independent runs (``run_ids`` and the summary);
- ``per_rule``: per rule, ``runner_up`` (label or null), ``advantage`` (runner-up / chosen),
  ``interval`` ([low, high] or null: no rounds) and ``pairs``;
- ``ties``: spans the data could not decide (``min_bytes``, ``max_bytes``, ``kept``, ``other``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["EVIDENCE_FIELDS"]


INTEGER_LIMIT = 2**53  # the integers every JSON reader agrees on


def _int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= INTEGER_LIMIT


def _num(v: Any, low: float = 0.0) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= low


def _opt_num(v: Any) -> bool:
    return v is None or _num(v)


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _object(fields: Mapping[str, Callable[[Any], bool]], required: tuple[str, ...] = ()):
    def check(v: Any) -> bool:
        return (
            isinstance(v, dict)
            and all(name in v for name in required)
            and all(name in fields and fields[name](x) for name, x in v.items())
        )

    return check


_SUMMARY = {
    "regret_geomean": _num,
    "regret_worst": _num,
    "worst_bytes": lambda v: _int(v, 1),
    "worst_in": _text,
    "cells": _int,
    "missing": _int,
}
_AA = _object({"median_pct": _opt_num, "p90_pct": _opt_num, "points": _int, "rounds": _int})
_HELDOUT = _object({"method": _text, **_SUMMARY}, ("method", "regret_geomean", "regret_worst"))
_VALIDATION = _object(
    {"run_ids": lambda v: isinstance(v, list) and all(map(_text, v)), **_SUMMARY}, ("run_ids",)
)
_RULE = _object(
    {
        "runner_up": lambda v: v is None or _text(v),
        "advantage": lambda v: v is None or _num(v, 1e-300),
        "interval": lambda v: (
            v is None or (isinstance(v, list) and len(v) == 2 and all(_num(x, 1e-300) for x in v))
        ),
        "pairs": _int,
    },
    ("runner_up", "advantage"),
)
_TIE = _object(
    {
        "min_bytes": lambda v: _int(v, 1),
        "max_bytes": lambda v: _int(v, 1),
        "kept": _text,
        "other": _text,
    },
    ("min_bytes", "max_bytes", "kept", "other"),
)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


EVIDENCE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "rounds": (_int, "an integer >= 0"),
    "aa": (lambda v: v is None or _AA(v), "null or {median_pct, p90_pct, points, rounds}"),
    "heldout": (
        lambda v: v is None or _HELDOUT(v),
        "null or {method, regret_geomean, regret_worst, worst_bytes, ...}",
    ),
    "validation": (_VALIDATION, "{run_ids, regret_geomean, regret_worst, worst_bytes, ...}"),
    "per_rule": (
        _list_of(_RULE),
        "a list of {runner_up, advantage, interval, pairs}",
    ),
    "ties": (_list_of(_TIE), "a list of {min_bytes, max_bytes, kept, other}"),
    # the least paired advantage that moved a size (tuner fit --min-gain); null without rounds
    "min_gain": (
        lambda v: (
            v is None or (isinstance(v, float | int) and not isinstance(v, bool) and 0 <= v < 1)
        ),
        "null or a fraction in [0, 1)",
    ),
}
