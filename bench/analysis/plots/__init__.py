"""Figures of a run, importable: the notebooks and `bench report DIR --plots` draw the same ones.

Every function takes a results frame (`bench.analysis.results.read_results`, or `load_runs` for
several runs) and returns a `matplotlib.figure.Figure` built without pyplot, so a script, a
notebook and a headless CI machine all behave alike. A thresholds.json is read through the
runtime's own schema (`tuner.runtime.schema`, imported only when a figure needs it); a study's
trials and a Pareto front come in as plain frames.

One module per family of figures:
- `common`: loading runs, a backend's colour (the registry's order), axes, panels, legends;
- `performance`: latency and bus bandwidth vs size, the link limit of known GPUs;
- `choice`: winners per size, crossovers, the rules of a thresholds.json beside them;
- `gain`: the gain of a choice (a table, the oracle) over a baseline;
- `tuning`: an Optuna study's convergence, the memory-vs-regret Pareto front;
- `status`: every skipped or incorrect point (nothing hidden);
- `numerics`: each point's arithmetic, its error against float64, the price of exact tables;
- `runs`: the PNG files of one run (`write_run_plots`).
"""

from bench.analysis.plots.choice import (
    crossovers,
    plot_winners,
    table_chooser,
    tables_by_group,
    winners,
)
from bench.analysis.plots.common import backend_color, find_runs, load_runs
from bench.analysis.plots.gain import default_baseline, gain_table, plot_gain
from bench.analysis.plots.numerics import (
    exact_price,
    exact_price_summary,
    numerics_table,
    plot_numerics,
)
from bench.analysis.plots.performance import (
    LINK_LIMITS,
    hardware_limit,
    plot_busbw,
    plot_latency,
)
from bench.analysis.plots.runs import figure_names, run_thresholds, write_run_plots
from bench.analysis.plots.status import plot_status, status_table
from bench.analysis.plots.tuning import plot_convergence, plot_pareto
from bench.analysis.stats import geomean

__all__ = [
    "LINK_LIMITS",
    "find_runs",
    "load_runs",
    "backend_color",
    "hardware_limit",
    "plot_latency",
    "plot_busbw",
    "winners",
    "crossovers",
    "tables_by_group",
    "table_chooser",
    "plot_winners",
    "gain_table",
    "default_baseline",
    "geomean",
    "plot_gain",
    "plot_convergence",
    "plot_pareto",
    "status_table",
    "plot_status",
    "numerics_table",
    "exact_price",
    "exact_price_summary",
    "plot_numerics",
    "figure_names",
    "run_thresholds",
    "write_run_plots",
]
