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

import dataclasses
import json
import statistics
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from bench.backends import params_key
from tuner.search.measure import Outcome
from tuner.search.study import Space, config_of, open_study, study_name

__all__ = ["MarginPruner", "SearchOptions", "PointResult", "search_point", "grid_point",
           "search_group", "best_configs", "confirm_point", "confirmation_candidates"]

# measure(algorithm, params, nbytes, report) -> Outcome; report(step, median_us) -> prune?
Measure = Callable[[str, dict, int, Callable[[int, float], bool]], Outcome]


@dataclasses.dataclass
class SearchOptions:
    patience: int = 20
    min_improvement: float = 0.01
    max_trials: int | None = None  # measurements per size, confirmation included
    budget_fraction: float | None = 0.25  # of the size's grid, confirmation included
    confirm_top: int = 3  # distinct configurations re-measured side by side (<= 1: none)
    confirm_rounds: int = 3
    seed_algorithms: int = 2
    climb_algorithms: int = 2
    startup_trials: int = 4
    prune_margin: float = 0.5
    exhaustive: bool = False  # measure the whole grid instead of searching
    seed: int = 0
    run_id: str = "live"

    def sampler(self, fixed: dict | None = None) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            tpe = optuna.samplers.TPESampler(n_startup_trials=self.startup_trials,
                                             seed=self.seed, multivariate=True, group=True)
        return optuna.samplers.PartialFixedSampler(fixed, tpe) if fixed else tpe

    def pruner(self) -> optuna.pruners.BasePruner:
        return MarginPruner(self.prune_margin)

    def budget(self, grid: int) -> int | None:
        """Measurements allowed at a size with `grid` configurations (None: no limit)."""
        limits = [self.max_trials] if self.max_trials is not None else []
        if self.budget_fraction is not None:
            limits.append(int(self.budget_fraction * grid))
        return min(limits) if limits else None

    def reserve(self) -> int:
        """Measurements kept for the confirmation."""
        return self.confirm_top * self.confirm_rounds if self.confirm_top > 1 else 0


class MarginPruner(optuna.pruners.BasePruner):
    """Prunes a trial whose median so far is more than `margin` slower than the best completed
    trial's at the same step ("clearly slower"; the median pruner would also stop a
    configuration 1 % behind, which the table builder may still want as a neighbour). Never
    on the first `warmup_steps` rounds: on a busy CPU one round's median is too noisy."""

    def __init__(self, margin: float = 0.5, warmup_steps: int = 1) -> None:
        self.margin, self.warmup_steps = margin, warmup_steps

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.warmup_steps:
            return False
        value = trial.intermediate_values[step]
        best = None
        for done in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            ref = done.intermediate_values.get(step, done.value)
            if ref is not None and (best is None or ref < best):
                best = ref
        return best is not None and value > best * (1 + self.margin)


@dataclasses.dataclass
class PointResult:
    nbytes: int
    grid: int  # configurations that exist at this size
    measured: int  # new measurements (completed or pruned), confirmation included
    pruned: int
    asked: int
    best: tuple[str, dict] | None
    best_latency_us: float | None
    confirmed: int = 0  # of `measured`: side-by-side re-measurements of the leaders
    candidates: list | None = None  # [[algorithm, params, median_us, [latency_us...]], ...]


def _known(study: optuna.Study) -> dict[tuple[str, str], float | None]:
    """Configurations already tried in the study: value (completed) or None (pruned/failed)."""
    known: dict[tuple[str, str], float | None] = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            continue
        if "algorithm" not in trial.params:
            continue
        if trial.state == TrialState.FAIL and trial.user_attrs.get("status") not in (
                "skip", "wrong"):
            continue  # not measured (unavailable here, or an interrupted run): try again
        algorithm, params = config_of(trial)
        key = (algorithm, params_key(params))
        value = trial.value if trial.state == TrialState.COMPLETE else None
        if key not in known or (value is not None and (known[key] is None or value < known[key])):
            known[key] = value
    return known


def best_configs(study: optuna.Study, available: Sequence[str]) -> list[tuple[str, dict, float]]:
    """Each available algorithm's best completed configuration, fastest algorithm first (a
    configuration measured more than once counts with the median of its measurements)."""
    best: dict[str, tuple[str, dict, float]] = {}
    for (algorithm, key), value in _medians(study).items():
        if algorithm in available and (algorithm not in best or value < best[algorithm][2]):
            best[algorithm] = (algorithm, json.loads(key), value)
    return sorted(best.values(), key=lambda b: b[2])


