"""The table builder: ordered range rules from per-size measurements, exactly, by DP.

Input, for one (hardware, world size, dtype, mode): the measured sizes and one latency curve
per configuration (algorithm + knob values), with the p10/p90 spread of every point.

What is minimised, over every way of cutting the sorted sizes into at most `max_rules`
consecutive ranges and giving each range one configuration:

1. the *clear* regret: per size, how much the chosen configuration's median exceeds the
   per-size oracle's (the fastest configuration there) by more than the oracle's measured
   spread (half its p90 - p10 width), relative to the oracle: a difference inside the spread
   costs nothing;
2. then the number of rules;
3. then the regret itself: chosen median / oracle median - 1.

All three are weighted by a size distribution (uniform in log size by default). Ordering the
objective this way is the hysteresis the issue asks for: a configuration takes a range from its
neighbour only where it is faster by more than the measured spread, never on noise; with no
spread (p10 = p90 = median) the result is the exact minimum of the weighted regret.

Paired (`paired` given: the run kept each round's figure, `bench.analysis.rounds`): the
spread of 1. is the paired one instead. A configuration's clear cost at a size is how much
slower than another it surely is: the largest lower end, over the other configurations, of
the interval on the ratio of their figures measured side by side in the same rounds, minus 1,
and 0 where every such interval holds 1 (the spread inside one point does not see the
machine's drift between minutes; the pairs do). Where no pair has 2 rounds in common the
p10/p90 rule above is used. Among tables
equally clear, the simpler one wins, never the noise: fewer rules, then less buffer memory,
then the preferred configurations (`preference`: lower is simpler, e.g. the floor backend
first), and only then the regret itself.

Constraints: the rule limit, and an optional budget of buffer memory. Memory is charged per
rule: a rule whose algorithm needs a buffer costs its upper end (the largest measured size for
the catch-all) x world size. The dispatcher builds one backend per (algorithm, knobs), its
buffer the largest size its rules route to it, so rules sharing one only lower the real figure
(reported as `buffer_bytes`); with each backend in one range (the usual table) the two agree.

With memory charged per rule, the cost of a range depends only on the configuration and on
whether it needs a buffer, so per range only the cheapest configuration of each of the two
classes can be part of an optimum. The DP runs from the largest size down over (sizes still to
cover, rules used); each state keeps the Pareto set of (objective, memory), so one pass yields
the whole Pareto front of regret against buffer memory and the optimum for any budget.

A configuration not measured at a size where another configuration of its algorithm was counts
as that algorithm's slowest measured configuration there (sparse data from `tuner live`); one
whose algorithm has no measurement at a size cannot be given that size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.backends import get_spec, needs_buffer
from tuner.runtime.schema import Rule

__all__ = [
    "config_label",
    "Curve",
    "FrontPoint",
    "Build",
    "BuildError",
    "build_table",
    "log_uniform_weights",
    "workload_weights",
]

INF = math.inf
# (configuration k, another configuration j, size index) -> the lower end of the paired
# interval on latency_k / latency_j, or None where the two have no pairs to compare
PairedBound = Callable[[int, int, int], float | None]


class BuildError(ValueError):
    """No table satisfies the constraints (one line, says which)."""


def config_label(algorithm: str, params: Mapping[str, Any]) -> str:
    """`shm_two_shot[chunk_bytes=262144]`: the knobs that differ from the registry default."""
    try:
        defaults = get_spec(algorithm).default_params()
    except KeyError:
        defaults = {}
    knobs = ",".join(f"{k}={v}" for k, v in sorted(params.items()) if defaults.get(k) != v)
    return f"{algorithm}[{knobs}]" if knobs else algorithm


@dataclasses.dataclass
class Curve:
    """One configuration's measurements at the given sizes (NaN: not measured)."""

    algorithm: str
    params: Mapping[str, Any]
    latency_us: Sequence[float]
    p10_us: Sequence[float] | None = None
    p90_us: Sequence[float] | None = None

    @property
    def label(self) -> str:
        return config_label(self.algorithm, self.params)


@dataclasses.dataclass(frozen=True)
class FrontPoint:
    buffer_bytes: int
    regret: float
    rules: int
    clear_regret: float
    labels: tuple[str, ...]


@dataclasses.dataclass
class Build:
    rules: list[Rule]
    max_size: dict[str, int]
    regret: float  # weighted mean of chosen / oracle - 1
    regret_max: float
    clear_regret: float
    buffer_bytes: int
    chosen: list[int]  # index into the curves, per size
    chosen_latency_us: list[float]
    oracle_latency_us: list[float]
    front: list[FrontPoint]
    sizes: list[int]


