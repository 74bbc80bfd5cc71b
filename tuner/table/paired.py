"""Rounds in the table builder: the paired decision, and what the pairs say about a table.

A run that kept each round's figure (`rounds.csv`, `bench.analysis.rounds`) lets the builder
compare two configurations in the rounds measured side by side: pairs are (run, round) within
one run (several runs given to `tuner fit` pool their pairs, never pairing across runs, whose
measurements were minutes or days apart). Here: the round figures per curve and size, the
bound the builder asks for, the simpler-table preference, the spans where the data did not
separate the chosen configuration from the best other algorithm (`ties`), and the measured
advantage of each rule over its runner-up (`rule_evidence`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from bench.analysis.rounds import paired
from bench.backends import needs_buffer, params_key
from tuner.table.builder import Build, Curve, PairedBound
from tuner.table.data import config_params

__all__ = [
    "Figures",
    "curve_figures",
    "paired_bound",
    "preference",
    "Tie",
    "ties",
    "size_gaps",
    "rule_evidence",
    "pair_count",
    "MIN_GAIN",
]

# per curve, per size: {(run_id, round): latency_us} (empty where that point has no rounds)
Figures = list[list[dict[tuple, float]]]


def curve_figures(curves: Sequence[Curve], sizes: Sequence[int], rounds) -> Figures:
    """The round figures of each curve at each size, from a group's rounds frame (with the
    `params` column `tuner.table.data.load_rounds` adds)."""
    index = {(c.algorithm, params_key(c.params)): k for k, c in enumerate(curves)}
    at = {int(s): i for i, s in enumerate(sizes)}
    out: Figures = [[{} for _ in sizes] for _ in curves]
    columns = ["backend", "params", "bytes", "run_id", "round", "latency_us"]
    for backend, params, nbytes, run_id, round_, latency in rounds[columns].itertuples(index=False):
        k = index.get((str(backend), str(params)))
        i = at.get(int(nbytes))
        if k is not None and i is not None:
            out[k][i][(str(run_id), int(round_))] = float(latency)
    return out


def pair_count(figures: Figures) -> int:
    """How many (run, round) keys the figures hold: the rounds the fit had."""
    return len({key for curve in figures for point in curve for key in point})


# the least advantage that moves a size from one configuration to another: a difference the
# pairs call real but smaller than this is a tie (tables stay simple; engines' static tables
# are not worth a rule for less). Seen on the H200 (results/.../20261204-stability): single
# sizes where one backend was faster in every one of 5 rounds by 1-3%, and the other way in
# the next sweep; they made three sweeps give three tables.
MIN_GAIN = 0.05


def paired_bound(figures: Figures, min_gain: float = MIN_GAIN) -> PairedBound:
    """The builder's question: the lower end of the paired interval on k over j at size i,
    over 1 + `min_gain` (so that k is surely slower only by more than the least gain)."""
    cache: dict[tuple[int, int, int], float | None] = {}

    def bound(k: int, j: int, i: int) -> float | None:
        if (k, j, i) not in cache:
            stat = paired(figures[k][i], figures[j][i])
            cache[(k, j, i)] = None if stat is None else stat.low / (1.0 + min_gain)
        return cache[(k, j, i)]

    return bound


def preference(curves: Sequence[Curve], floor: str) -> list[float]:
    """Simpler first, where the data cannot choose: the floor backend (nothing to build),
    then algorithms without a buffer, then the registry's default knobs, then by name."""

    def rank(curve: Curve) -> tuple:
        default = params_key(config_params(curve.algorithm, {})) == params_key(curve.params)
        return (curve.algorithm != floor, needs_buffer(curve.algorithm), not default, curve.label)

    order = sorted(range(len(curves)), key=lambda k: rank(curves[k]))
    ranks = [0.0] * len(curves)
    for place, k in enumerate(order):
        ranks[k] = float(place)
    return ranks


@dataclasses.dataclass(frozen=True)
class Tie:
    """Sizes first_bytes..last_bytes: `kept` chosen, `other` (the best other algorithm there)
    not separated from it in the paired rounds; `gap`: the largest median ratio between them
    over the span (slower over faster)."""

    first_bytes: int
    last_bytes: int
    kept: str
    other: str
    gap: float

    def to_json(self) -> dict[str, Any]:
        return {
            "min_bytes": self.first_bytes,
            "max_bytes": self.last_bytes,
            "kept": self.kept,
            "other": self.other,
        }


