"""The tuner's search, drawn: an Optuna study's convergence and the memory-vs-regret Pareto
front of candidate tables. Both take plain frames (trials, front points), not the tuner's
objects."""

from __future__ import annotations

import math

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from bench.analysis.plots.common import PALETTE, groups, ratio_axis
from bench.sizes import format_size

__all__ = ["plot_convergence", "plot_pareto"]


def plot_convergence(trials, relative: bool = False, max_legend: int = 12) -> Figure:
    """Trials as a frame with `number`, `value` and optionally `study` (one line per study):
    every completed trial's value and the best so far. `relative` divides each study by its
    best value, so studies of different sizes share one axis (1 = the study's best). With more
    than `max_legend` studies the lines go thin and unlabelled, and the median over studies of
    the best so far is drawn on top."""
    import pandas as pd

    fig = Figure(figsize=(9, 4.6), layout="constrained")
    ax = fig.subplots()
    done = trials[trials["value"].notna()] if len(trials) else trials
    if "study" not in done.columns:
        done = done.assign(study="study")
    many = done["study"].nunique() > max_legend if len(done) else False
    best_so_far = []
    for i, ((name,), part) in enumerate(groups(done, ["study"])):
        part = part.sort_values("number")
        values = part["value"] / part["value"].min() if relative else part["value"]
        steps = pd.Series(values.cummin().to_numpy(), index=range(len(part)))
        best_so_far.append(steps)
        color = "#1f77b4" if many else PALETTE[i % len(PALETTE)]
        ax.plot(range(len(part)), values, ".", color=color, alpha=0.25 if many else 0.4)
        ax.step(
            range(len(part)),
            steps,
            where="post",
            color=color,
            alpha=0.3 if many else 1.0,
            linewidth=0.8 if many else 1.5,
            label=None if many else f"{name}: best {part['value'].min():.4g} after {len(part)}",
        )
    if many:
        median = pd.concat(best_so_far, axis=1).ffill().median(axis=1)
        ax.step(
            median.index,
            median,
            where="post",
            color="black",
            linewidth=2,
            label=f"median of {len(best_so_far)} studies' best so far",
        )
    if len(done) == 0:
        ax.text(0.5, 0.5, "no completed trial", transform=ax.transAxes, ha="center")
    else:
        ax.legend(fontsize=8, loc="upper right")
    if relative:
        ratio_axis(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("completed trial (in order)")
    ax.set_ylabel("objective / study's best" if relative else "objective (lower is better)")
    ax.set_title("Optuna study: each trial (dots) and the best so far (line)")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_pareto(
    points, memory: str = "memory_bytes", regret: str = "regret", label: str = "label"
) -> Figure:
    """Candidate tables as (buffer memory, regret) points, one series per `label` when the
    frame has that column; each series' non-dominated points are joined (its Pareto front)."""
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    if len(points) == 0:
        ax.text(0.5, 0.5, "no candidate table", transform=ax.transAxes, ha="center")
        ax.set_axis_off()
        return fig
    series = groups(points, [label]) if label in points.columns else [(("tables",), points)]
    for i, ((name,), pts) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = pts.sort_values([memory, regret])
        ax.plot(pts[memory], pts[regret], "o", color=color, alpha=0.35)
        front, best = [], float("inf")
        for _, row in pts.iterrows():
            if row[regret] < best:
                front.append(row)
                best = row[regret]
        ax.step(
            [r[memory] for r in front],
            [r[regret] for r in front],
            where="post",
            color=color,
            marker="o",
            label=str(name),
        )
    ax.set_xscale("symlog", base=2, linthresh=1024, linscale=0.5)
    top = max(2.0, float(points[memory].max()))
    high = int(math.ceil(math.log2(top)))
    step = max(1, math.ceil((high - 10 + 1) / 8))
    ax.xaxis.set_major_locator(FixedLocator([0.0] + [2.0**e for e in range(10, high + 1, step)]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(
        FuncFormatter(lambda x, _: format_size(int(round(x))) if x >= 1 else "0")
    )
    ax.set_yscale("symlog", linthresh=0.05)
    ax.set_xlabel("buffer memory of the table's backends (bytes, 0 = bufferless only)")
    ax.set_ylabel("regret vs per-size oracle (0.1 = 10% slower)")
    ax.set_title("memory vs regret: each step is the best table for that much memory")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig
