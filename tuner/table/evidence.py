"""Out-of-sample evidence for a table: what it costs on measurements it was not fitted on.

- `heldout_regret`: the fit done again on half of the rounds (even rounds of every run) and
  scored on the other half (odd rounds), then the reverse. Per size of the scored half, the
  regret is the figure of the configuration the half-fit chose over the fastest figure
  there (both the median over that half's rounds), minus 1. This scores the way the table
  was made (pairs, ties kept simple, rule limit) on data it did not see, which an in-sample
  regret (0.00% at every size the builder could follow) never does.
- `score_table`: a table (fitted, or loaded from a file) scored the same way on independent
  runs' results (`tuner fit --validate`, `tuner validate`): per run and size, the latency of
  the configuration its rules choose over that run's fastest, minus 1.

Both summarise as the weighted geomean over the scored cells (weights: the fit's size
distribution, uniform in log size by default; each half or run weighs the same) and the worst
cell, with its size named. A size whose chosen configuration was not measured in the scored
data is left out and counted (`missing`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.backends import params_key
from bench.sizes import format_size
from tuner.runtime.schema import Table
from tuner.table.builder import BuildError, Curve, build_table
from tuner.table.data import config_params
from tuner.table.paired import MIN_GAIN, Figures, paired_bound

__all__ = ["heldout_regret", "score_table", "summarise", "evidence_summary_text"]

Weigh = Callable[[Sequence[int]], Sequence[float]]


def summarise(cells: list[tuple[int, float, float, str]]) -> dict[str, Any] | None:
    """cells: (bytes, chosen / best, weight, where); the weighted geomean regret and the worst."""
    cells = [c for c in cells if c[1] > 0 and math.isfinite(c[1])]
    total = sum(c[2] for c in cells)
    if not cells or total <= 0:
        return None
    geomean = math.exp(sum(w * math.log(r) for _, r, w, _ in cells) / total) - 1.0
    nbytes, ratio, _, where = max(cells, key=lambda c: c[1])
    return {
        "regret_geomean": round(max(geomean, 0.0), 6),
        "regret_worst": round(ratio - 1.0, 6),
        "worst_bytes": int(nbytes),
        "worst_in": where,
        "cells": len(cells),
    }


def _fold(figures: Figures, keep: set[tuple]) -> Figures:
    return [[{k: v for k, v in point.items() if k in keep} for point in curve] for curve in figures]


def _median(point: dict[tuple, float]) -> float:
    return statistics.median(point.values()) if point else math.nan


def heldout_regret(
    curves: Sequence[Curve],
    sizes: Sequence[int],
    figures: Figures,
    weigh: Weigh,
    *,
    world_size: int,
    max_rules: int,
    memory_budget: int | None,
    preference: Sequence[float] | None,
    min_gain: float | None = None,
) -> dict[str, Any] | None:
    """Fit on even rounds, score on odd, and the reverse (module docstring); None where the
    rounds do not split in two (one round) or a half cannot be fitted."""
    keys = {key for curve in figures for point in curve for key in point}
    halves = [{k for k in keys if k[1] % 2 == 0}, {k for k in keys if k[1] % 2 == 1}]
    if not all(halves):
        return None
    cells: list[tuple[int, float, float, str]] = []
    missing = 0
    for fit_half, score_half, name in ((0, 1, "odd rounds"), (1, 0, "even rounds")):
        fit_fig, score_fig = _fold(figures, halves[fit_half]), _fold(figures, halves[score_half])
        # sizes both halves measured (a size missing from one cannot be fitted or scored)
        kept = [
            i
            for i in range(len(sizes))
            if any(curve[i] for curve in fit_fig) and any(curve[i] for curve in score_fig)
        ]
        if not kept:
            return None
        fit_curves = [
            Curve(c.algorithm, c.params, [_median(fit_fig[k][i]) for i in kept])
            for k, c in enumerate(curves)
        ]
        sub_fig = [[curve[i] for i in kept] for curve in fit_fig]
        kept_sizes = [sizes[i] for i in kept]
        try:
            build = build_table(
                kept_sizes,
                fit_curves,
                world_size,
                weights=weigh(kept_sizes),
                max_rules=max_rules,
                memory_budget=memory_budget,
                paired=paired_bound(sub_fig, MIN_GAIN if min_gain is None else min_gain),
                preference=preference,
            )
        except BuildError:
            return None
        weights = weigh(kept_sizes)
        for j, i in enumerate(kept):
            best = min(_median(curve[i]) for curve in score_fig if curve[i])
            chosen = _median(score_fig[build.chosen[j]][i])
            if math.isnan(chosen):
                missing += 1
                continue
            cells.append((sizes[i], chosen / best, weights[j], name))
    summary = summarise(cells)
    if summary is None:
        return None
    return {"method": "even/odd rounds", **summary, "missing": missing}


def score_table(table: Table, rows, weigh: Weigh) -> dict[str, Any] | None:
    """The table on independent runs' rows (`tuner.table.data.load_rows`: measured, correct,
    with `params`) of its group, per run and size (module docstring); None where none of
    the rows is of the table's group."""
    hw, ws, dtype, mode = table.key
    part = rows[
        (rows["hardware_key"] == hw)
        & (rows["world_size"] == ws)
        & (rows["dtype"] == dtype)
        & (rows["mode"] == mode)
    ]
    if part.empty:
        return None
    cells: list[tuple[int, float, float, str]] = []
    missing = 0
    run_ids = sorted(str(r) for r in part["run_id"].unique())
    for run_id, run in part.groupby("run_id", sort=True):
        sizes = sorted(int(b) for b in run["bytes"].unique())
        weights = weigh(sizes)
        latency = {
            (str(b), str(p), int(n)): float(v)
            for b, p, n, v in run[["backend", "params", "bytes", "latency_us"]].itertuples(
                index=False
            )
        }
        best = run.groupby("bytes")["latency_us"].min()
        for nbytes, weight in zip(sizes, weights, strict=True):
            rule = table.algorithm_for(nbytes)
            key = params_key(config_params(rule.algorithm, rule.params))
            chosen = latency.get((rule.algorithm, key, nbytes))
            if chosen is None:
                missing += 1
                continue
            cells.append((nbytes, chosen / float(best[nbytes]), weight / len(run_ids), run_id))
    summary = summarise(cells)
    if summary is None:
        return {"run_ids": run_ids, "missing": missing}
    return {"run_ids": run_ids, **summary, "missing": missing}


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def evidence_summary_text(summary: Mapping[str, Any]) -> str:
    """`regret 1.20% geomean, worst 8.1% at 256K (odd rounds)`: a summary in one phrase."""
    where = summary.get("worst_in")
    return (
        f"regret {_pct(summary['regret_geomean'])} geomean, worst "
        f"{summary['regret_worst'] * 100:.1f}% at {format_size(summary['worst_bytes'])}"
        + (f" ({where})" if where else "")
        + (f"; {summary['missing']} size(s) not measured there" if summary.get("missing") else "")
    )
