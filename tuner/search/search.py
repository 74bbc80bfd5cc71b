"""The live search: per message size, an Optuna study decides what to measure next.

For each group (hardware, world size, dtype, mode) the sizes are searched in increasing order,
one study each (see study.py for the space). The measurement itself is a callback, so the same
loop drives real ranks (`tuner live`) and synthetic objectives (tests). Per size:

1. Warm start: the previous size's best configuration of each of its `seed_algorithms` fastest
   algorithms (at the smallest size: every algorithm's defaults) is enqueued first; the best
   configuration changes slowly with size, so most sizes start next to their optimum.
2. Hill climb: while the best configuration of one of the `climb_algorithms` fastest
   algorithms has an unmeasured neighbour (one knob moved to an adjacent value, or another
   algorithm with the same knobs), that neighbour is enqueued; knob values are ordered
   (blocks, warps, chunk bytes, threads), which a categorical sampler does not know.
3. Exploration: then Optuna's TPE sampler (multivariate, grouped by the conditional space)
   proposes, until `patience` explored trials in a row do not beat the best by
   `min_improvement`; a proposal already measured is answered from the study, never measured
   again. Also stops when every configuration was tried, or when the budget is spent.
4. Confirmation: a single measurement is noisy and the fastest of many single measurements is
   flattered by its own luck, so the size's best is not the minimum. The `confirm_top`
   fastest distinct configurations (always including the best of the second-fastest
   algorithm) are measured again side by side, interleaved (A B C A B C ...), `confirm_rounds`
   rounds, never pruned, and the one with the lowest median of those rounds is the size's
   best. These re-measurements are trials of the study (user attribute `confirm`) and count
   as measurements.

Budget per size: at most `budget_fraction` of the configurations that exist at that size
(and at most `max_trials`), confirmation included: the search stops early enough to leave
room for it (on a grid too small for that, the search still measures at least one
configuration and the confirmation may take the total over the fraction).

Pruning: after each round of iterations the median so far is reported; `MarginPruner` stops a
configuration more than `prune_margin` slower than the best completed one at that step, from
the second round on.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from bench.backends import params_key
from tuner.search.leaders import best_configs, confirmation_candidates, known_values, next_neighbour
from tuner.search.measure import Outcome
from tuner.search.options import PointResult, SearchOptions
from tuner.search.study import Space, open_study, study_name

__all__ = ["search_point", "grid_point", "confirm_point", "search_group", "Measure"]

# measure(algorithm, params, nbytes, report) -> Outcome; report(step, median_us) -> prune?
Measure = Callable[[str, dict, int, Callable[[int, float], bool]], Outcome]


def search_point(
    study: optuna.Study,
    space: Space,
    available: Sequence[str],
    measure: Measure,
    nbytes: int,
    seeds: Sequence[tuple[str, dict]],
    options: SearchOptions,
) -> PointResult:
    """Seeds first, then a hill climb around the incumbents, then TPE exploration until
    `patience` explored trials bring no improvement."""
    known = known_values(study)
    best = min(
        (v for (alg, _), v in known.items() if v is not None and alg in available), default=None
    )
    for algorithm, params in seeds:
        if algorithm in available and (algorithm, params_key(params)) not in known:
            study.enqueue_trial(space.trial_params(algorithm, params))
    pending_seeds = len(seeds)
    grid = {(a, params_key(p)) for a, p in space.configs(available)}
    budget = options.budget(len(grid))
    search_limit = None if budget is None else max(1, budget - options.reserve())
    streak = measured = pruned = asked = 0
    while asked < 4 * len(grid) + 10 and not grid <= set(known):
        if search_limit is not None and measured >= search_limit:
            break
        exploring = False
        if pending_seeds <= 0:
            step = next_neighbour(space, available, known, options.climb_algorithms)
            if step is not None:
                study.enqueue_trial(space.trial_params(*step))
            elif streak >= options.patience:
                break
            else:
                exploring = True
        pending_seeds -= 1
        trial = study.ask()
        asked += 1
        algorithm, params = space.suggest(trial)
        if _answered(study, trial, algorithm, params, known, available):
            streak += exploring
            continue
        outcome = _measure_trial(study, trial, algorithm, params, nbytes, measure, options)
        known[(algorithm, params_key(params))] = (
            outcome.latency_us if outcome.status == "ok" else None
        )
        measured += outcome.status in ("ok", "pruned", "wrong")
        pruned += outcome.status == "pruned"
        improved = outcome.status == "ok" and (
            best is None or outcome.latency_us < best * (1 - options.min_improvement)
        )
        if outcome.status == "ok":
            best = outcome.latency_us if best is None else min(best, outcome.latency_us)
        if exploring:
            streak = 0 if improved else streak + 1
    confirmed, candidates = confirm_point(study, space, available, measure, nbytes, options)
    counts = {"grid": len(grid), "measured": measured + confirmed, "pruned": pruned, "asked": asked}
    return _point_result(study, available, nbytes, counts, confirmed, candidates)


def _answered(
    study: optuna.Study,
    trial: optuna.Trial,
    algorithm: str,
    params: dict,
    known: dict,
    available: Sequence[str],
) -> bool:
    """Finish a trial that needs no measurement: its algorithm cannot run here, or it was
    measured before (answered from the study, never measured twice)."""
    key = (algorithm, params_key(params))
    if algorithm not in available:
        trial.set_user_attr("reason", f"{algorithm} is not available here")
        study.tell(trial, state=TrialState.FAIL)
        return True
    if key not in known:
        return False
    trial.set_user_attr("repeat_of", params_key(params))
    if known[key] is None:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, known[key])
    return True


def _measure_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    algorithm: str,
    params: dict,
    nbytes: int,
    measure: Measure,
    options: SearchOptions,
) -> Outcome:
    def report(step: int, median_us: float) -> bool:
        trial.report(median_us, step)
        return trial.should_prune()

    outcome = measure(algorithm, dict(params), nbytes, report)
    _tell(study, trial, outcome, options.run_id)
    return outcome


def _point_result(
    study: optuna.Study,
    available: Sequence[str],
    nbytes: int,
    counts: dict,
    confirmed: int = 0,
    candidates: list | None = None,
) -> PointResult:
    """The confirmed leader when there was a confirmation, else the study's best."""
    if candidates:
        algorithm, params, median_us, _ = candidates[0]
        return PointResult(
            nbytes=nbytes,
            **counts,
            best=(algorithm, params),
            best_latency_us=median_us,
            confirmed=confirmed,
            candidates=candidates,
        )
    found = best_configs(study, available)
    return PointResult(
        nbytes=nbytes,
        **counts,
        best=(found[0][0], found[0][1]) if found else None,
        best_latency_us=found[0][2] if found else None,
    )


