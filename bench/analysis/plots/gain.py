"""The gain of a choice of backend (a tuned table, a static table, the oracle) over a baseline."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping

from matplotlib.figure import Figure

from bench.analysis.plots.choice import winners
from bench.analysis.plots.common import (
    DTYPE_STYLE,
    GROUP,
    PALETTE,
    Chooser,
    groups,
    ratio_axis,
    size_axis,
)
from bench.analysis.results import correct_rows
from bench.analysis.stats import geomean

__all__ = ["gain_table", "default_baseline", "plot_gain"]


def default_baseline(frame) -> str:
    """The plain default the rows are compared with: the GPU floor (nccl) where it was measured
    (a row with a timing, not a skipped one), else the CPU floor (gloo); both named by the
    backend registry."""
    from bench.backends import floor_name  # optional: torch, which a run's figures need not load

    gpu = floor_name("cuda")
    measured = set(frame.loc[frame["latency_us"].notna(), "backend"])  # skipped rows: not
    return gpu if gpu in measured else floor_name("cpu")


def _note(pick: str | None, us: float, base_name: str, base_us: float) -> str:
    if pick is None:
        return "no rule for this group"
    if us != us:
        return f"picks {pick}, not measured correctly in this run"
    if base_us != base_us:
        return f"baseline {base_name} not measured correctly here"
    return ""


def gain_table(frame, choosers: Mapping[str, Chooser], baseline: str | Chooser):
    """Per point and per choice: baseline latency / latency of the backend the choice picks.

    A chooser maps (world_size, dtype, mode, bytes) to a backend name (None: no opinion). The
    'oracle' (fastest measured backend) is always added. A pick that was not measured correctly
    at that point has no gain and says why in `note`.
    """
    import pandas as pd

    lat = correct_rows(frame).groupby(GROUP + ["bytes", "backend"])["latency_us"].min()
    base_of = (lambda ws, dt, mo, nb: baseline) if isinstance(baseline, str) else baseline
    rows = []
    for _, b in winners(frame).iterrows():
        point = (int(b["world_size"]), str(b["dtype"]), str(b["mode"]), int(b["bytes"]))
        base_name = base_of(*point)
        base_us = lat.get((*point, base_name), float("nan"))
        picks = {"oracle": b["backend"]} | {label: fn(*point) for label, fn in choosers.items()}
        for label, pick in picks.items():
            us = lat.get((*point, pick), float("nan")) if pick else float("nan")
            rows.append(
                dict(
                    zip(GROUP + ["bytes"], point, strict=True),
                    choice=label,
                    backend=pick,
                    latency_us=us,
                    baseline=base_name,
                    baseline_us=base_us,
                    gain=base_us / us if us == us and base_us == base_us else float("nan"),
                    note=_note(pick, us, base_name, base_us),
                )
            )
    return pd.DataFrame(rows)


def _missing_groups(every, kept) -> list[str]:
    """Groups of `every` absent from `kept`, a world size whose groups are all absent named once."""
    have = {k for k, _ in groups(kept, GROUP)}
    out = []
    for (ws,), part in groups(every, ["world_size"]):
        keys = [k for k, _ in groups(part, GROUP)]
        gone = [k for k in keys if k not in have]
        if gone and len(gone) == len(keys):
            out.append(f"ws{ws} (all)")
        else:
            out += [f"ws{ws} {dt} {mo}" for _, dt, mo in gone]
    return out


def _gain_panel(ax, ws: int, mode: str, panel, colors: dict[str, str]) -> None:
    for (label, dtype), line in groups(panel, ["choice", "dtype"]):
        line = line.sort_values("bytes")
        color = colors.setdefault(label, PALETTE[len(colors) - 1])
        ax.plot(
            line["bytes"],
            line["gain"],
            DTYPE_STYLE.get(dtype, "-."),
            color=color,
            marker="" if label == "oracle" else "o",
            markersize=4,
            label=f"{label} {dtype} (geomean x{geomean(line['gain']):.2f})",
        )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ratio_axis(ax)
    size_axis(ax, panel["bytes"])
    base = ", ".join(sorted(set(map(str, panel["baseline"]))))
    ax.set_title(f"world size {ws}, {mode}: speed-up over {base}", fontsize=10)
    ax.set_ylabel(f"{base} latency / chosen latency")
    ax.set_xlabel("message size (bytes)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _same_points(gains):
    """The rows of the points where every choice has a gain (so every line and geometric mean
    covers the same points), and one line per (choice, pick) that left points out."""
    if not len(gains):
        return gains, []
    point = GROUP + ["bytes"]
    whole = gains.groupby(point)["gain"].transform(lambda g: bool(g.notna().all()))
    missing = gains[gains["gain"].isna()]
    lines = []
    for (label, note), part in missing.groupby(["choice", "note"], sort=False):
        lines.append(f"{label} {note} ({len(part)} points)")
    return gains[whole.astype(bool)], lines


def plot_gain(gains) -> Figure:
    """`gain_table` output: per (world size, mode), gain over the baseline vs size for each
    choice (colour) and dtype (line style), geometric means in the legend, every choice over
    the same points: a point where some choice has no gain (its pick or the baseline was not
    measured there) is left out of every line, and the title counts those points and says
    why. Groups with no such point get no panel; the title names them."""
    finite, left_out = _same_points(gains)
    panels = groups(finite, ["world_size", "mode"])
    empty = _missing_groups(gains, finite)
    fig = Figure(figsize=(12, 0.9 + 3.6 * max(1, len(panels))), layout="constrained")
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(
            0.5, 0.5, "no point where both the baseline and a pick were measured", ha="center"
        )
        axes[0].set_axis_off()
    colors = {"oracle": "black"}
    for ax, ((ws, mode), panel) in zip(axes, panels, strict=False):
        _gain_panel(ax, ws, mode, panel, colors)
    title = "gain of each choice over the baseline (>1: faster); oracle = fastest measured"
    if left_out:
        title += "\n" + textwrap.fill(
            "left out of every line: "
            + "; ".join(left_out[:6])
            + ("; ..." if len(left_out) > 6 else ""),
            150,
        )
    if empty:
        title += "\n" + textwrap.fill(
            "no gain computable (baseline or pick not measured): " + ", ".join(empty), 150
        )
    fig.suptitle(title, fontsize=9)
    return fig
