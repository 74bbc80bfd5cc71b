"""The Optuna study: finds a planted best with far fewer trials than the grid, prunes, never
measures a configuration twice, and takes sweep rows as completed trials."""

from __future__ import annotations

import json
import math

import optuna
import pandas as pd

from tuner.search.measure import Outcome
from tuner.search.options import SearchOptions
from tuner.search.search import search_group
from tuner.search.study import Space, enter_rows, measurements

SIZES = [1 << k for k in range(10, 22, 2)]  # 1K .. 1M, six sizes
SPACE = Space(
    algorithms=("alpha", "beta", "gamma"),
    knobs={
        "alpha": {"blocks": (1, 2, 4, 8, 16, 32), "warps": (1, 2, 4, 8)},
        "beta": {"blocks": (1, 2, 4, 8, 16, 32), "warps": (1, 2, 4, 8)},
        "gamma": {},
    },
    defaults={"alpha": {"blocks": 1, "warps": 1}, "beta": {"blocks": 1, "warps": 1}, "gamma": {}},
)


def planted_latency(algorithm: str, params: dict, nbytes: int) -> float:
    """alpha wins below 64K with blocks 8 / warps 4; beta above, with blocks growing with size;
    gamma is a flat floor that never wins."""
    scale = math.log2(nbytes)
    if algorithm == "gamma":
        return 500.0
    target_blocks = 8 if algorithm == "alpha" else (4 if nbytes < 1 << 18 else 16)
    base = (
        10 + (scale - 10) * (6 if algorithm == "alpha" else 2) + (0 if algorithm == "alpha" else 15)
    )
    miss = abs(math.log2(params["blocks"]) - math.log2(target_blocks)) + abs(
        math.log2(params["warps"]) - 2
    )
    return base * (1 + 0.25 * miss)


def _oracle(nbytes):
    return min(
        ((a, p) for a, p in SPACE.configs()), key=lambda c: planted_latency(c[0], c[1], nbytes)
    )


def test_study_finds_the_planted_best_with_far_fewer_trials_than_the_grid():
    measured: list[tuple] = []

    def measure(algorithm, params, nbytes, report):
        latency = planted_latency(algorithm, params, nbytes)
        measured.append((algorithm, json.dumps(params, sort_keys=True), nbytes))
        for step in range(3):  # rounds: the pruner may stop a clearly slower one
            if report(step, latency):
                return Outcome("pruned", latency_us=latency, iters=step + 1)
        return Outcome(
            "ok", latency_us=latency, p10_us=latency * 0.98, p90_us=latency * 1.02, iters=4
        )

    storage = optuna.storages.InMemoryStorage()
    group = ("synthetic", 2, "float32", "eager")
    # the search alone (confirmation re-measures on purpose: tested below)
    options = SearchOptions(patience=4, seed=1, confirm_top=1, budget_fraction=None)
    results = search_group(storage, group, SIZES, SPACE, list(SPACE.algorithms), measure, options)
    grid = SPACE.grid_size() * len(SIZES)
    used = sum(r.measured for r in results)
    assert len(set(measured)) == len(measured), "a configuration was measured twice"
    assert used == len(measured)
    assert used <= 0.3 * grid, (used, grid)
    assert any(r.pruned for r in results)
    for result in results:
        best_alg, best_params = _oracle(result.nbytes)
        found = planted_latency(*result.best, result.nbytes)
        planted = planted_latency(best_alg, best_params, result.nbytes)
        assert found <= planted * 1.02, (result.nbytes, result.best, best_alg, best_params)

    # a second run on the same storage resumes: nothing is measured again
    before = len(measured)
    search_group(storage, group, SIZES, SPACE, list(SPACE.algorithms), measure, options)
    assert len(measured) - before <= len(SIZES) * options.patience
    assert len(set(measured)) == len(measured)


def test_rows_enter_as_completed_trials_once():
    rows = pd.DataFrame(
        [
            {
                "run_id": "r1",
                "hardware_key": "hw",
                "world_size": 2,
                "dtype": "float32",
                "mode": "eager",
                "bytes": 1024,
                "backend": b,
                "latency_us": v,
                "p10_us": v * 0.9,
                "p90_us": v * 1.1,
                "iters": 20,
                "params": json.dumps(p, sort_keys=True),
            }
            for b, p, v in [
                ("alpha", {"blocks": 8, "warps": 4}, 10.0),
                ("alpha", {"blocks": 1, "warps": 1}, 14.0),
                ("gamma", {}, 50.0),
            ]
        ]
    )
    spaces = {("hw", 2, "float32", "eager"): SPACE}
    storage = optuna.storages.InMemoryStorage()
    assert enter_rows(storage, rows, spaces) == (3, 0)
    assert enter_rows(storage, rows, spaces) == (0, 3)  # the same run again adds nothing
    data = measurements(storage)
    points = data[("hw", 2, "float32", "eager")][1024]
    assert sorted((p.algorithm, p.latency_us) for p in points) == [
        ("alpha", 10.0),
        ("alpha", 14.0),
        ("gamma", 50.0),
    ]
    study = optuna.load_study(study_name="hw/ws2/float32/eager/1024", storage=storage)
    assert study.best_trial.params == {"algorithm": "alpha", "alpha.blocks": 8, "alpha.warps": 4}
    assert study.best_trial.user_attrs["p90_us"] == 11.0