def _medians(study: optuna.Study) -> dict[tuple[str, str], float]:
    """Median latency per configuration over its completed measurements."""
    values: dict[tuple[str, str], list[float]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "repeat_of" in trial.user_attrs or "algorithm" not in trial.params:
            continue
        algorithm, params = config_of(trial)
        values.setdefault((algorithm, params_key(params)), []).append(trial.value)
    return {key: statistics.median(v) for key, v in values.items()}


def confirmation_candidates(study: optuna.Study, available: Sequence[str],
                            top: int) -> list[tuple[str, dict]]:
    """The `top` fastest distinct configurations by their first measurement (a confirmation
    must not feed on itself), with the best of the second-fastest algorithm always among them
    (the leaders are often near-identical variants of one algorithm)."""
    first: dict[tuple[str, str], float] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "repeat_of" in trial.user_attrs or "confirm" in trial.user_attrs:
            continue
        if "algorithm" not in trial.params:
            continue
        algorithm, params = config_of(trial)
        key = (algorithm, params_key(params))
        if algorithm in available and key not in first:
            first[key] = trial.value
    ranked = sorted(first, key=lambda k: first[k])
    chosen = ranked[:top]
    algorithms = list(dict.fromkeys(alg for alg, _ in ranked))
    if top > 1 and len(algorithms) > 1 and algorithms[1] not in {a for a, _ in chosen}:
        runner_up = next(k for k in ranked if k[0] == algorithms[1])
        chosen = chosen[:top - 1] + [runner_up]
    return [(alg, json.loads(key)) for alg, key in chosen]


def neighbours(space: Space, available: Sequence[str], algorithm: str,
               params: dict) -> list[tuple[str, dict]]:
    """One step away: one knob moved to an adjacent value (knob values are ordered), or
    another algorithm with the same knobs at the same values."""
    out = []
    for knob, values in space.knobs[algorithm].items():
        if knob in space.fixed.get(algorithm, {}) or params.get(knob) not in values:
            continue
        index = values.index(params[knob])
        for other in (index - 1, index + 1):
            if 0 <= other < len(values):
                out.append((algorithm, {**params, knob: values[other]}))
    for other in available:
        knobs = space.knobs.get(other, {})
        if other != algorithm and set(knobs) == set(params) and all(
                params[k] in v for k, v in knobs.items()):
            out.append((other, dict(params)))
    return out


def _next_neighbour(space, available, known, climb: int) -> tuple[str, dict] | None:
    """An unmeasured neighbour of the best configuration of each of the `climb` fastest
    algorithms (a hill climb over the ordered knobs, proposed to the study by enqueueing)."""
    best: dict[str, tuple[float, str]] = {}
    for (algorithm, key), value in known.items():
        if value is not None and algorithm in available and (
                algorithm not in best or value < best[algorithm][0]):
            best[algorithm] = (value, key)
    for algorithm, (_, key) in sorted(best.items(), key=lambda b: b[1][0])[:climb]:
        for candidate in neighbours(space, available, algorithm, json.loads(key)):
            if (candidate[0], params_key(candidate[1])) not in known:
                return candidate
    return None


def search_point(study: optuna.Study, space: Space, available: Sequence[str], measure: Measure,
                 nbytes: int, seeds: Sequence[tuple[str, dict]],
                 options: SearchOptions) -> PointResult:
    """Seeds first, then a hill climb around the incumbents, then TPE exploration until
    `patience` explored trials bring no improvement."""
    known = _known(study)
    values = [v for (alg, _), v in known.items() if v is not None and alg in available]
    best = min(values, default=None)
    for algorithm, params in seeds:
        if algorithm in available and (algorithm, params_key(params)) not in known:
            study.enqueue_trial(space.trial_params(algorithm, params))
    pending_seeds = len(seeds)
    grid = {(a, params_key(p)) for a, p in space.configs(available)}
    budget = options.budget(len(grid))
    search_limit = None if budget is None else max(1, budget - options.reserve())
    streak = measured = pruned = asked = 0
    while asked < 4 * len(grid) + 10:
        if search_limit is not None and measured >= search_limit:
            break
        if grid <= set(known):
            break
        exploring = False
        if pending_seeds <= 0:
            step = _next_neighbour(space, available, known, options.climb_algorithms)
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
        key = (algorithm, params_key(params))
        if algorithm not in available:
            trial.set_user_attr("reason", f"{algorithm} is not available here")
            study.tell(trial, state=TrialState.FAIL)
            streak += exploring
            continue
        if key in known:  # measured before: answer from the study, do not measure twice
            trial.set_user_attr("repeat_of", params_key(params))
            if known[key] is None:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, known[key])
            streak += exploring
            continue

        def report(step: int, median_us: float, _trial=trial) -> bool:
            _trial.report(median_us, step)
            return _trial.should_prune()

        outcome = measure(algorithm, dict(params), nbytes, report)
        _tell(study, trial, outcome, options.run_id)
        known[key] = outcome.latency_us if outcome.status == "ok" else None
        measured += outcome.status in ("ok", "pruned", "wrong")
        pruned += outcome.status == "pruned"
        improved = False
        if outcome.status == "ok":
            improved = best is None or outcome.latency_us < best * (1 - options.min_improvement)
            best = outcome.latency_us if best is None else min(best, outcome.latency_us)
        if exploring:
            streak = 0 if improved else streak + 1
    confirmed, candidates = confirm_point(study, space, available, measure, nbytes, options)
    measured += confirmed
    if candidates:
        algorithm, params, median_us, _ = candidates[0]
        return PointResult(nbytes=nbytes, grid=len(grid), measured=measured, pruned=pruned,
                           asked=asked, best=(algorithm, params), best_latency_us=median_us,
                           confirmed=confirmed, candidates=candidates)
    found = best_configs(study, available)
    return PointResult(nbytes=nbytes, grid=len(grid), measured=measured, pruned=pruned,
                       asked=asked, best=(found[0][0], found[0][1]) if found else None,
                       best_latency_us=found[0][2] if found else None)