def _runner_up(build: Build, curves: Sequence[Curve], i: int) -> int | None:
    """The fastest (median) configuration of another algorithm than the chosen one at size i
    (of another configuration where the group has one algorithm)."""
    chosen = curves[build.chosen[i]]
    others = [
        k
        for k, c in enumerate(curves)
        if k != build.chosen[i] and _finite(c.latency_us[i]) and c.algorithm != chosen.algorithm
    ] or [k for k, c in enumerate(curves) if k != build.chosen[i] and _finite(c.latency_us[i])]
    return min(others, key=lambda k: curves[k].latency_us[i], default=None)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def size_gaps(build: Build, curves: Sequence[Curve], figures: Figures) -> list[tuple]:
    """Per size: (bytes, chosen, runner-up or None, Paired of runner-up over chosen or None)."""
    out = []
    for i, nbytes in enumerate(build.sizes):
        k = build.chosen[i]
        r = _runner_up(build, curves, i)
        stat = None if r is None else paired(figures[r][i], figures[k][i])
        out.append((nbytes, k, r, stat))
    return out


def _under_gain(stat, min_gain: float) -> bool:
    """Separated, but by less than the least gain a rule needs (the interval's near end)."""
    near = stat.low if stat.low > 1.0 else 1.0 / stat.high
    return near < 1.0 + min_gain


def ties(
    build: Build, curves: Sequence[Curve], figures: Figures, min_gain: float = MIN_GAIN
) -> list[Tie]:
    """Spans of sizes where the chosen configuration and the best other algorithm were not
    separated in the paired rounds (their interval holds 1): the table kept its choice
    there for simplicity, not because it is faster."""
    spans: list[Tie] = []
    for nbytes, k, r, stat in size_gaps(build, curves, figures):
        if stat is None or (stat.separated and not _under_gain(stat, min_gain)):
            continue
        kept, other = curves[k].label, curves[r].label
        gap = max(stat.ratio, 1 / stat.ratio)
        last = spans[-1] if spans else None
        adjacent = last is not None and build.sizes.index(last.last_bytes) + 1 == build.sizes.index(
            nbytes
        )
        if adjacent and last.kept == kept and last.other == other:
            spans[-1] = dataclasses.replace(last, last_bytes=nbytes, gap=max(last.gap, gap))
        else:
            spans.append(Tie(nbytes, nbytes, kept, other, gap))
    return spans


def _merged_ranges(build: Build) -> list[tuple[int, int, int]]:
    """[start, stop) and curve index of each rule, as the rules go."""
    out: list[list[int]] = []
    for i, k in enumerate(build.chosen):
        if out and out[-1][2] == k:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1, k])
    return [tuple(r) for r in out]


def rule_evidence(
    build: Build,
    curves: Sequence[Curve],
    figures: Figures | None,
    weights: Sequence[float],
) -> list[dict[str, Any]]:
    """Per rule: the runner-up over its sizes (the configuration of another algorithm with the
    lowest weighted log latency there) and the chosen one's advantage over it, as the ratio
    runner-up / chosen (> 1: the rule's choice is faster): with rounds, the median over the
    range's pairs (every size and round) and the sign interval on it; without rounds, the
    geomean of the medians' ratios, no interval (in-sample only)."""
    out = []
    for start, stop, k in _merged_ranges(build):
        span = range(start, stop)
        chosen = curves[k]
        candidates = [
            j
            for j, c in enumerate(curves)
            if j != k and all(_finite(c.latency_us[i]) for i in span)
        ]
        other_alg = [j for j in candidates if curves[j].algorithm != chosen.algorithm]
        candidates = other_alg or candidates
        if not candidates:
            out.append({"runner_up": None, "advantage": None, "interval": None, "pairs": 0})
            continue
        r = min(
            candidates,
            key=lambda j: sum(weights[i] * math.log(curves[j].latency_us[i]) for i in span),
        )
        pooled_r = {
            (i, *key): v for i in span for key, v in (figures[r][i] if figures else {}).items()
        }
        pooled_k = {
            (i, *key): v for i in span for key, v in (figures[k][i] if figures else {}).items()
        }
        stat = paired(pooled_r, pooled_k)
        if stat is not None:
            entry = {
                "advantage": round(stat.ratio, 4),
                "interval": [round(stat.low, 4), round(stat.high, 4)],
                "pairs": stat.pairs,
            }
        else:
            logs = [math.log(curves[r].latency_us[i] / build.chosen_latency_us[i]) for i in span]
            entry = {
                "advantage": round(math.exp(sum(logs) / len(logs)), 4),
                "interval": None,
                "pairs": 0,
            }
        out.append({"runner_up": curves[r].label, **entry})
    return out
