"""Optuna studies over the configuration space, one study per measured point.

A study is one (hardware key, world size, dtype, mode, message size); its objective is the
latency in microseconds (the slowest rank's median, as the sweep measures it). A trial's
parameters are ``algorithm`` (categorical over the group's algorithms) and, for the chosen
algorithm, each of its knobs as ``<algorithm>.<knob>`` (categorical over the knob's values in
the backend registry): a conditional space, the algorithm times its knobs.

`tuner fit` enters measured rows as completed trials with exactly these distributions (user
attribute ``source`` names the row, so entering a run again adds nothing); `tuner live` asks
for new trials. Storage is SQLite (``sqlite:///path``), so a study resumes and opens in
optuna-dashboard.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from bench.analysis.results import TABLE_KEY
from bench.backends import get_spec, params_key

__all__ = [
    "Space",
    "study_name",
    "parse_study_name",
    "open_study",
    "enter_rows",
    "measurements",
    "storage_url",
    "StudyError",
]

ALGORITHM = "algorithm"
optuna.logging.set_verbosity(optuna.logging.WARNING)


class StudyError(ValueError):
    """A study database that does not fit (one line)."""


def storage_url(path: str | None) -> str | None:
    """SQLite URL for a path (None: in memory)."""
    if path is None:
        return None
    return path if "://" in str(path) else f"sqlite:///{path}"


def study_name(hardware_key: str, world_size: int, dtype: str, mode: str, nbytes: int) -> str:
    return f"{hardware_key}/ws{int(world_size)}/{dtype}/{mode}/{int(nbytes)}"


def parse_study_name(name: str) -> tuple[str, int, str, str, int] | None:
    parts = name.rsplit("/", 4)
    if len(parts) != 5 or not parts[1].startswith("ws"):
        return None
    try:
        return parts[0], int(parts[1][2:]), parts[2], parts[3], int(parts[4])
    except ValueError:
        return None


def _sort_values(values: Iterable[Any]) -> tuple:
    return tuple(sorted(set(values), key=lambda v: (type(v).__name__, v)))


@dataclasses.dataclass(frozen=True)
class Space:
    """The configuration space of one group: algorithms, and each one's knob values."""

    algorithms: tuple[str, ...]
    knobs: Mapping[str, Mapping[str, tuple]]  # algorithm -> knob -> values
    defaults: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    fixed: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def for_algorithms(
        cls, names: Iterable[str], seen: Mapping[str, Iterable[Mapping[str, Any]]] | None = None
    ) -> Space:
        """Knob values from the registry, plus any value seen in `seen` (algorithm -> list of
        params; covers backends whose family does not import here)."""
        names = sorted(set(names))
        knobs: dict[str, dict[str, tuple]] = {}
        defaults: dict[str, dict[str, Any]] = {}
        for name in names:
            values: dict[str, list] = {}
            default: dict[str, Any] = {}
            try:
                spec = get_spec(name)
                for knob, choices in spec.knobs.items():
                    values.setdefault(knob, []).extend(choices)
                default = spec.default_params()
            except KeyError:
                pass
            for params in (seen or {}).get(name, ()):
                for knob, value in params.items():
                    values.setdefault(knob, []).append(value)
            knobs[name] = {k: _sort_values(v) for k, v in sorted(values.items())}
            defaults[name] = {k: default.get(k, v[0]) for k, v in knobs[name].items()}
        return cls(algorithms=tuple(names), knobs=knobs, defaults=defaults)

    def restrict(self, fixed: Mapping[str, Mapping[str, Any]]) -> Space:
        """Knobs given a value (`--param BACKEND.KNOB=VALUE`) keep their distribution (so a
        study stays compatible) but are only ever sampled at that value."""
        keep = {
            name: {k: v for k, v in values.items() if name in self.knobs and k in self.knobs[name]}
            for name, values in fixed.items()
        }
        defaults = {name: {**d, **keep.get(name, {})} for name, d in self.defaults.items()}
        return Space(self.algorithms, self.knobs, defaults, keep)

    def fixed_params(self) -> dict[str, Any]:
        return {
            f"{name}.{knob}": value
            for name, values in self.fixed.items()
            for knob, value in values.items()
        }

    def distributions(self, algorithm: str) -> dict[str, CategoricalDistribution]:
        out = {ALGORITHM: CategoricalDistribution(self.algorithms)}
        for knob, values in self.knobs[algorithm].items():
            out[f"{algorithm}.{knob}"] = CategoricalDistribution(values)
        return out

    def trial_params(self, algorithm: str, params: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {ALGORITHM: algorithm}
        for knob in self.knobs[algorithm]:
            out[f"{algorithm}.{knob}"] = params[knob]
        return out

    def suggest(
        self, trial: optuna.Trial, algorithms: Sequence[str] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Ask the trial for a configuration (define-by-run: knobs follow the algorithm)."""
        algorithm = trial.suggest_categorical(ALGORITHM, list(self.algorithms))
        params = {
            knob: trial.suggest_categorical(f"{algorithm}.{knob}", list(values))
            for knob, values in self.knobs[algorithm].items()
        }
        return algorithm, params

    def configs(self, algorithms: Iterable[str] | None = None) -> list[tuple[str, dict]]:
        """Every configuration (the full grid)."""
        out = []
        for name in self.algorithms if algorithms is None else algorithms:
            knobs = {
                k: ((self.fixed[name][k],) if k in self.fixed.get(name, {}) else v)
                for k, v in self.knobs[name].items()
            }
            for combo in itertools.product(*knobs.values()):
                out.append((name, dict(zip(knobs, combo, strict=True))))
        return out

    def grid_size(self, algorithms: Iterable[str] | None = None) -> int:
        return len(self.configs(algorithms))


def config_of(trial: optuna.trial.FrozenTrial) -> tuple[str, dict[str, Any]]:
    algorithm = trial.params[ALGORITHM]
    prefix = f"{algorithm}."
    params = {k[len(prefix) :]: v for k, v in trial.params.items() if k.startswith(prefix)}
    return algorithm, params


def open_study(storage, name: str, sampler=None, pruner=None) -> optuna.Study:
    return optuna.create_study(
        storage=storage,
        study_name=name,
        direction="minimize",
        load_if_exists=True,
        sampler=sampler,
        pruner=pruner,
    )


def _check_space(study: optuna.Study, space: Space, name: str) -> None:
    """Optuna needs one distribution per parameter name within a study."""
    for trial in study.get_trials(deepcopy=False):
        dist = trial.distributions.get(ALGORITHM)
        if dist is not None and tuple(dist.choices) != space.algorithms:
            raise StudyError(
                f"--study-db: study {name} was made over algorithms "
                f"{list(dist.choices)}, these rows need {list(space.algorithms)}; "
                "use another --study-db"
            )
        return


def enter_rows(storage, rows, spaces: Mapping[tuple, Space]) -> tuple[int, int]:
    """Each measured row becomes a completed trial of its point's study (once).

    `spaces` maps a group (hardware_key, world_size, dtype, mode) to its Space. Returns
    (trials added, rows already present)."""
    added = present = 0
    keys = [*TABLE_KEY, "bytes"]
    for point, part in rows.groupby(keys, sort=True):
        hw, ws, dtype, mode, nbytes = point
        space = spaces[(hw, int(ws), dtype, mode)]
        name = study_name(hw, ws, dtype, mode, nbytes)
        study = open_study(storage, name)
        _check_space(study, space, name)
        sources = {t.user_attrs.get("source") for t in study.get_trials(deepcopy=False)}
        new = []
        for row in part.itertuples(index=False):
            source = f"{row.run_id}:{row.backend}:{row.params}"
            if source in sources:
                present += 1
                continue
            sources.add(source)
            params = json.loads(row.params)
            new.append(
                optuna.trial.create_trial(
                    params=space.trial_params(row.backend, params),
                    distributions=space.distributions(row.backend),
                    value=float(row.latency_us),
                    user_attrs={
                        "source": source,
                        "origin": "sweep",
                        "run_id": str(row.run_id),
                        "p10_us": _num(row.p10_us),
                        "p90_us": _num(row.p90_us),
                        "iters": int(row.iters),
                    },
                )
            )
        if new:
            study.add_trials(new)
            added += len(new)
    return added, present


def _num(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


@dataclasses.dataclass
class Point:
    """One configuration at one size: the median of its completed trials."""

    algorithm: str
    params: dict[str, Any]
    latency_us: float
    p10_us: float | None
    p90_us: float | None
    trials: int
    run_ids: tuple[str, ...]


def measurements(storage, group: tuple | None = None) -> dict[tuple, dict[int, list[Point]]]:
    """Completed trials of every study in `storage` (or of one group), as
    {group: {bytes: [Point per configuration]}}."""
    out: dict[tuple, dict[int, list[Point]]] = {}
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        parsed = parse_study_name(summary.study_name)
        if parsed is None:
            continue
        hw, ws, dtype, mode, nbytes = parsed
        if group is not None and (hw, ws, dtype, mode) != tuple(group):
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        by_config: dict[tuple[str, str], list] = {}
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if "repeat_of" in trial.user_attrs:
                continue  # a proposal answered from an earlier trial: not a measurement
            algorithm, params = config_of(trial)
            by_config.setdefault((algorithm, params_key(params)), []).append(trial)
        points = []
        for (algorithm, key), trials in sorted(by_config.items()):
            trials = sorted(trials, key=lambda t: t.value)
            middle = trials[(len(trials) - 1) // 2]
            points.append(
                Point(
                    algorithm=algorithm,
                    params=json.loads(key),
                    latency_us=statistics.median(t.value for t in trials),
                    p10_us=middle.user_attrs.get("p10_us"),
                    p90_us=middle.user_attrs.get("p90_us"),
                    trials=len(trials),
                    run_ids=tuple(sorted({str(t.user_attrs.get("run_id", "")) for t in trials})),
                )
            )
        if points:
            out.setdefault((hw, ws, dtype, mode), {})[nbytes] = points
    return out
