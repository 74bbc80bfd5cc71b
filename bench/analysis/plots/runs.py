"""`bench report RUN --plots`: a run's main figures as PNG files beside its results.csv."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench.analysis.plots.choice import plot_winners, table_chooser, tables_by_group
from bench.analysis.plots.gain import gain_table, plot_gain
from bench.analysis.plots.performance import plot_busbw, plot_latency
from bench.analysis.plots.status import plot_status
from bench.analysis.results import read_meta, read_results
from bench.launch.paths import output_error

__all__ = ["FIGURES", "thresholds_near", "figure_names", "write_run_plots"]

# every figure write_run_plots may draw, by file stem ("gain" only beside a thresholds.json)
FIGURES = ("latency", "busbw", "winners", "status", "gain")


def thresholds_near(run_dir: Path) -> Path | None:
    """The thresholds.json in the run directory, else in its parent (the machine's folder)."""
    for candidate in (run_dir / "thresholds.json", run_dir.parent / "thresholds.json"):
        if candidate.is_file():
            return candidate
    return None


def _tables(run_dir: Path, frame) -> dict[tuple, Any] | None:
    """The rules of the thresholds.json near the run for the run's machine (None: no file)."""
    key = (
        str(frame["hardware_key"].dropna().iloc[0]) if frame["hardware_key"].notna().any() else None
    )
    thresholds = thresholds_near(run_dir)
    return tables_by_group(thresholds, key) if thresholds else None


def figure_names(run_dir: str | Path, frame=None) -> list[str]:
    """The figures `write_run_plots` draws for this run (file stems), drawn or not yet."""
    run_dir = Path(run_dir)
    tables = _tables(run_dir, read_results(run_dir) if frame is None else frame)
    return [name for name in FIGURES if name != "gain" or tables]


def write_run_plots(run_dir: str | Path, dpi: int = 110) -> list[Path]:
    """The main figures of one run as PNG files beside its results.csv; returns their paths.

    latency.png, busbw.png, winners.png, status.png always; gain.png when a thresholds.json sits
    in the run directory or its parent (the machine's folder under results/), comparing its rules
    with the plain default backend (the registry's floor: nccl on GPU, gloo on CPU).
    """
    from bench.backends import floor_name

    run_dir = Path(run_dir)
    frame = read_results(run_dir)
    meta = read_meta(run_dir)
    tables = _tables(run_dir, frame)
    figures: dict[str, Figure] = {
        "latency": plot_latency(frame),
        "busbw": plot_busbw(frame, meta),
        "winners": plot_winners(frame, tables),
        "status": plot_status(frame),
    }
    if tables:
        device = (meta.get("arguments") or {}).get("device", "cpu")
        base = floor_name("cuda" if device == "cuda" else "cpu")
        figures["gain"] = plot_gain(
            gain_table(frame, {"thresholds.json": table_chooser(tables)}, base)
        )
    paths = []
    for name, fig in figures.items():
        path = run_dir / f"{name}.png"
        try:
            fig.savefig(path, dpi=dpi)
        except OSError as exc:  # a full disk: one line naming the file (the CLI exits 1)
            raise output_error("--plots", path, exc) from None
        paths.append(path)
    return paths