def _nan(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def log_uniform_weights(sizes: Sequence[int]) -> list[float]:
    """Each size weighs the log-width it stands for (equal on a geometric grid); sum 1."""
    n = len(sizes)
    if n == 1:
        return [1.0]
    logs = [math.log(s) for s in sizes]
    widths = []
    for i in range(n):
        left = (logs[i] - logs[i - 1]) / 2 if i > 0 else (logs[1] - logs[0]) / 2
        right = (logs[i + 1] - logs[i]) / 2 if i < n - 1 else (logs[-1] - logs[-2]) / 2
        widths.append(left + right)
    total = sum(widths)
    return [w / total for w in widths]


def workload_weights(sizes: Sequence[int], histogram: Mapping[int, float]) -> list[float]:
    """Message counts per size mapped onto the measured sizes, each to the smallest measured
    size >= it (where the dispatcher's rules send it); larger than all: the largest. Sum 1."""
    weights = [0.0] * len(sizes)
    for nbytes, count in histogram.items():
        index = next((i for i, s in enumerate(sizes) if s >= nbytes), len(sizes) - 1)
        weights[index] += float(count)
    total = sum(weights)
    if total <= 0:
        raise BuildError("workload: the histogram has no positive count")
    return [w / total for w in weights]


def _prepare(sizes, curves, paired: PairedBound | None = None):
    """Fill sparse points, compute oracle, and the two per-point cost components."""
    n = len(sizes)
    lat = [[INF if _nan(x) else float(x) for x in c.latency_us] for c in curves]
    p10 = [
        [
            lat[k][i] if (c.p10_us is None or _nan(c.p10_us[i])) else float(c.p10_us[i])
            for i in range(n)
        ]
        for k, c in enumerate(curves)
    ]
    p90 = [
        [
            lat[k][i] if (c.p90_us is None or _nan(c.p90_us[i])) else float(c.p90_us[i])
            for i in range(n)
        ]
        for k, c in enumerate(curves)
    ]
    oracle, oracle_spread, oracle_k = [], [], []
    for i in range(n):
        best = min(range(len(curves)), key=lambda k: lat[k][i])
        oracle_k.append(best)
        oracle.append(lat[best][i])
        oracle_spread.append(p90[best][i] - p10[best][i] if lat[best][i] < INF else 0.0)
    # sparse points: the algorithm's slowest measured configuration at that size
    by_alg: dict[str, list[int]] = {}
    for k, c in enumerate(curves):
        by_alg.setdefault(c.algorithm, []).append(k)
    for members in by_alg.values():
        for i in range(n):
            measured = [k for k in members if lat[k][i] < INF]
            if not measured:
                continue
            worst = max(measured, key=lambda k: lat[k][i])
            for k in members:
                if lat[k][i] == INF:
                    lat[k][i], p10[k][i], p90[k][i] = lat[worst][i], p10[worst][i], p90[worst][i]
    true_cost = [
        [lat[k][i] / oracle[i] - 1.0 if lat[k][i] < INF else INF for i in range(n)]
        for k in range(len(curves))
    ]
    clear_cost = [[INF] * n for _ in curves]
    for k in range(len(curves)):
        for i in range(n):
            if lat[k][i] == INF:
                continue
            # the measured spread of the oracle's point: half its p90 - p10 width (the chosen
            # configuration's own spread gives it no credit: a noisy one is not let off)
            spread = oracle_spread[i] / 2
            clear_cost[k][i] = max(0.0, lat[k][i] - oracle[i] - spread) / oracle[i]
            if paired is None:
                continue
            # surely slower than some configuration by this much, in the rounds side by side
            lows = [paired(k, j, i) for j in range(len(curves)) if j != k and lat[j][i] < INF]
            known = [low for low in lows if low is not None]
            if known:
                clear_cost[k][i] = max(0.0, max(known) - 1.0)
    return lat, oracle, true_cost, clear_cost


class _Entry:
    __slots__ = ("mem", "clear", "pref", "true", "parent", "config", "start", "stop")

    def __init__(self, mem, clear, pref, true, parent, config, start, stop):
        self.mem, self.clear, self.pref, self.true = mem, clear, pref, true
        self.parent, self.config, self.start, self.stop = parent, config, start, stop


def _insert(bucket: list[_Entry], entry: _Entry) -> None:
    """Keep the Pareto set of (memory, (clear, preference, true)) in `bucket`."""
    cost = (entry.clear, entry.pref, entry.true)
    for other in bucket:
        if other.mem <= entry.mem and (other.clear, other.pref, other.true) <= cost:
            return
    bucket[:] = [
        o for o in bucket if not (o.mem >= entry.mem and (o.clear, o.pref, o.true) >= cost)
    ]
    bucket.append(entry)


def build_table(
    sizes: Sequence[int],
    curves: Sequence[Curve],
    world_size: int,
    weights: Sequence[float] | None = None,
    max_rules: int = 8,
    memory_budget: int | None = None,
    paired: PairedBound | None = None,
    preference: Sequence[float] | None = None,
) -> Build:
    """The exact optimum (see the module docstring) and the Pareto front. `paired`: the
    paired decision and the simpler-table order (module docstring); `preference` per curve."""
    sizes = [int(s) for s in sizes]
    weights = _checked_weights(sizes, curves, weights, max_rules)
    n = len(sizes)
    lat, oracle, true_cost, clear_cost = _prepare(sizes, curves, paired)
    prefs = list(preference) if paired is not None and preference else [0.0] * len(curves)
    if any(o == INF for o in oracle):
        missing = [sizes[i] for i in range(n) if oracle[i] == INF]
        raise BuildError(f"no configuration measured at {missing[0]} bytes")
    buffered = [needs_buffer(c.algorithm) for c in curves]
    best_of = _best_per_range(n, weights, true_cost, clear_cost, buffered, prefs)
    finals = _pareto_states(sizes, world_size, best_of, buffered, max_rules, memory_budget)
    if not finals:
        budget = f" within {memory_budget} bytes of buffer" if memory_budget is not None else ""
        raise BuildError(
            f"no table with at most {max_rules} rules{budget} covers every "
            "measured size (raise --max-rules or --memory-budget)"
        )

    def objective(item):
        entry, used = item
        if paired is not None:  # equally clear: the simpler table, never the noise
            return (round(entry.clear, 12), used, entry.mem, round(entry.pref, 12), entry.true)
        return (round(entry.clear, 12), used, entry.true, entry.mem)

    finals.sort(key=objective)
    best_entry, _ = finals[0]
    ranges = _ranges(best_entry)
    front = _front(finals, curves, sizes, world_size)
    return _assemble(
        ranges, sizes, curves, world_size, weights, lat, oracle, true_cost, best_entry, front
    )


def _checked_weights(
    sizes: list[int], curves: Sequence[Curve], weights: Sequence[float] | None, max_rules: int
) -> list[float]:
    """The inputs checked (one line each), and the weights normalised to sum 1."""
    if sorted(set(sizes)) != sizes:
        raise BuildError("sizes must be strictly increasing")
    if not sizes or not curves:
        raise BuildError("nothing measured: no sizes or no configurations")
    if max_rules < 1:
        raise BuildError(f"--max-rules: expected an integer >= 1, got {max_rules}")
    n = len(sizes)
    for c in curves:
        if len(c.latency_us) != n:
            raise BuildError(f"{c.label}: {len(c.latency_us)} latencies for {n} sizes")
    weights = list(weights) if weights is not None else log_uniform_weights(sizes)
    if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise BuildError(f"weights: expected {n} values >= 0 with a positive sum")
    return [w / sum(weights) for w in weights]


def _best_per_range(
    n: int, weights: list[float], true_cost, clear_cost, buffered: list[bool], prefs: list[float]
) -> dict[tuple[int, int], list[tuple[float, float, float, int]]]:
    """Per range [start, stop) and buffer class, the cheapest configuration (clear cost,
    preference, true cost, index): any other of the same class costs the same memory and
    more."""
    pre_clear, pre_true, pre_missing = [], [], []  # prefix sums; unmeasured points apart
    for k in range(len(buffered)):
        pc, pt, pm = [0.0], [0.0], [0]
        for i in range(n):
            missing = true_cost[k][i] == INF
            pc.append(pc[-1] + (0.0 if missing else weights[i] * clear_cost[k][i]))
            pt.append(pt[-1] + (0.0 if missing else weights[i] * true_cost[k][i]))
            pm.append(pm[-1] + missing)
        pre_clear.append(pc)
        pre_true.append(pt)
        pre_missing.append(pm)
    pre_w = [0.0]
    for w in weights:
        pre_w.append(pre_w[-1] + w)
    best_of: dict[tuple[int, int], list[tuple[float, float, float, int]]] = {}
    for start in range(n):
        for stop in range(start + 1, n + 1):
            options: dict[bool, tuple[float, float, float, int]] = {}
            for k in range(len(buffered)):
                if pre_missing[k][stop] != pre_missing[k][start]:
                    continue  # not measured (nor fillable) somewhere in the range
                cost = (
                    pre_clear[k][stop] - pre_clear[k][start],
                    prefs[k] * (pre_w[stop] - pre_w[start]),
                    pre_true[k][stop] - pre_true[k][start],
                    k,
                )
                if buffered[k] not in options or cost < options[buffered[k]]:
                    options[buffered[k]] = cost
            best_of[(start, stop)] = list(options.values())
    return best_of


def _pareto_states(
    sizes: list[int],
    world_size: int,
    best_of,
    buffered: list[bool],
    max_rules: int,
    memory_budget: int | None,
) -> list[tuple[_Entry, int]]:
    """The dynamic programme from the largest size down: states[j][rules used] holds the
    Pareto entries covering sizes j..n-1; returns those covering every size."""
    n = len(sizes)
    states: list[dict[int, list[_Entry]]] = [dict() for _ in range(n + 1)]
    states[n][0] = [_Entry(0, 0.0, 0.0, 0.0, None, None, n, n)]
    for stop in range(n, 0, -1):
        for used, bucket in states[stop].items():
            if used >= max_rules:
                continue
            for start in range(stop - 1, -1, -1):
                for d_clear, d_pref, d_true, k in best_of[(start, stop)]:
                    add_mem = sizes[stop - 1] * world_size if buffered[k] else 0
                    target = states[start].setdefault(used + 1, [])
                    for entry in bucket:
                        mem = entry.mem + add_mem
                        if memory_budget is not None and mem > memory_budget:
                            continue
                        _insert(
                            target,
                            _Entry(
                                mem,
                                entry.clear + d_clear,
                                entry.pref + d_pref,
                                entry.true + d_true,
                                entry,
                                k,
                                start,
                                stop,
                            ),
                        )
    return [(entry, used) for used, bucket in states[0].items() for entry in bucket]


def _ranges(entry: _Entry) -> list[tuple[int, int, int]]:
    out = []
    while entry is not None and entry.config is not None:
        out.append((entry.start, entry.stop, entry.config))
        entry = entry.parent
    return out  # ascending: the last range added (smallest sizes) is first


def _memory(ranges, sizes, curves, world_size) -> tuple[int, dict[str, int]]:
    """Buffer memory of a table: one backend per (algorithm, knobs), its buffer the largest size
    its rules route to it, times the world size; and max_size per algorithm."""
    per_instance: dict[tuple[str, str], int] = {}
    max_size: dict[str, int] = {}
    for _start, stop, k in ranges:
        curve = curves[k]
        if not needs_buffer(curve.algorithm):
            continue
        key = (curve.algorithm, repr(sorted(curve.params.items())))
        per_instance[key] = max(per_instance.get(key, 0), sizes[stop - 1])
        max_size[curve.algorithm] = max(max_size.get(curve.algorithm, 0), sizes[stop - 1])
    return sum(per_instance.values()) * world_size, max_size


def _front(finals, curves, sizes, world_size) -> list[FrontPoint]:
    by_mem = sorted(
        finals, key=lambda item: (item[0].mem, round(item[0].clear, 12), item[1], item[0].true)
    )
    front: list[FrontPoint] = []
    best = None
    for entry, used in by_mem:
        key = (round(entry.clear, 12), used, entry.true)
        if best is not None and key >= best:
            continue
        best = key
        ranges = _ranges(entry)
        labels = tuple(curves[k].label for _, _, k in ranges)
        memory, _ = _memory(ranges, sizes, curves, world_size)
        point = FrontPoint(
            buffer_bytes=memory,
            regret=entry.true,
            rules=used,
            clear_regret=entry.clear,
            labels=labels,
        )
        if front and front[-1].buffer_bytes >= point.buffer_bytes:
            front[-1] = point
        else:
            front.append(point)
    return front


def _assemble(
    ranges, sizes, curves, world_size, weights, lat, oracle, true_cost, entry, front
) -> Build:
    # merge neighbours that ended up with the same configuration
    merged: list[list[int]] = []
    for start, stop, k in ranges:
        if merged and merged[-1][2] == k:
            merged[-1][1] = stop
        else:
            merged.append([start, stop, k])
    n = len(sizes)
    rules = []
    chosen = [0] * n
    for index, (start, stop, k) in enumerate(merged):
        last = index == len(merged) - 1
        curve = curves[k]
        rules.append(
            Rule(
                max_bytes=None if last else sizes[stop - 1],
                algorithm=curve.algorithm,
                params=dict(curve.params),
            )
        )
        for i in range(start, stop):
            chosen[i] = k
    memory, max_size = _memory(merged, sizes, curves, world_size)
    chosen_latency = [lat[chosen[i]][i] for i in range(n)]
    regrets = [true_cost[chosen[i]][i] for i in range(n)]
    total_w = sum(weights) or 1.0
    return Build(
        rules=rules,
        max_size=max_size,
        regret=sum(w * r for w, r in zip(weights, regrets, strict=True)) / total_w,
        regret_max=max(regrets),
        clear_regret=entry.clear / total_w,
        buffer_bytes=memory,
        chosen=chosen,
        chosen_latency_us=chosen_latency,
        oracle_latency_us=list(oracle),
        front=front,
        sizes=list(sizes),
    )
