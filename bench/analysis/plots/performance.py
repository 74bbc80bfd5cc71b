"""Latency and bus bandwidth against message size, with the hardware's link limit when known."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from matplotlib.figure import Figure

from bench.analysis.plots.common import (
    DTYPE_STYLE,
    backend_color,
    figure_legend,
    groups,
    line_label,
    merge_repeats,
    panel_grid,
    run_title,
    size_axis,
)

__all__ = ["LINK_LIMITS", "hardware_limit", "plot_latency", "plot_busbw"]

# Per-direction bandwidth of one GPU's links, the figure nccl-tests' busbw is compared with.
# (substring of the NVML name, link type in the hardware key) -> (GB/s, what it is)
LINK_LIMITS: list[tuple[str, str, float, str]] = [
    ("B200", "nvlink", 900.0, "NVLink 5, 18 links x 50 GB/s per direction"),
    ("H200", "nvlink", 450.0, "NVLink 4, 18 links x 25 GB/s per direction"),
    ("H100", "nvlink", 450.0, "NVLink 4, 18 links x 25 GB/s per direction"),
    ("A100", "nvlink", 300.0, "NVLink 3, 12 links x 25 GB/s per direction"),
    ("H100", "pcie", 64.0, "PCIe 5.0 x16, ~64 GB/s per direction"),
    ("H200", "pcie", 64.0, "PCIe 5.0 x16, ~64 GB/s per direction"),
    ("L40S", "pcie", 32.0, "PCIe 4.0 x16, ~32 GB/s per direction"),
    ("A100", "pcie", 32.0, "PCIe 4.0 x16, ~32 GB/s per direction"),
]


def _measured_panels(frame) -> tuple[Figure, list[tuple[Any, Any]]]:
    """A panel grid of the measured rows: the figure and, per panel (world size, mode), its
    axes, titled, and its rows merged over repeated runs."""
    measured = frame[frame["latency_us"].notna()]
    fig, panels = panel_grid(measured if len(measured) else frame)
    out = []
    for (ws, mode), ax in panels.items():
        part = merge_repeats(measured[(measured["world_size"] == ws) & (measured["mode"] == mode)])
        ax.set_title(f"world size {ws}, {mode}")
        out.append((ax, part))
    return fig, out


def _lines(part) -> Iterator[tuple[str, Any, str, str]]:
    """Per (backend, dtype) of a panel: backend, rows by size, line style, legend label."""
    for (backend, dtype), line in groups(part, ["backend", "dtype"]):
        yield (
            backend,
            line.sort_values("bytes"),
            DTYPE_STYLE.get(dtype, "-."),
            line_label(part, backend, dtype, line["runs"].max()),
        )


def _size_and_labels(ax, part, frame, ylabel: str) -> None:
    size_axis(ax, part["bytes"] if len(part) else frame["bytes"])
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel(ylabel)


def plot_latency(frame) -> Figure:
    """Latency vs message size per backend (log-log), p10-p90 band, one panel per world size
    and mode; incorrect rows are marked with a red cross. Runs repeating the same points are
    drawn as one line, their median (the band spans all of them)."""
    fig, parts = _measured_panels(frame)
    for ax, part in parts:
        for backend, line, style, label in _lines(part):
            color = backend_color(backend)
            ax.plot(line["bytes"], line["latency_us"], style, marker=".", color=color, label=label)
            ax.fill_between(
                line["bytes"], line["p10_us"], line["p90_us"], color=color, alpha=0.15, linewidth=0
            )
            bad = line[~line["correct"].fillna(False).astype(bool)]
            if len(bad):
                ax.plot(
                    bad["bytes"],
                    bad["latency_us"],
                    "x",
                    color="red",
                    markersize=10,
                    label=f"{backend}: WRONG SUM",
                )
        _size_and_labels(ax, part, frame, "latency (us), slowest rank; band p10-p90")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if not len(part):
            ax.text(0.5, 0.5, "no measured point", transform=ax.transAxes, ha="center")
    figure_legend(fig, [ax for ax, _ in parts])
    fig.suptitle(f"all-reduce latency: {run_title(frame)}")
    return fig


def hardware_limit(meta: Mapping[str, Any]) -> tuple[float | None, str]:
    """(per-direction link GB/s, what it is) when the fingerprint names a known GPU and link;
    (None, why not) otherwise, e.g. on CPU where no limit is known."""
    fp = meta.get("fingerprint", meta)
    key = str(fp.get("hardware_key", ""))
    gpus = (fp.get("gpu") or {}).get("gpus") or []
    if not gpus:
        return None, "CPU run: no memory-bandwidth limit is fingerprinted, so none is drawn"
    name = str(gpus[0].get("name", ""))
    link = key.rsplit("-", 1)[-1] if "-" in key else ""
    for needle, link_type, gbps, what in LINK_LIMITS:
        if needle.lower() in name.lower() and link == link_type:
            return gbps, f"{name}: {what}"
    if link in ("single", "nop2p"):
        return None, f"{name}, link '{link}': ranks do not cross a GPU link, no limit drawn"
    return None, f"{name}, link '{link}': not in bench.analysis.plots.LINK_LIMITS, no limit drawn"


def plot_busbw(frame, meta: Mapping[str, Any] | None = None) -> Figure:
    """Bus bandwidth (nccl-tests' definition) vs size, with the hardware limit when known."""
    limit, why = hardware_limit(meta or {})
    fig, parts = _measured_panels(frame)
    for ax, part in parts:
        for backend, line, style, label in _lines(part):
            ax.plot(
                line["bytes"],
                line["busbw_gbps"],
                style,
                marker=".",
                color=backend_color(backend),
                label=label,
            )
        if limit is not None:
            ax.axhline(
                limit, color="black", linestyle="--", linewidth=1, label=f"limit {limit:g} GB/s"
            )
        _size_and_labels(ax, part, frame, "bus bandwidth (GB/s) = algbw x 2(n-1)/n")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    figure_legend(fig, [ax for ax, _ in parts])
    fig.suptitle(
        f"all-reduce bus bandwidth: {run_title(frame)}\n"
        + (f"dashed line: {why}" if limit is not None else why),
        fontsize=10,
    )
    return fig
