"""The live search's settings (`SearchOptions`), its pruner and what it returns per size."""

from __future__ import annotations

import dataclasses
import warnings

import optuna
from optuna.trial import TrialState

__all__ = ["SearchOptions", "MarginPruner", "PointResult"]


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
            tpe = optuna.samplers.TPESampler(
                n_startup_trials=self.startup_trials, seed=self.seed, multivariate=True, group=True
            )
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
