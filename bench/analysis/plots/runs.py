"""`bench report RUN --plots`: a run's main figures as PNG files beside its results.csv."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench.analysis.plots.choice import plot_winners, table_chooser, tables_by_group
from bench.analysis.plots.gain import default_baseline, gain_table, plot_gain
from bench.analysis.plots.numerics import plot_numerics
from bench.analysis.plots.performance import plot_busbw, plot_latency
from bench.analysis.plots.status import plot_status
from bench.analysis.results import read_meta, read_results
from bench.launch.paths import output_error

__all__ = ["FIGURES", "run_thresholds", "figure_names", "write_run_plots"]

# every figure write_run_plots may draw, by file stem ("gain" only with a table: run_thresholds;
# "numerics" only where the run measured its points' arithmetic)
FIGURES = ("latency", "busbw", "winners", "status", "gain", "numerics")


def _run_key(frame) -> str | None:
    return (
        str(frame["hardware_key"].dropna().iloc[0]) if frame["hardware_key"].notna().any() else None
    )


def run_thresholds(
    run_dir: Path, frame, named: str | Path | None = None
) -> tuple[Path | None, dict[tuple, Any] | None]:
    """(the thresholds.json a run's figures compare, its tables for the run's machine), or
    (None, None). The file named (`bench report --thresholds FILE`), else one in the run
    directory or its parent that was fitted from this run (a table's evidence lists one of the
    run's ids); a table fitted on other runs is never picked up unasked."""
    key = _run_key(frame)
    if named is not None:
        return Path(named), tables_by_group(named, key)
    run_ids = set(frame["run_id"].dropna().astype(str))
    for candidate in (run_dir / "thresholds.json", run_dir.parent / "thresholds.json"):
        if not candidate.is_file():
            continue
        tables = tables_by_group(candidate, key)
        if any(run_ids & _fitted_from(t.evidence) for t in tables.values()):
            return candidate, tables
    return None, None


def _fitted_from(evidence) -> set[str]:
    """The run ids a table's evidence names (`run_ids`; older files: `run_id`, comma joined)."""
    ids = evidence.get("run_ids") or str(evidence.get("run_id") or "").split(",")
    return {str(i) for i in ids if i}


def figure_names(
    run_dir: str | Path, frame=None, thresholds: str | Path | None = None
) -> list[str]:
    """The figures `write_run_plots` draws for this run (file stems), drawn or not yet."""
    run_dir = Path(run_dir)
    frame = read_results(run_dir) if frame is None else frame
    _, tables = run_thresholds(run_dir, frame, thresholds)
    drawn = {"gain": bool(tables), "numerics": bool(frame["numerics"].notna().any())}
    return [name for name in FIGURES if drawn.get(name, True)]


def write_run_plots(
    run_dir: str | Path, dpi: int = 110, thresholds: str | Path | None = None
) -> list[Path]:
    """The main figures of one run as PNG files beside its results.csv; returns their paths.

    latency.png, busbw.png, winners.png, status.png always; numerics.png where the run
    measured its points' arithmetic; gain.png when the run has a table
    (`run_thresholds`: the file named, or one fitted from this run beside it), comparing its
    rules and the oracle with the plain default that was measured (`default_baseline`) over
    the same points; the figures name the file.
    """
    run_dir = Path(run_dir)
    frame = read_results(run_dir)
    meta = read_meta(run_dir)
    source, tables = run_thresholds(run_dir, frame, thresholds)
    figures: dict[str, Figure] = {
        "latency": plot_latency(frame),
        "busbw": plot_busbw(frame, meta),
        "winners": plot_winners(frame, tables, source=str(source) if source else None),
        "status": plot_status(frame),
    }
    if tables:
        figures["gain"] = plot_gain(
            gain_table(frame, {str(source): table_chooser(tables)}, default_baseline(frame))
        )
    if frame["numerics"].notna().any():
        figures["numerics"] = plot_numerics(frame)
    paths = []
    for name, fig in figures.items():
        path = run_dir / f"{name}.png"
        try:
            fig.savefig(path, dpi=dpi)
        except OSError as exc:  # a full disk: one line naming the file (the CLI exits 1)
            raise output_error("--plots", path, exc) from None
        paths.append(path)
    return paths
