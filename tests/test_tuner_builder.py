"""The DP table builder: exact optimum, rule limit, memory budget, no flip on noise."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from bench.backends import needs_buffer
from tuner.table.builder import (
    BuildError,
    Curve,
    build_table,
    log_uniform_weights,
    workload_weights,
)

SIZES = [1 << k for k in range(10, 20)]  # 1K .. 512K


def _curve(alg, values, params=None, spread=0.0):
    return Curve(
        alg,
        params or {},
        list(values),
        [v * (1 - spread) for v in values],
        [v * (1 + spread) for v in values],
    )


def _three_backends():
    """shm_one_shot wins small, shm_two_shot a middle range, gloo the large sizes."""
    one = [10, 11, 12, 14, 20, 35, 60, 110, 210, 410]
    two = [30, 31, 32, 33, 18, 25, 40, 108, 190, 390]
    gloo = [50, 52, 55, 60, 70, 80, 100, 105, 150, 300]
    return [_curve("shm_one_shot", one), _curve("shm_two_shot", two), _curve("gloo", gloo)]


def _brute_force(sizes, curves, world_size, weights, max_rules, budget):
    """Every cut of the sizes into <= max_rules ranges, every assignment: the least regret whose
    memory (each buffered rule charged its upper end x world size) fits the budget."""
    n = len(sizes)
    lat = [c.latency_us for c in curves]
    oracle = [min(c.latency_us[i] for c in curves) for i in range(n)]
    best = None
    for rules in range(1, max_rules + 1):
        for cuts in itertools.combinations(range(1, n), rules - 1):
            bounds = [0, *cuts, n]
            for assign in itertools.product(range(len(curves)), repeat=rules):
                regret, memory = 0.0, 0
                for r, k in enumerate(assign):
                    lo, hi = bounds[r], bounds[r + 1]
                    for i in range(lo, hi):
                        regret += weights[i] * (lat[k][i] / oracle[i] - 1)
                    if needs_buffer(curves[k].algorithm):  # charged per rule
                        memory += sizes[hi - 1] * world_size
                if budget is not None and memory > budget:
                    continue
                if best is None or regret < best - 1e-12:
                    best = regret
    return best


def test_exact_optimum_with_a_middle_range_won_by_a_third_backend():
    curves = _three_backends()
    build = build_table(SIZES, curves, world_size=2)
    algs = [(r.max_bytes, r.algorithm) for r in build.rules]
    assert algs == [(8192, "shm_one_shot"), (65536, "shm_two_shot"), (None, "gloo")]
    # with no limit that binds, the table is the oracle itself
    assert build.regret == pytest.approx(0.0)
    assert build.max_size == {"shm_one_shot": 8192, "shm_two_shot": 65536}
    assert build.buffer_bytes == (8192 + 65536) * 2
    weights = log_uniform_weights(SIZES)
    assert build.regret == pytest.approx(
        _brute_force(SIZES, curves, 2, weights, 3, None), abs=1e-12
    )


@pytest.mark.parametrize("max_rules", [1, 2, 3])
def test_rule_limit_is_respected_and_optimal(max_rules):
    curves = _three_backends()
    build = build_table(SIZES, curves, world_size=2, max_rules=max_rules)
    assert len(build.rules) <= max_rules
    assert build.rules[-1].max_bytes is None
    expected = _brute_force(SIZES, curves, 2, log_uniform_weights(SIZES), max_rules, None)
    assert build.regret == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("budget", [0, 2 * 8192, 2 * 65536, 2 * (8192 + 65536)])
def test_memory_budget_is_respected_and_optimal(budget):
    curves = _three_backends()
    build = build_table(SIZES, curves, world_size=2, memory_budget=budget)
    assert build.buffer_bytes <= budget
    expected = _brute_force(SIZES, curves, 2, log_uniform_weights(SIZES), 4, budget)
    assert build.regret == pytest.approx(expected, abs=1e-12)
    if budget == 0:
        assert [r.algorithm for r in build.rules] == ["gloo"]


def test_pareto_front_is_monotone_and_ends_at_the_optimum():
    build = build_table(SIZES, _three_backends(), world_size=2)
    mems = [p.buffer_bytes for p in build.front]
    regrets = [p.regret for p in build.front]
    assert mems == sorted(mems) and mems[0] == 0
    assert all(a > b for a, b in zip(regrets, regrets[1:], strict=False))
    assert build.front[-1].regret == pytest.approx(build.regret)


def test_exact_on_random_instances_against_brute_force():
    rng = random.Random(7)
    sizes = SIZES[:6]
    for _ in range(6):
        curves = [
            _curve(alg, [rng.uniform(5, 50) * (1 + i) for i in range(len(sizes))], params=params)
            for alg, params in [
                ("gloo", None),
                ("shm_one_shot", {"chunk_bytes": 1}),
                ("shm_one_shot", {"chunk_bytes": 2}),
                ("shm_two_shot", None),
            ]
        ]
        weights = log_uniform_weights(sizes)
        for max_rules, budget in [(2, None), (3, None), (3, 2 * 4096)]:
            build = build_table(sizes, curves, 2, max_rules=max_rules, memory_budget=budget)
            expected = _brute_force(sizes, curves, 2, weights, max_rules, budget)
            assert build.regret == pytest.approx(expected, abs=1e-9)
            if budget is not None:
                assert build.buffer_bytes <= budget


def test_no_flip_on_noise():
    """B's median beats A's at two middle sizes, but inside the spread: A keeps the range."""
    a = [10.0] * len(SIZES)
    b = [12.0] * len(SIZES)
    b[4], b[5] = 9.6, 9.7  # 3-4 % faster, spread is 10 %
    curves = [_curve("shm_one_shot", a, spread=0.1), _curve("gloo", b, spread=0.1)]
    build = build_table(SIZES, curves, world_size=2)
    assert [r.algorithm for r in build.rules] == ["shm_one_shot"]
    # the same data measured with no spread does switch: the hysteresis is the spread
    tight = [_curve("shm_one_shot", a), _curve("gloo", b)]
    assert len(build_table(SIZES, tight, world_size=2).rules) == 3


def test_clear_win_does_take_the_range():
    a = [10.0] * len(SIZES)
    b = [12.0] * len(SIZES)
    b[4], b[5] = 5.0, 5.0  # 2x faster, far outside a 10 % spread
    curves = [_curve("shm_one_shot", a, spread=0.1), _curve("gloo", b, spread=0.1)]
    build = build_table(SIZES, curves, world_size=2)
    assert [r.algorithm for r in build.rules] == ["shm_one_shot", "gloo", "shm_one_shot"]
    assert [r.max_bytes for r in build.rules] == [SIZES[3], SIZES[5], None]


def test_workload_weights_map_to_the_next_measured_size():
    sizes = [1024, 4096, 16384]
    w = workload_weights(sizes, {1000: 1, 1024: 1, 3000: 2, 10**9: 4})
    assert w == [pytest.approx(2 / 8), pytest.approx(2 / 8), pytest.approx(4 / 8)]
    # a workload that only sends large messages makes the small sizes free
    curves = _three_backends()
    heavy = workload_weights(SIZES, {SIZES[-1]: 1})
    build = build_table(SIZES, curves, world_size=2, weights=heavy, max_rules=1)
    assert [r.algorithm for r in build.rules] == ["gloo"]


def test_sparse_and_infeasible_inputs():
    nan = math.nan
    curves = [_curve("gloo", [10, 10, nan, 10]), _curve("shm_one_shot", [5, nan, nan, 5])]
    with pytest.raises(BuildError, match="no configuration measured at 4096"):
        build_table([1024, 2048, 4096, 8192], curves, 2)
    curves = [_curve("gloo", [10, nan, 10]), _curve("shm_one_shot", [nan, 5, nan])]
    with pytest.raises(BuildError, match="at most 1 rules"):
        build_table([1024, 2048, 4096], curves, 2, max_rules=1)
    assert len(build_table([1024, 2048, 4096], curves, 2).rules) == 3
