"""Which backend wins at each size, where the winner changes hands, and the rules of a
thresholds.json beside them.

A thresholds.json is read by the runtime's own schema (`tuner.runtime.schema`: `load`, and
`Table.algorithm_for` for the rule that covers a size), imported only when a figure needs it, so
`bench sweep` never imports the tuner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench.analysis.plots.common import (
    DTYPE_STYLE,
    GROUP,
    Chooser,
    backend_color,
    groups,
    ratio_axis,
    run_title,
    size_axis,
)
from bench.analysis.results import correct_rows

__all__ = ["winners", "crossovers", "tables_by_group", "table_chooser", "plot_winners"]


def winners(frame):
    """Fastest correct backend per (world size, dtype, mode, bytes), with the runner-up and how
    much slower it is (`margin` = runner-up latency / winner latency)."""
    point = GROUP + ["bytes"]
    fastest = (
        correct_rows(frame)
        .groupby(point + ["backend"], as_index=False)["latency_us"]
        .min()
        .sort_values(point + ["latency_us"])
    )
    ranked = fastest.assign(rank=fastest.groupby(point).cumcount())
    best = ranked[ranked["rank"] == 0].drop(columns="rank")
    second = (
        ranked[ranked["rank"] == 1]
        .drop(columns="rank")
        .rename(columns={"backend": "runner_up", "latency_us": "runner_up_us"})
    )
    out = best.merge(second, on=point, how="left")
    out["margin"] = out["runner_up_us"] / out["latency_us"]
    return out[point + ["backend", "latency_us", "runner_up", "margin"]].reset_index(drop=True)


def crossovers(frame):
    """Where the winner changes hands: one row per change, with the sizes on either side."""
    import pandas as pd

    rows = []
    for key, group in groups(winners(frame), GROUP):
        group = group.sort_values("bytes")
        prev = None
        for _, row in group.iterrows():
            if prev is not None and row["backend"] != prev["backend"]:
                rows.append(
                    dict(
                        zip(GROUP, key, strict=True),
                        from_backend=prev["backend"],
                        to_backend=row["backend"],
                        last_bytes=int(prev["bytes"]),
                        first_bytes=int(row["bytes"]),
                    )
                )
            prev = row
    return pd.DataFrame(
        rows, columns=GROUP + ["from_backend", "to_backend", "last_bytes", "first_bytes"]
    )


def tables_by_group(thresholds: Any, hardware_key: str | None = None) -> dict[tuple, Any]:
    """{(world_size, dtype, mode): tuner.runtime.schema.Table} of a thresholds.json (a path, a
    parsed document or a loaded `Thresholds`), keeping one hardware key's tables when given.
    Loading validates: a bad file raises `TableError` naming the field."""
    from tuner.runtime import schema  # optional: torch, which a run's figures need not load

    if isinstance(thresholds, (str, Path)):
        thresholds = schema.load(thresholds)
    elif isinstance(thresholds, Mapping):
        thresholds = schema.from_json(dict(thresholds))
    return {
        (int(t.world_size), str(t.dtype), str(t.mode)): t
        for t in thresholds.tables
        if hardware_key is None or t.hardware_key == hardware_key
    }


def table_chooser(tables: Mapping[tuple, Any]) -> Chooser:
    """A chooser (for `gain_table`) that picks what the tables' rules pick; no opinion where
    no table covers the group."""

    def choose(world_size: int, dtype: str, mode: str, nbytes: int) -> str | None:
        table = tables.get((world_size, dtype, mode))
        return table.algorithm_for(nbytes).algorithm if table is not None else None

    return choose


def _cell_edges(sizes: Sequence[int]) -> list[float]:
    """Edges of one cell per size on a log axis: geometric midpoints between neighbours."""
    if len(sizes) == 1:
        return [sizes[0] / math.sqrt(2), sizes[0] * math.sqrt(2)]
    mids = [math.sqrt(a * b) for a, b in zip(sizes, sizes[1:], strict=False)]
    return [sizes[0] ** 2 / mids[0]] + mids + [sizes[-1] ** 2 / mids[-1]]


def _stripe(ax, y: float, sizes: Sequence[int], names: Sequence[str | None]) -> None:
    """Coloured cells, one per size, each contiguous range labelled with its backend."""
    edges = _cell_edges(sizes)
    runs: list[list] = []  # [name, left edge, right edge, cells]
    for i, name in enumerate(names):
        left, right = edges[i], edges[i + 1]
        if name is not None:
            ax.barh(
                y,
                right - left,
                left=left,
                height=0.8,
                color=backend_color(name),
                edgecolor="white",
                linewidth=0.5,
            )
        if runs and runs[-1][0] == name:
            runs[-1][2] = right
            runs[-1][3] += 1
        else:
            runs.append([name, left, right, 1])
    for name, left, right, cells in runs:
        if name is not None and (cells > 1 or len(runs) == 1):  # one-cell runs: colour only
            ax.text(
                math.sqrt(left * right),
                y,
                name,
                ha="center",
                va="center",
                fontsize=7,
                color="white",
                clip_on=True,
            )


def _rule_stripe(ax, y: float, sizes: Sequence[int], table) -> None:
    """The table's pick per size, and a black tick at each of its range edges."""
    _stripe(ax, y, sizes, [table.algorithm_for(s).algorithm for s in sizes])
    cells = _cell_edges(sizes)
    edges = [
        cells[sum(1 for x in sizes if x <= rule.max_bytes)]
        for rule in table.rules
        if rule.max_bytes is not None
    ]
    ax.vlines(edges, y - 0.45, y + 0.45, color="black", linewidth=1.2)