def _label(algorithm: str, params: dict) -> tuple[str, str]:
    return algorithm, params_key(params)


def confirm_point(
    study: optuna.Study,
    space: Space,
    available: Sequence[str],
    measure: Measure,
    nbytes: int,
    options: SearchOptions,
) -> tuple[int, list | None]:
    """Re-measure the leaders side by side, interleaved, `confirm_rounds` rounds; returns
    (new measurements, [[algorithm, params, median_us, latencies], ...] fastest first) or
    (0, None) when there is nothing to choose between. The result is kept on the study
    (user attribute `confirmed`), so a resumed run with the same leaders measures nothing."""
    if options.confirm_top <= 1 or options.confirm_rounds < 1:
        return 0, None
    chosen = confirmation_candidates(study, available, options.confirm_top)
    if len(chosen) < 2:
        return 0, None
    labels = [[alg, params_key(params)] for alg, params in chosen]
    previous = study.user_attrs.get("confirmed")
    if previous and sorted(previous["labels"]) == sorted(labels):
        return 0, previous["candidates"]
    times: dict[int, list[float]] = {i: [] for i in range(len(chosen))}
    measured = 0
    for round_ in range(options.confirm_rounds):
        for index, (algorithm, params) in enumerate(chosen):
            study.enqueue_trial(space.trial_params(algorithm, params))
            trial = study.ask()
            while _label(*space.suggest(trial)) != _label(algorithm, params):
                # a seed enqueued before the budget ran out: not measured
                trial.set_user_attr("reason", "not measured (the budget was spent)")
                study.tell(trial, state=TrialState.FAIL)
                trial = study.ask()
            trial.set_user_attr("confirm", round_)
            outcome = measure(algorithm, dict(params), nbytes, lambda step, median_us: False)
            _tell(study, trial, outcome, options.run_id)
            measured += outcome.status in ("ok", "pruned", "wrong")
            if outcome.status == "ok":
                times[index].append(outcome.latency_us)
    candidates = sorted(
        (
            [alg, params, statistics.median(times[i]), times[i]]
            for i, (alg, params) in enumerate(chosen)
            if times[i]
        ),
        key=lambda c: c[2],
    )
    study.set_user_attr("confirmed", {"labels": labels, "candidates": candidates})
    return measured, candidates or None


