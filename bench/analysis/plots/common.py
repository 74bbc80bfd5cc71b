"""What every figure shares: loading runs, a backend's colour, the log size axis, the panel grid
and a figure's one legend."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter, NullLocator

from bench.analysis.results import RESULTS_FILE, read_results
from bench.sizes import format_size

__all__ = [
    "GROUP",
    "Chooser",
    "PALETTE",
    "DTYPE_STYLE",
    "backend_color",
    "find_runs",
    "load_runs",
    "groups",
    "merge_repeats",
    "line_label",
    "size_axis",
    "ratio_axis",
    "panel_grid",
    "run_title",
    "figure_legend",
]

GROUP = ["world_size", "dtype", "mode"]
Chooser = Callable[[int, str, str, int], "str | None"]  # (world_size, dtype, mode, bytes)

PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
]
DTYPE_STYLE = {"bfloat16": "-", "float32": "--", "float16": ":"}


def backend_color(name: str) -> str:
    """The same colour for a backend in every figure: its place in the registry's order."""
    from bench.backends import known_names  # optional: torch, which a run's figures need not load

    known = known_names()
    if name in known:
        return PALETTE[known.index(name) % len(PALETTE)]
    return PALETTE[sum(map(ord, name)) % len(PALETTE)]


# -- loading ----------------------------------------------------------------------------------


def find_runs(root: str | Path = "results") -> list[Path]:
    """Run directories under root (any depth), or root itself when it is one."""
    root = Path(root)
    if (root / RESULTS_FILE).is_file():
        return [root]
    return sorted(p.parent for p in root.glob(f"**/{RESULTS_FILE}"))


def load_runs(runs: str | Path | Iterable[str | Path]):
    """One frame of several runs, with a `run_dir` column naming where each row came from."""
    import pandas as pd

    dirs = find_runs(runs) if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    if not dirs:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {runs}")
    frames = []
    for d in dirs:
        frame = read_results(d)
        frame["run_dir"] = str(d)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def groups(frame, keys: Sequence[str]) -> list[tuple[tuple, Any]]:
    """(key tuple, rows) per distinct value of `keys`, sorted; none for an empty frame."""
    if frame.empty:
        return []
    return [
        (k if isinstance(k, tuple) else (k,), g) for k, g in frame.groupby(list(keys), sort=True)
    ]


def merge_repeats(measured):
    """One line per (backend, dtype) even when several runs measured the same points: the
    median latency and bandwidth over the runs, the band from the lowest p10 to the highest p90,
    the number of runs in `runs` and every row's correctness kept (a wrong row stays wrong)."""
    if measured.empty:
        return measured.assign(runs=[])
    keys = ["backend", "world_size", "dtype", "mode", "bytes"]
    ok = measured["correct"].fillna(False).astype(bool)
    return (
        measured.assign(ok=ok)
        .groupby(keys, as_index=False)
        .agg(
            latency_us=("latency_us", "median"),
            p10_us=("p10_us", "min"),
            p90_us=("p90_us", "max"),
            busbw_gbps=("busbw_gbps", "median"),
            correct=("ok", "all"),
            runs=("run_id", "nunique"),
        )
    )


def line_label(part, backend: str, dtype: str, runs: int) -> str:
    """A line's legend entry: the backend, its dtype when the panel has several, its runs."""
    label = backend
    if part["dtype"].nunique() > 1:
        label += f" {dtype}"
    if runs > 1:
        label += f" (median of {runs} runs)"
    return label


# -- axes -------------------------------------------------------------------------------------


def size_axis(ax, sizes: Iterable[float]) -> None:
    """Log2 message-size axis with at most ~9 ticks labelled 1K, 64M, ..."""
    sizes = [s for s in sizes if s and s > 0]
    ax.set_xscale("log", base=2)
    if not sizes:
        return
    low, high = int(math.floor(math.log2(min(sizes)))), int(math.ceil(math.log2(max(sizes))))
    step = max(1, math.ceil((high - low + 1) / 9))
    ax.xaxis.set_major_locator(FixedLocator([2.0**e for e in range(low, high + 1, step)]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_size(int(round(x)))))
    ax.set_xlim(2.0**low / 1.2, 2.0**high * 1.2)


def ratio_axis(ax) -> None:
    """Log y axis for ratios, labelled 0.5, 1, 2 rather than in powers of ten."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))  # thinned on wide ranges


def panel_grid(frame, width: float = 5.2, height: float = 3.8):
    """One panel per (world size, mode): rows are modes, columns world sizes."""
    world_sizes = sorted(frame["world_size"].unique()) or [0]
    modes = sorted(frame["mode"].unique()) or ["-"]
    # room on the right for the figure's legend
    fig = Figure(
        figsize=(width * len(world_sizes) + 2.8, height * len(modes)), layout="constrained"
    )
    axes = fig.subplots(len(modes), len(world_sizes), squeeze=False)
    return fig, {
        (ws, mode): axes[i][j] for i, mode in enumerate(modes) for j, ws in enumerate(world_sizes)
    }


def run_title(frame) -> str:
    """The machines and the number of runs a figure shows."""
    keys = ", ".join(sorted(frame["hardware_key"].dropna().unique())) or "?"
    return (
        f"{keys}  ({frame['run_id'].nunique()} run{'s' if frame['run_id'].nunique() > 1 else ''})"
    )


def figure_legend(fig: Figure, axes: Iterable[Any]) -> None:
    """One legend for all panels, outside on the right, each label once."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(
            list(entries.values()), list(entries.keys()), loc="outside right center", fontsize=8
        )