def _winner_panel(stripe, ratio, key: tuple, panel, ok, tables) -> None:
    """One (world size, mode): per dtype the measured winners' stripe (and the rules' under
    it), and every backend's latency over the winner's below."""
    ws, mode = key
    rows: list[str] = []
    missing: list[str] = []
    for (dtype,), group in groups(panel, ["dtype"]):
        group = group.sort_values("bytes")
        sizes = [int(b) for b in group["bytes"]]
        table = (tables or {}).get((ws, dtype, mode))
        if table is not None:
            _rule_stripe(stripe, -float(len(rows) + 1), sizes, table)
        _stripe(stripe, -float(len(rows)), sizes, list(group["backend"]))
        rows.append(f"{dtype} measured")
        if table is not None:
            rows.append(f"{dtype} thresholds.json")
        elif tables is not None:
            missing.append(dtype)
        part = ok[(ok["world_size"] == ws) & (ok["dtype"] == dtype) & (ok["mode"] == mode)]
        best_us = group.set_index("bytes")["latency_us"]
        for (backend,), line in groups(part, ["backend"]):
            line = line.sort_values("bytes")
            rel = line["latency_us"].to_numpy() / best_us.reindex(line["bytes"]).to_numpy()
            ratio.plot(
                line["bytes"],
                rel,
                DTYPE_STYLE.get(dtype, "-."),
                marker=".",
                color=backend_color(backend),
                label=f"{backend} {dtype}",
            )
    stripe.set_yticks([-float(k) for k in range(len(rows))])
    stripe.set_yticklabels(rows, fontsize=8)
    stripe.set_ylim(-len(rows) + 0.4, 0.6)
    note = f" (no rules for {', '.join(missing)})" if missing else ""
    stripe.set_title(f"world size {ws}, {mode}: winner per size{note}", fontsize=10)
    stripe.tick_params(labelbottom=False)


def plot_winners(
    frame, tables: Mapping[tuple, Any] | None = None, source: str | None = None
) -> Figure:
    """Per (world size, mode): for each dtype a stripe of the measured winner per size and,
    under it, the thresholds.json rules (`tables_by_group`; a colour change is a crossover;
    black lines are the rules' range edges); below, every backend's latency relative to that
    size's winner. `source`: the file the tables come from, named in the title."""
    best = winners(frame)
    ok = correct_rows(frame)
    panels = groups(best, ["world_size", "mode"])
    fig = Figure(figsize=(12, 1.0 + 4.2 * max(1, len(panels))), layout="constrained")
    if not panels:
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no correct measured point: no winner", ha="center")
        ax.set_axis_off()
        return fig
    grid = fig.add_gridspec(2 * len(panels), 1, height_ratios=[1.2, 3] * len(panels))
    for i, (key, panel) in enumerate(panels):
        stripe = fig.add_subplot(grid[2 * i])
        ratio = fig.add_subplot(grid[2 * i + 1], sharex=stripe)
        _winner_panel(stripe, ratio, key, panel, ok, tables)
        ratio.axhline(1.0, color="black", linewidth=0.8)
        ratio_axis(ratio)
        ratio.set_ylabel("latency / winner's")
        ratio.set_xlabel("message size (bytes)")
        ratio.grid(True, which="major", alpha=0.3)
        ratio.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        size_axis(ratio, panel["bytes"])
    rules = f"black ticks: the range edges of {source or 'thresholds.json'}" if tables else ""
    fig.suptitle(
        f"winners and crossovers: {run_title(frame)}\n(a colour change in a stripe is a "
        f"crossover{'; ' + rules if rules else ''})",
        fontsize=10,
    )
    return fig