def grid_point(
    study: optuna.Study,
    space: Space,
    available: Sequence[str],
    measure: Measure,
    nbytes: int,
    options: SearchOptions,
) -> PointResult:
    """Every configuration once, in order, never pruned (the grid the search is judged by)."""
    known = known_values(study)
    measured = asked = 0
    for algorithm, params in space.configs(available):
        if (algorithm, params_key(params)) in known:
            continue
        study.enqueue_trial(space.trial_params(algorithm, params))
        trial = study.ask()
        asked += 1
        algorithm, params = space.suggest(trial)
        if (algorithm, params_key(params)) in known:  # cannot happen with an enqueued trial
            study.tell(trial, state=TrialState.FAIL)
            continue
        known[(algorithm, params_key(params))] = None
        outcome = measure(algorithm, dict(params), nbytes, lambda step, median_us: False)
        _tell(study, trial, outcome, options.run_id)
        measured += outcome.status in ("ok", "wrong")
    counts = {
        "grid": len(space.configs(available)),
        "measured": measured,
        "pruned": 0,
        "asked": asked,
    }
    return _point_result(study, available, nbytes, counts)


def _tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome, run_id: str) -> None:
    """Record the outcome on the trial and finish it: a value, pruned, or failed (cannot take
    this size, or a wrong sum: never a candidate)."""
    _record(trial, outcome, run_id)
    if outcome.status == "ok":
        study.tell(trial, outcome.latency_us)
    elif outcome.status == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)


def _record(trial: optuna.Trial, outcome: Outcome, run_id: str) -> None:
    attrs: dict[str, Any] = {
        "origin": "live",
        "status": outcome.status,
        "iters": outcome.iters,
        "run_id": run_id,
    }
    for name in ("p10_us", "p90_us", "reason", "max_abs_err"):
        value = getattr(outcome, name)
        if value is not None:
            attrs[name] = value
    for name, value in attrs.items():
        trial.set_user_attr(name, value)


def search_group(
    storage,
    group: tuple,
    sizes: Sequence[int],
    space: Space,
    available: Sequence[str],
    measure: Measure,
    options: SearchOptions,
    on_point: Callable[[PointResult], None] | None = None,
) -> list[PointResult]:
    """Every size of one group, smallest first, each warm-started from the one before."""
    hardware_key, world_size, dtype, mode = group
    results = []
    seeds: list[tuple[str, dict]] = [(name, dict(space.defaults[name])) for name in available]
    for nbytes in sizes:
        study = open_study(
            storage,
            study_name(hardware_key, world_size, dtype, mode, nbytes),
            sampler=options.sampler(space.fixed_params()),
            pruner=options.pruner(),
        )
        for stale in study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)
        ):
            # left by an interrupted run (this process is the study's only writer)
            if stale.state == TrialState.WAITING:
                stale_trial = study.ask()  # a waiting trial is handed out first: finish it
                study.tell(stale_trial, state=TrialState.FAIL)
            else:
                study.tell(stale.number, state=TrialState.FAIL)
        if options.exhaustive:
            result = grid_point(study, space, available, measure, nbytes, options)
        else:
            result = search_point(study, space, available, measure, nbytes, seeds, options)
        results.append(result)
        if on_point is not None:
            on_point(result)
        ranked = [
            (alg, params)
            for alg, params, _ in best_configs(study, available)[: max(1, options.seed_algorithms)]
        ]
        if result.best is not None:  # the confirmed best first
            ranked = [result.best] + [c for c in ranked if c != result.best]
        seeds = ranked or seeds
    return results
