"""A point's arithmetic (issue 23): which backends follow the reference arithmetic at which
size, their error against float64, and the price of keeping the reference (an exact table).

The price is read at the oracle: per (hardware, world size, dtype, mode, size), the fastest
backend measured following the reference arithmetic against the fastest of all; its geomean
over sizes is the regret of the best exact table against the best unconstrained one (a table
fitted with `tuner fit --numerics exact` can only add rules-limit regret on top). A size where
no backend follows it has no exact table at all (the figure says so). Runs made before the
numerics were measured have no such figure: their points are "unknown".
"""

from __future__ import annotations

from matplotlib.figure import Figure

from bench.analysis.plots.common import backend_color, figure_legend, run_title, size_axis
from bench.analysis.results import correct_rows
from bench.analysis.stats import geomean

__all__ = ["numerics_table", "exact_price", "exact_price_summary", "plot_numerics"]

_POINT = ["hardware_key", "world_size", "dtype", "mode", "bytes"]
_MARKS = {"reference": ("o", "#2ca02c"), "other": ("X", "#d62728"), "unknown": ("s", "#999999")}


def numerics_table(frame):
    """Per backend and point: its arithmetic ("reference", "other", "unknown"), same bits on
    every rank, the error against float64 in ulps (the median over runs repeating it)."""
    ok = correct_rows(frame).assign(
        arithmetic=lambda f: f["numerics"].astype("string").fillna("unknown")
    )
    keys = ["backend", *_POINT]
    return (
        ok.groupby(keys, sort=True)
        .agg(
            arithmetic=("arithmetic", lambda a: a.iloc[0] if a.nunique() == 1 else "other"),
            same_bits=("same_bits", lambda s: bool(s.fillna(True).all())),
            max_err_ulp=("max_err_ulp", "median"),
        )
        .reset_index()
    )


def exact_price(frame):
    """Per point: the fastest latency, the fastest following the reference (NaN where none
    does) and their ratio (`price`: 1 = exactness is free there); the geomean per table key
    is `exact_price_summary`."""
    ok = correct_rows(frame)
    best = ok.groupby(_POINT)["latency_us"].min().rename("best_us")
    ref = ok[ok["numerics"].astype("string").fillna("") == "reference"]
    exact = ref.groupby(_POINT)["latency_us"].min().rename("exact_us")
    out = best.to_frame().join(exact).reset_index()
    out["price"] = out["exact_us"] / out["best_us"]
    return out


def exact_price_summary(price) -> list[str]:
    """One line per table key: the exact table's regret geomean and the sizes without one."""
    lines = []
    for key, part in price.groupby(["hardware_key", "world_size", "dtype", "mode"], sort=True):
        hw, ws, dtype, mode = key
        missing = part[part["price"].isna()]["bytes"].astype(int).tolist()
        have = part["price"].dropna()
        regret = f"{(geomean(have.tolist()) - 1) * 100:.1f}%" if len(have) else "n/a"
        lines.append(
            f"{hw} ws={ws} {dtype} {mode}: exact regret {regret} geomean over {len(have)} sizes"
            + (f"; no exact backend at {len(missing)} sizes ({missing})" if missing else "")
        )
    return lines


def plot_numerics(frame) -> Figure:
    """Three rows of panels, a column per (world size, dtype): which arithmetic each backend
    follows per size, its error against float64 (ulps), and the price of an exact table."""
    table = numerics_table(frame)
    price = exact_price(frame)
    columns = sorted({(int(w), str(d)) for w, d in table[["world_size", "dtype"]].values})
    backends = sorted(table["backend"].unique())
    fig = Figure(figsize=(4.2 * max(1, len(columns)) + 2.4, 10.5), layout="constrained")
    axes = fig.subplots(3, max(1, len(columns)), squeeze=False)
    for j, (ws, dtype) in enumerate(columns):
        part = table[(table["world_size"] == ws) & (table["dtype"] == dtype)]
        top, mid, low = axes[0][j], axes[1][j], axes[2][j]
        for y, name in enumerate(backends):
            line = part[part["backend"] == name]
            for kind, (marker, color) in _MARKS.items():
                at = line[line["arithmetic"] == kind]
                top.scatter(at["bytes"], [y] * len(at), marker=marker, color=color, label=kind)
            errors = line.dropna(subset=["max_err_ulp"])
            mid.plot(
                errors["bytes"],
                errors["max_err_ulp"].clip(lower=0.25),
                marker="o",
                color=backend_color(name),
                label=name,
            )
        top.set_yticks(range(len(backends)), backends)
        top.set_ylim(-0.6, len(backends) - 0.4)
        top.set_title(f"ws={ws} {dtype}: arithmetic", fontsize=9)
        mid.set_yscale("log")
        mid.axhline(0.5, color="#999999", linewidth=0.8, linestyle=":")
        mid.set_ylabel("max error vs float64 (ulp)")
        mine = price[(price["world_size"] == ws) & (price["dtype"] == dtype)]
        have = mine.dropna(subset=["price"])
        regret = (geomean(have["price"].tolist()) - 1) * 100 if len(have) else float("nan")
        low.plot(have["bytes"], have["price"], marker="o", color="#1f77b4")
        for nbytes in mine[mine["price"].isna()]["bytes"]:
            low.axvline(nbytes, color="#d62728", alpha=0.3, linewidth=6)
        low.axhline(1.0, color="#999999", linewidth=0.8)
        low.set_ylabel("exact / fastest latency")
        low.set_title(f"price of exact: {regret:.1f}% geomean (red: no exact backend)", fontsize=9)
        for ax in (top, mid, low):
            size_axis(ax, part["bytes"])
            ax.grid(alpha=0.3)
    fig.suptitle(f"numerics per point: {run_title(frame)}", fontsize=10)
    figure_legend(fig, [axes[0][0], axes[1][0]])
    return fig
