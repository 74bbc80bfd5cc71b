"""Nothing hidden: every point of a run, correct, WRONG or skipped with its reason."""

from __future__ import annotations

import textwrap

from matplotlib.figure import Figure

from bench.analysis.plots.common import GROUP, groups, run_title, size_axis

__all__ = ["status_table", "plot_status"]


def _status(frame):
    import numpy as np

    correct = frame["correct"].fillna(False).astype(bool)
    return np.where(frame["latency_us"].isna(), "skipped", np.where(correct, "correct", "WRONG"))


def status_table(frame):
    """Every (backend, world size, dtype, mode) with its count of correct, wrong and skipped
    points and the skip reasons, so nothing is hidden."""
    frame = frame.assign(status=_status(frame), skipped_reason=frame["skipped_reason"].fillna(""))
    keys = ["backend"] + GROUP
    out = frame.pivot_table(
        index=keys, columns="status", values="bytes", aggfunc="count", fill_value=0
    )
    for col in ("correct", "WRONG", "skipped"):
        if col not in out.columns:
            out[col] = 0
    reasons = (
        frame[frame["status"] == "skipped"]
        .groupby(keys)["skipped_reason"]
        .agg(lambda r: "; ".join(dict.fromkeys(r)))
    )
    out = out[["correct", "WRONG", "skipped"]].join(reasons.rename("reasons"))
    out["reasons"] = out["reasons"].fillna("")
    return out.reset_index()


def plot_status(frame) -> Figure:
    """A map of every point: measured and correct (dot), WRONG sum (red cross), skipped
    (grey square, numbered reason listed underneath)."""
    frame = frame.assign(status=_status(frame))
    rows = groups(frame, ["backend"] + GROUP)
    reasons = list(
        dict.fromkeys(
            frame.loc[frame["status"] == "skipped", "skipped_reason"].fillna("(no reason)")
        )
    )
    wrapped = [textwrap.fill(f"[{i + 1}] {r}", 150) for i, r in enumerate(reasons)]
    text_lines = sum(w.count("\n") + 1 for w in wrapped)
    fig = Figure(
        figsize=(11, 1.6 + 0.32 * max(1, len(rows)) + 0.18 * text_lines), layout="constrained"
    )
    ax = fig.subplots()
    marks = {"correct": ("o", "#2ca02c"), "WRONG": ("X", "red"), "skipped": ("s", "#999999")}
    for y, (_, part) in enumerate(rows):
        for status, (marker, color) in marks.items():
            sel = part[part["status"] == status]
            if len(sel):
                ax.scatter(
                    sel["bytes"], [y] * len(sel), marker=marker, color=color, s=30, label=status
                )
        for _, row in (
            part[part["status"] == "skipped"].drop_duplicates("skipped_reason").iterrows()
        ):
            reason = (
                row["skipped_reason"]
                if row["skipped_reason"] == row["skipped_reason"]
                else "(no reason)"
            )
            ax.annotate(
                f"[{reasons.index(reason) + 1}]",
                (row["bytes"], y),
                textcoords="offset points",
                xytext=(5, 3),
                fontsize=7,
            )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{b} ws{ws} {dt} {mo}" for (b, ws, dt, mo), _ in rows], fontsize=8)
    ax.set_ylim(max(0, len(rows) - 1) + 0.7, -0.7)  # first row on top
    size_axis(ax, frame["bytes"])
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        ax.legend(
            unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0)
        )
    ax.set_xlabel("message size (bytes)")
    counts = frame["status"].value_counts()
    ax.set_title(
        f"every point: {counts.get('correct', 0)} correct, {counts.get('WRONG', 0)} "
        f"WRONG, {counts.get('skipped', 0)} skipped  ({run_title(frame)})"
    )
    ax.grid(True, axis="x", alpha=0.3)
    if wrapped:
        fig.text(
            0.01,
            0.0,
            "skip reasons:\n" + "\n".join(wrapped),
            fontsize=7,
            va="bottom",
            family="monospace",
        )
        fig.get_layout_engine().set(
            rect=(
                0,
                0.18 * text_lines / fig.get_figheight() + 0.02,
                1,
                1 - 0.18 * text_lines / fig.get_figheight() - 0.02,
            )
        )
    return fig