def _label(algorithm: str, params: dict) -> tuple[str, str]:
    return algorithm, params_key(params)


def confirm_point(study: optuna.Study, space: Space, available: Sequence[str],
                  measure: Measure, nbytes: int,
                  options: SearchOptions) -> tuple[int, list | None]:
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
        ([alg, params, statistics.median(times[i]), times[i]]
         for i, (alg, params) in enumerate(chosen) if times[i]), key=lambda c: c[2])
    study.set_user_attr("confirmed", {"labels": labels, "candidates": candidates})
    return measured, candidates or None


def grid_point(study: optuna.Study, space: Space, available: Sequence[str], measure: Measure,
               nbytes: int, options: SearchOptions) -> PointResult:
    """Every configuration once, in order, never pruned (the grid the search is judged by)."""
    known = _known(study)
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
    found = best_configs(study, available)
    return PointResult(nbytes=nbytes, grid=len(space.configs(available)), measured=measured,
                       pruned=0, asked=asked, best=(found[0][0], found[0][1]) if found else None,
                       best_latency_us=found[0][2] if found else None)


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
    attrs: dict[str, Any] = {"origin": "live", "status": outcome.status, "iters": outcome.iters,
                             "run_id": run_id}
    for name in ("p10_us", "p90_us", "reason", "max_abs_err"):
        value = getattr(outcome, name)
        if value is not None:
            attrs[name] = value
    for name, value in attrs.items():
        trial.set_user_attr(name, value)


def search_group(storage, group: tuple, sizes: Sequence[int], space: Space,
                 available: Sequence[str], measure: Measure, options: SearchOptions,
                 on_point: Callable[[PointResult], None] | None = None) -> list[PointResult]:
    """Every size of one group, smallest first, each warm-started from the one before."""
    hardware_key, world_size, dtype, mode = group
    results = []
    seeds: list[tuple[str, dict]] = [(name, dict(space.defaults[name])) for name in available]
    for nbytes in sizes:
        study = open_study(storage, study_name(hardware_key, world_size, dtype, mode, nbytes),
                           sampler=options.sampler(space.fixed_params()),
                           pruner=options.pruner())
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,
                                                              TrialState.WAITING)):
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
        ranked = [(alg, params) for alg, params, _ in
                  best_configs(study, available)[:max(1, options.seed_algorithms)]]
        if result.best is not None:  # the confirmed best first
            ranked = [result.best] + [c for c in ranked if c != result.best]
        seeds = ranked or seeds
    return results
