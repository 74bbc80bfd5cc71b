"""What a size's study already knows: configurations tried, the leaders, their neighbours."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence

import optuna
from optuna.trial import TrialState

from bench.backends import params_key
from tuner.search.study import Space, config_of

__all__ = [
    "known_values",
    "best_configs",
    "medians",
    "confirmation_candidates",
    "neighbours",
    "next_neighbour",
]


def known_values(study: optuna.Study) -> dict[tuple[str, str], float | None]:
    """Configurations already tried in the study: value (completed) or None (pruned/failed)."""
    known: dict[tuple[str, str], float | None] = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            continue
        if "algorithm" not in trial.params:
            continue
        if trial.state == TrialState.FAIL and trial.user_attrs.get("status") not in (
            "skip",
            "wrong",
        ):
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
    for (algorithm, key), value in medians(study).items():
        if algorithm in available and (algorithm not in best or value < best[algorithm][2]):
            best[algorithm] = (algorithm, json.loads(key), value)
    return sorted(best.values(), key=lambda b: b[2])


def medians(study: optuna.Study) -> dict[tuple[str, str], float]:
    """Median latency per configuration over its completed measurements."""
    values: dict[tuple[str, str], list[float]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "repeat_of" in trial.user_attrs or "algorithm" not in trial.params:
            continue
        algorithm, params = config_of(trial)
        values.setdefault((algorithm, params_key(params)), []).append(trial.value)
    return {key: statistics.median(v) for key, v in values.items()}


def confirmation_candidates(
    study: optuna.Study, available: Sequence[str], top: int
) -> list[tuple[str, dict]]:
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
        chosen = chosen[: top - 1] + [runner_up]
    return [(alg, json.loads(key)) for alg, key in chosen]


def neighbours(
    space: Space, available: Sequence[str], algorithm: str, params: dict
) -> list[tuple[str, dict]]:
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
        if (
            other != algorithm
            and set(knobs) == set(params)
            and all(params[k] in v for k, v in knobs.items())
        ):
            out.append((other, dict(params)))
    return out


def next_neighbour(space, available, known, climb: int) -> tuple[str, dict] | None:
    """An unmeasured neighbour of the best configuration of each of the `climb` fastest
    algorithms (a hill climb over the ordered knobs, proposed to the study by enqueueing)."""
    best: dict[str, tuple[float, str]] = {}
    for (algorithm, key), value in known.items():
        if (
            value is not None
            and algorithm in available
            and (algorithm not in best or value < best[algorithm][0])
        ):
            best[algorithm] = (value, key)
    for algorithm, (_, key) in sorted(best.items(), key=lambda b: b[1][0])[:climb]:
        for candidate in neighbours(space, available, algorithm, json.loads(key)):
            if (candidate[0], params_key(candidate[1])) not in known:
                return candidate
    return None