def test_confirmation_picks_the_truly_fastest_under_noise():
    """Three leaders within 6 %; the first measurement flatters the second-fastest, and one
    confirmation round of the fastest is an outlier: re-measured side by side, interleaved,
    the median picks the truly fastest (the single measurements and the mean would not)."""
    space = Space(
        algorithms=("alpha", "beta", "gamma"),
        knobs={
            "alpha": {"blocks": (2, 4, 8), "warps": (2, 4)},
            "beta": {"blocks": (2, 4, 8), "warps": (2, 4)},
            "gamma": {},
        },
        defaults={
            "alpha": {"blocks": 2, "warps": 2},
            "beta": {"blocks": 2, "warps": 2},
            "gamma": {},
        },
    )
    fastest = ("alpha", json.dumps({"blocks": 8, "warps": 4}, sort_keys=True))
    lucky = ("alpha", json.dumps({"blocks": 8, "warps": 2}, sort_keys=True))
    third = ("beta", json.dumps({"blocks": 4, "warps": 4}, sort_keys=True))
    true_us = {fastest: 10.0, lucky: 10.4, third: 10.6}
    # multiplier of the n-th measurement of a configuration (deterministic noise)
    noise = {
        fastest: [1.08, 1.0, 1.5, 1.01],
        lucky: [0.95, 1.02, 0.9, 1.0],
        third: [0.97, 1.0, 1.0, 0.8],
    }
    calls: list[tuple] = []

    def measure(algorithm, params, nbytes, report):
        key = (algorithm, json.dumps(params, sort_keys=True))
        nth = sum(c == key for c in calls)
        calls.append(key)
        base = true_us.get(key, 12.0 + 0.1 * len(key[1]) + (algorithm == "gamma"))
        latency = base * (noise[key][nth] if key in noise else 1.0)
        for step in range(2):
            if report(step, latency):
                return Outcome("pruned", latency_us=latency, iters=step + 1)
        return Outcome("ok", latency_us=latency, iters=4)

    def search(**confirm):
        calls.clear()
        storage = optuna.storages.InMemoryStorage()
        options = SearchOptions(patience=100, budget_fraction=None, seed=0, **confirm)
        return search_group(
            storage,
            ("synthetic", 2, "float32", "eager"),
            [4096],
            space,
            list(space.algorithms),
            measure,
            options,
        )[0]

    single = search(confirm_top=1)
    assert (
        len(calls) == space.grid_size()
    )  # the search measured each configuration once  # no confirmation: the lucky one wins
    assert (single.best[0], json.dumps(single.best[1], sort_keys=True)) == lucky
    assert single.confirmed == 0

    result = search(confirm_top=3, confirm_rounds=3)
    assert (result.best[0], json.dumps(result.best[1], sort_keys=True)) == fastest
    assert result.best_latency_us == 10.1
    assert result.confirmed == 9 and result.measured == len(calls)  # counted honestly
    tail = calls[-9:]  # interleaved: A B C A B C A B C
    assert set(tail[:3]) == {fastest, lucky, third} and tail == tail[:3] * 3
    confirmed = {(c[0], json.dumps(c[1], sort_keys=True)): c[3] for c in result.candidates}
    assert confirmed[fastest] == [10.0, 15.0, 10.1]


def test_budget_fraction_bounds_every_size_confirmation_included():
    measured: list[tuple] = []

    def measure(algorithm, params, nbytes, report):
        measured.append(nbytes)
        latency = planted_latency(algorithm, params, nbytes)
        return Outcome("ok", latency_us=latency, iters=4)

    options = SearchOptions(patience=1000, budget_fraction=0.5, seed=0)
    results = search_group(
        optuna.storages.InMemoryStorage(),
        ("synthetic", 2, "float32", "eager"),
        SIZES[:2],
        SPACE,
        list(SPACE.algorithms),
        measure,
        options,
    )
    for result in results:
        assert result.measured == measured.count(result.nbytes)
        assert result.measured <= int(0.5 * result.grid), (result.measured, result.grid)
        assert result.confirmed == options.confirm_top * options.confirm_rounds
