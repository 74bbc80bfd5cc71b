"""Figures of a run, importable: the notebooks and `bench report DIR --plots` draw the same ones.

Every function takes a results frame (`bench.analysis.results.read_results`, or `load_runs` for several
runs) and returns a `matplotlib.figure.Figure` built without pyplot, so a script, a notebook and
a headless CI machine all behave alike. Inputs the tuner produces (thresholds.json rules, a study's
trials, a Pareto front) come in as plain data: nothing here imports `tuner/`.

Figures: latency vs size with p10-p90 bands, bus bandwidth vs size with the link limit when the
fingerprint names a known GPU, the winner per size next to a thresholds.json's rules, the gain of a
choice of backend over a baseline, an Optuna study's convergence, the memory-vs-regret Pareto
front, and every skipped or incorrect point (nothing hidden).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter, MaxNLocator, NullLocator

from bench.analysis.results import RESULTS_FILE, read_meta, read_results
from bench.sizes import format_size

__all__ = [
    "LINK_LIMITS", "find_runs", "load_runs", "hardware_limit", "plot_latency", "plot_busbw",
    "winners", "crossovers", "rules_by_group", "rule_choice", "plot_winners", "gain_table",
    "geomean", "plot_gain", "plot_convergence", "plot_pareto", "status_table", "plot_status",
    "write_run_plots",
]

GROUP = ["world_size", "dtype", "mode"]
Chooser = Callable[[int, str, str, int], "str | None"]  # (world_size, dtype, mode, bytes)

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

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39"]
_KNOWN = ["gloo", "shm_one_shot", "shm_two_shot", "nccl", "pynccl", "pynccl_symm",
          "symm_mem_one_shot", "symm_mem_two_shot", "symm_mem_multimem", "custom_one_shot",
          "custom_two_shot"]


def backend_color(name: str) -> str:
    """The same colour for a backend in every figure."""
    if name in _KNOWN:
        return _PALETTE[_KNOWN.index(name) % len(_PALETTE)]
    return _PALETTE[sum(map(ord, name)) % len(_PALETTE)]


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


def _measured_ok(frame):
    """Rows with a latency and a correct sum."""
    return frame[frame["latency_us"].notna() & frame["correct"].fillna(False).astype(bool)]


# -- axes helpers -----------------------------------------------------------------------------

def _size_axis(ax, sizes: Iterable[float]) -> None:
    sizes = [s for s in sizes if s and s > 0]
    ax.set_xscale("log", base=2)
    if not sizes:
        return
    low, high = int(math.floor(math.log2(min(sizes)))), int(math.ceil(math.log2(max(sizes))))
    step = max(1, math.ceil((high - low + 1) / 9))
    ax.xaxis.set_major_locator(FixedLocator([2.0 ** e for e in range(low, high + 1, step)]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_size(int(round(x)))))
    ax.set_xlim(2.0 ** low / 1.2, 2.0 ** high * 1.2)


def _groups(frame, keys: Sequence[str]) -> list[tuple[tuple, Any]]:
    if frame.empty:
        return []
    return [(k if isinstance(k, tuple) else (k,), g)
            for k, g in frame.groupby(list(keys), sort=True)]


def _merge_repeats(measured):
    """One line per (backend, dtype) even when several runs measured the same points: the
    median latency and bandwidth over the runs, the band from the lowest p10 to the highest p90,
    the number of runs in `runs` and every row's correctness kept (a wrong row stays wrong)."""
    if measured.empty:
        return measured.assign(runs=[])
    keys = ["backend", "world_size", "dtype", "mode", "bytes"]
    ok = measured["correct"].fillna(False).astype(bool)
    merged = (measured.assign(ok=ok).groupby(keys, as_index=False)
              .agg(latency_us=("latency_us", "median"), p10_us=("p10_us", "min"),
                   p90_us=("p90_us", "max"), busbw_gbps=("busbw_gbps", "median"),
                   correct=("ok", "all"), runs=("run_id", "nunique")))
    return merged


def _line_label(part, backend: str, dtype: str, runs: int) -> str:
    label = backend
    if part["dtype"].nunique() > 1:
        label += f" {dtype}"
    if runs > 1:
        label += f" (median of {runs} runs)"
    return label


_DTYPE_STYLE = {"bfloat16": "-", "float32": "--", "float16": ":"}


def _panel_grid(frame, width: float = 5.2, height: float = 3.8):
    """One panel per (world size, mode): rows are modes, columns world sizes."""
    world_sizes = sorted(frame["world_size"].unique()) or [0]
    modes = sorted(frame["mode"].unique()) or ["-"]
    # room on the right for the figure's legend
    fig = Figure(figsize=(width * len(world_sizes) + 2.8, height * len(modes)),
                 layout="constrained")
    axes = fig.subplots(len(modes), len(world_sizes), squeeze=False)
    return fig, {(ws, mode): axes[i][j] for i, mode in enumerate(modes)
                 for j, ws in enumerate(world_sizes)}


def _title(frame) -> str:
    keys = ", ".join(sorted(frame["hardware_key"].dropna().unique())) or "?"
    return f"{keys}  ({frame['run_id'].nunique()} run{'s' if frame['run_id'].nunique() > 1 else ''})"


def _figure_legend(fig: Figure, axes: Iterable[Any]) -> None:
    """One legend for all panels, outside on the right, each label once."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries.keys()), loc="outside right center",
                   fontsize=8)


# -- latency and bandwidth --------------------------------------------------------------------

def plot_latency(frame) -> Figure:
    """Latency vs message size per backend (log-log), p10-p90 band, one panel per world size
    and mode; incorrect rows are marked with a red cross. Runs repeating the same points are
    drawn as one line, their median (the band spans all of them)."""
    measured = frame[frame["latency_us"].notna()]
    fig, panels = _panel_grid(measured if len(measured) else frame)
    for (ws, mode), ax in panels.items():
        part = _merge_repeats(measured[(measured["world_size"] == ws) &
                                       (measured["mode"] == mode)])
        for (backend, dtype), line in _groups(part, ["backend", "dtype"]):
            line = line.sort_values("bytes")
            color = backend_color(backend)
            ax.plot(line["bytes"], line["latency_us"], _DTYPE_STYLE.get(dtype, "-."), marker=".",
                    color=color, label=_line_label(part, backend, dtype, line["runs"].max()))
            ax.fill_between(line["bytes"], line["p10_us"], line["p90_us"], color=color,
                            alpha=0.15, linewidth=0)
            bad = line[~line["correct"].fillna(False).astype(bool)]
            if len(bad):
                ax.plot(bad["bytes"], bad["latency_us"], "x", color="red", markersize=10,
                        label=f"{backend}: WRONG SUM")
        _size_axis(ax, part["bytes"] if len(part) else frame["bytes"])
        ax.set_yscale("log")
        ax.set_title(f"world size {ws}, {mode}")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("latency (us), slowest rank; band p10-p90")
        ax.grid(True, which="both", alpha=0.3)
        if not len(part):
            ax.text(0.5, 0.5, "no measured point", transform=ax.transAxes, ha="center")
    _figure_legend(fig, panels.values())
    fig.suptitle(f"all-reduce latency: {_title(frame)}")
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
    measured = frame[frame["latency_us"].notna()]
    limit, why = hardware_limit(meta or {})
    fig, panels = _panel_grid(measured if len(measured) else frame)
    for (ws, mode), ax in panels.items():
        part = _merge_repeats(measured[(measured["world_size"] == ws) &
                                       (measured["mode"] == mode)])
        for (backend, dtype), line in _groups(part, ["backend", "dtype"]):
            line = line.sort_values("bytes")
            ax.plot(line["bytes"], line["busbw_gbps"], _DTYPE_STYLE.get(dtype, "-."),
                    marker=".", color=backend_color(backend),
                    label=_line_label(part, backend, dtype, line["runs"].max()))
        if limit is not None:
            ax.axhline(limit, color="black", linestyle="--", linewidth=1,
                       label=f"limit {limit:g} GB/s")
        _size_axis(ax, part["bytes"] if len(part) else frame["bytes"])
        ax.set_title(f"world size {ws}, {mode}")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("bus bandwidth (GB/s) = algbw x 2(n-1)/n")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    _figure_legend(fig, panels.values())
    fig.suptitle(f"all-reduce bus bandwidth: {_title(frame)}\n"
                 + (f"dashed line: {why}" if limit is not None else why), fontsize=10)
    return fig


# -- winners, crossovers and rules ------------------------------------------------------------

def winners(frame):
    """Fastest correct backend per (world size, dtype, mode, bytes), with the runner-up and how
    much slower it is (`margin` = runner-up latency / winner latency)."""
    point = GROUP + ["bytes"]
    fastest = (_measured_ok(frame).groupby(point + ["backend"], as_index=False)["latency_us"]
               .min().sort_values(point + ["latency_us"]))
    ranked = fastest.assign(rank=fastest.groupby(point).cumcount())
    best = ranked[ranked["rank"] == 0].drop(columns="rank")
    second = ranked[ranked["rank"] == 1].drop(columns="rank").rename(
        columns={"backend": "runner_up", "latency_us": "runner_up_us"})
    out = best.merge(second, on=point, how="left")
    out["margin"] = out["runner_up_us"] / out["latency_us"]
    return out[point + ["backend", "latency_us", "runner_up", "margin"]].reset_index(drop=True)


def crossovers(frame):
    """Where the winner changes hands: one row per change, with the sizes on either side."""
    import pandas as pd

    rows = []
    for key, group in _groups(winners(frame), GROUP):
        group = group.sort_values("bytes")
        prev = None
        for _, row in group.iterrows():
            if prev is not None and row["backend"] != prev["backend"]:
                rows.append(dict(zip(GROUP, key, strict=True), from_backend=prev["backend"],
                                 to_backend=row["backend"], last_bytes=int(prev["bytes"]),
                                 first_bytes=int(row["bytes"])))
            prev = row
    return pd.DataFrame(rows, columns=GROUP + ["from_backend", "to_backend", "last_bytes",
                                               "first_bytes"])


def rules_by_group(thresholds: Mapping[str, Any] | str | Path,
                   hardware_key: str | None = None) -> dict[tuple, list[dict]]:
    """{(world_size, dtype, mode): rules} from a thresholds.json (path or parsed), keeping the
    tables of one hardware key when given. Plain reading; `tuner.runtime.schema` validates."""
    doc = json.loads(Path(thresholds).read_text()) if isinstance(thresholds, (str, Path)) \
        else thresholds
    out: dict[tuple, list[dict]] = {}
    for table in doc.get("tables", []):
        if hardware_key is not None and table.get("hardware_key") != hardware_key:
            continue
        out[(int(table["world_size"]), str(table["dtype"]), str(table["mode"]))] = list(
            table["rules"])
    return out


def rule_choice(rules: Sequence[Mapping[str, Any]], nbytes: int) -> str | None:
    """The algorithm ordered range rules give a message of nbytes (first range that holds it)."""
    for rule in rules:
        if rule.get("max_bytes") is None or nbytes <= int(rule["max_bytes"]):
            return str(rule["algorithm"])
    return None


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
            ax.barh(y, right - left, left=left, height=0.8, color=backend_color(name),
                    edgecolor="white", linewidth=0.5)
        if runs and runs[-1][0] == name:
            runs[-1][2] = right
            runs[-1][3] += 1
        else:
            runs.append([name, left, right, 1])
    for name, left, right, cells in runs:
        if name is not None and (cells > 1 or len(runs) == 1):  # one-cell runs: colour only
            ax.text(math.sqrt(left * right), y, name, ha="center", va="center", fontsize=7,
                    color="white", clip_on=True)


def plot_winners(frame, rules: Mapping[tuple, Sequence[Mapping[str, Any]]] | None = None
                 ) -> Figure:
    """Per (world size, mode): for each dtype a stripe of the measured winner per size and,
    under it, the thresholds.json rules (a colour change is a crossover; black lines are the
    rules' range edges); below, every backend's latency relative to that size's winner."""
    best = winners(frame)
    ok = _measured_ok(frame)
    panels = _groups(best, ["world_size", "mode"])
    fig = Figure(figsize=(12, 1.0 + 4.2 * max(1, len(panels))), layout="constrained")
    if not panels:
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no correct measured point: no winner", ha="center")
        ax.set_axis_off()
        return fig
    grid = fig.add_gridspec(2 * len(panels), 1, height_ratios=[1.2, 3] * len(panels))
    for i, ((ws, mode), panel) in enumerate(panels):
        stripe = fig.add_subplot(grid[2 * i])
        ratio = fig.add_subplot(grid[2 * i + 1], sharex=stripe)
        rows: list[str] = []
        missing: list[str] = []
        for (dtype,), group in _groups(panel, ["dtype"]):
            group = group.sort_values("bytes")
            sizes = [int(b) for b in group["bytes"]]
            table = (rules or {}).get((ws, dtype, mode))
            if table:
                y = -float(len(rows) + 1)
                _stripe(stripe, y, sizes, [rule_choice(table, s) for s in sizes])
                cells = _cell_edges(sizes)
                edges = [cells[sum(1 for x in sizes if x <= int(r["max_bytes"]))]
                         for r in table if r.get("max_bytes") is not None]
                stripe.vlines(edges, y - 0.45, y + 0.45, color="black", linewidth=1.2)
            _stripe(stripe, -float(len(rows)), sizes, list(group["backend"]))
            rows.append(f"{dtype} measured")
            if table:
                rows.append(f"{dtype} thresholds.json")
            elif rules is not None:
                missing.append(dtype)
            part = ok[(ok["world_size"] == ws) & (ok["dtype"] == dtype) & (ok["mode"] == mode)]
            best_us = group.set_index("bytes")["latency_us"]
            for (backend,), line in _groups(part, ["backend"]):
                line = line.sort_values("bytes")
                rel = line["latency_us"].to_numpy() / best_us.reindex(line["bytes"]).to_numpy()
                ratio.plot(line["bytes"], rel, _DTYPE_STYLE.get(dtype, "-."), marker=".",
                           color=backend_color(backend), label=f"{backend} {dtype}")
        stripe.set_yticks([-float(k) for k in range(len(rows))])
        stripe.set_yticklabels(rows, fontsize=8)
        stripe.set_ylim(-len(rows) + 0.4, 0.6)
        note = f" (no rules for {', '.join(missing)})" if missing else ""
        stripe.set_title(f"world size {ws}, {mode}: winner per size{note}", fontsize=10)
        stripe.tick_params(labelbottom=False)
        ratio.axhline(1.0, color="black", linewidth=0.8)
        _ratio_axis(ratio)
        ratio.set_ylabel("latency / winner's")
        ratio.set_xlabel("message size (bytes)")
        ratio.grid(True, which="major", alpha=0.3)
        ratio.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        _size_axis(ratio, panel["bytes"])
    fig.suptitle(f"winners and crossovers: {_title(frame)}\n(a colour change in a stripe is a "
                 "crossover; black ticks: the range edges of thresholds.json)", fontsize=10)
    return fig


# -- gain over a baseline ---------------------------------------------------------------------

def gain_table(frame, choosers: Mapping[str, Chooser], baseline: str | Chooser):
    """Per point and per choice: baseline latency / latency of the backend the choice picks.

    A chooser maps (world_size, dtype, mode, bytes) to a backend name (None: no opinion). The
    'oracle' (fastest measured backend) is always added. A pick that was not measured correctly
    at that point has no gain and says why in `note`.
    """
    import pandas as pd

    ok = _measured_ok(frame)
    lat = ok.groupby(GROUP + ["bytes", "backend"])["latency_us"].min()
    base_of = (lambda ws, dt, mo, nb: baseline) if isinstance(baseline, str) else baseline
    rows = []
    for _, b in winners(frame).iterrows():
        point = (int(b["world_size"]), str(b["dtype"]), str(b["mode"]), int(b["bytes"]))
        base_name = base_of(*point)
        base_us = lat.get((*point[:3], point[3], base_name), float("nan"))
        picks = {"oracle": b["backend"]} | {label: fn(*point) for label, fn in choosers.items()}
        for label, pick in picks.items():
            us = lat.get((*point[:3], point[3], pick), float("nan")) if pick else float("nan")
            note = ""
            if pick is None:
                note = "no pick"
            elif us != us:
                note = f"{pick} not measured correctly here"
            elif base_us != base_us:
                note = f"baseline {base_name} not measured correctly here"
            rows.append(dict(zip(GROUP + ["bytes"], point, strict=True), choice=label, backend=pick,
                             latency_us=us, baseline=base_name, baseline_us=base_us,
                             gain=base_us / us if us == us and base_us == base_us else
                             float("nan"), note=note))
    return pd.DataFrame(rows)


def geomean(values) -> float:
    values = [v for v in values if v == v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _missing_groups(every, kept) -> list[str]:
    """Groups of `every` absent from `kept`, a world size whose groups are all absent named once."""
    have = {k for k, _ in _groups(kept, GROUP)}
    out = []
    for (ws,), part in _groups(every, ["world_size"]):
        keys = [k for k, _ in _groups(part, GROUP)]
        gone = [k for k in keys if k not in have]
        if gone and len(gone) == len(keys):
            out.append(f"ws{ws} (all)")
        else:
            out += [f"ws{ws} {dt} {mo}" for _, dt, mo in gone]
    return out


def _ratio_axis(ax) -> None:
    """Log y axis for ratios, labelled 0.5, 1, 2 rather than in powers of ten."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))  # thinned on wide ranges


def plot_gain(gains) -> Figure:
    """`gain_table` output: per (world size, mode), gain over the baseline vs size for each
    choice (colour) and dtype (line style), geometric means in the legend. Groups where no
    gain could be computed (the baseline or the picks were not measured there) get no panel;
    the title names them."""
    finite = gains[gains["gain"].notna()] if len(gains) else gains
    panels = _groups(finite, ["world_size", "mode"])
    empty = _missing_groups(gains, finite)
    fig = Figure(figsize=(12, 0.9 + 3.6 * max(1, len(panels))), layout="constrained")
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "no point where both the baseline and a pick were measured",
                     ha="center")
        axes[0].set_axis_off()
    colors = {"oracle": "black"}
    for ax, ((ws, mode), panel) in zip(axes, panels, strict=False):
        for (label, dtype), line in _groups(panel, ["choice", "dtype"]):
            line = line.sort_values("bytes")
            color = colors.setdefault(label, _PALETTE[len(colors) - 1])
            ax.plot(line["bytes"], line["gain"], _DTYPE_STYLE.get(dtype, "-."), color=color,
                    marker="" if label == "oracle" else "o", markersize=4,
                    label=f"{label} {dtype} (geomean x{geomean(line['gain']):.2f})")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        _ratio_axis(ax)
        _size_axis(ax, panel["bytes"])
        base = ", ".join(sorted(set(map(str, panel["baseline"]))))
        ax.set_title(f"world size {ws}, {mode}: speed-up over {base}", fontsize=10)
        ax.set_ylabel(f"{base} latency / chosen latency")
        ax.set_xlabel("message size (bytes)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    title = "gain of each choice over the baseline (>1: faster); oracle = fastest measured"
    if empty:
        title += "\n" + textwrap.fill("no gain computable (baseline or pick not measured): "
                                       + ", ".join(empty), 150)
    fig.suptitle(title, fontsize=9)
    return fig


# -- the Optuna study -------------------------------------------------------------------------

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
    for i, ((name,), part) in enumerate(_groups(done, ["study"])):
        part = part.sort_values("number")
        values = part["value"] / part["value"].min() if relative else part["value"]
        steps = pd.Series(values.cummin().to_numpy(), index=range(len(part)))
        best_so_far.append(steps)
        color = "#1f77b4" if many else _PALETTE[i % len(_PALETTE)]
        ax.plot(range(len(part)), values, ".", color=color, alpha=0.25 if many else 0.4)
        ax.step(range(len(part)), steps, where="post", color=color,
                alpha=0.3 if many else 1.0, linewidth=0.8 if many else 1.5,
                label=None if many else f"{name}: best {part['value'].min():.4g} "
                                        f"after {len(part)}")
    if many:
        median = pd.concat(best_so_far, axis=1).ffill().median(axis=1)
        ax.step(median.index, median, where="post", color="black", linewidth=2,
                label=f"median of {len(best_so_far)} studies' best so far")
    if len(done) == 0:
        ax.text(0.5, 0.5, "no completed trial", transform=ax.transAxes, ha="center")
    else:
        ax.legend(fontsize=8, loc="upper right")
    if relative:
        _ratio_axis(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("completed trial (in order)")
    ax.set_ylabel("objective / study's best" if relative else "objective (lower is better)")
    ax.set_title("Optuna study: each trial (dots) and the best so far (line)")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_pareto(points, memory: str = "memory_bytes", regret: str = "regret",
                label: str = "label") -> Figure:
    """Candidate tables as (buffer memory, regret) points, one series per `label` when the
    frame has that column; each series' non-dominated points are joined (its Pareto front)."""
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    if len(points) == 0:
        ax.text(0.5, 0.5, "no candidate table", transform=ax.transAxes, ha="center")
        ax.set_axis_off()
        return fig
    series = _groups(points, [label]) if label in points.columns else [(("tables",), points)]
    for i, ((name,), pts) in enumerate(series):
        color = _PALETTE[i % len(_PALETTE)]
        pts = pts.sort_values([memory, regret])
        ax.plot(pts[memory], pts[regret], "o", color=color, alpha=0.35)
        front, best = [], float("inf")
        for _, row in pts.iterrows():
            if row[regret] < best:
                front.append(row)
                best = row[regret]
        ax.step([r[memory] for r in front], [r[regret] for r in front], where="post",
                color=color, marker="o", label=str(name))
    ax.set_xscale("symlog", base=2, linthresh=1024, linscale=0.5)
    top = max(2.0, float(points[memory].max()))
    high = int(math.ceil(math.log2(top)))
    step = max(1, math.ceil((high - 10 + 1) / 8))
    ax.xaxis.set_major_locator(FixedLocator([0.0] + [2.0 ** e for e in range(10, high + 1, step)]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda x, _: format_size(int(round(x))) if x >= 1 else "0"))
    ax.set_yscale("symlog", linthresh=0.05)
    ax.set_xlabel("buffer memory of the table's backends (bytes, 0 = bufferless only)")
    ax.set_ylabel("regret vs per-size oracle (0.1 = 10% slower)")
    ax.set_title("memory vs regret: each step is the best table for that much memory")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# -- nothing hidden ---------------------------------------------------------------------------

def _status(frame):
    import numpy as np

    correct = frame["correct"].fillna(False).astype(bool)
    return np.where(frame["latency_us"].isna(), "skipped",
                    np.where(correct, "correct", "WRONG"))


def status_table(frame):
    """Every (backend, world size, dtype, mode) with its count of correct, wrong and skipped
    points and the skip reasons, so nothing is hidden."""
    frame = frame.assign(status=_status(frame),
                         skipped_reason=frame["skipped_reason"].fillna(""))
    keys = ["backend"] + GROUP
    out = frame.pivot_table(index=keys, columns="status", values="bytes", aggfunc="count",
                            fill_value=0)
    for col in ("correct", "WRONG", "skipped"):
        if col not in out.columns:
            out[col] = 0
    reasons = frame[frame["status"] == "skipped"].groupby(keys)["skipped_reason"].agg(
        lambda r: "; ".join(dict.fromkeys(r)))
    out = out[["correct", "WRONG", "skipped"]].join(reasons.rename("reasons"))
    out["reasons"] = out["reasons"].fillna("")
    return out.reset_index()


def plot_status(frame) -> Figure:
    """A map of every point: measured and correct (dot), WRONG sum (red cross), skipped
    (grey square, numbered reason listed underneath)."""
    frame = frame.assign(status=_status(frame))
    rows = _groups(frame, ["backend"] + GROUP)
    reasons = list(dict.fromkeys(frame.loc[frame["status"] == "skipped", "skipped_reason"]
                                 .fillna("(no reason)")))
    wrapped = [textwrap.fill(f"[{i + 1}] {r}", 150) for i, r in enumerate(reasons)]
    text_lines = sum(w.count("\n") + 1 for w in wrapped)
    fig = Figure(figsize=(11, 1.6 + 0.32 * max(1, len(rows)) + 0.18 * text_lines),
                 layout="constrained")
    ax = fig.subplots()
    marks = {"correct": ("o", "#2ca02c"), "WRONG": ("X", "red"), "skipped": ("s", "#999999")}
    for y, (_, part) in enumerate(rows):
        for status, (marker, color) in marks.items():
            sel = part[part["status"] == status]
            if len(sel):
                ax.scatter(sel["bytes"], [y] * len(sel), marker=marker, color=color, s=30,
                           label=status)
        for _, row in part[part["status"] == "skipped"].drop_duplicates("skipped_reason").iterrows():
            reason = row["skipped_reason"] if row["skipped_reason"] == row["skipped_reason"] \
                else "(no reason)"
            ax.annotate(f"[{reasons.index(reason) + 1}]", (row["bytes"], y),
                        textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{b} ws{ws} {dt} {mo}" for (b, ws, dt, mo), _ in rows], fontsize=8)
    ax.set_ylim(max(0, len(rows) - 1) + 0.7, -0.7)  # first row on top
    _size_axis(ax, frame["bytes"])
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))
    ax.set_xlabel("message size (bytes)")
    counts = frame["status"].value_counts()
    ax.set_title(f"every point: {counts.get('correct', 0)} correct, {counts.get('WRONG', 0)} "
                 f"WRONG, {counts.get('skipped', 0)} skipped  ({_title(frame)})")
    ax.grid(True, axis="x", alpha=0.3)
    if wrapped:
        fig.text(0.01, 0.0, "skip reasons:\n" + "\n".join(wrapped), fontsize=7, va="bottom",
                 family="monospace")
        fig.get_layout_engine().set(rect=(0, 0.18 * text_lines / fig.get_figheight() + 0.02,
                                          1, 1 - 0.18 * text_lines / fig.get_figheight() - 0.02))
    return fig


# -- bench report --plots ---------------------------------------------------------------------

def _thresholds_near(run_dir: Path) -> Path | None:
    for candidate in (run_dir / "thresholds.json", run_dir.parent / "thresholds.json"):
        if candidate.is_file():
            return candidate
    return None


def write_run_plots(run_dir: str | Path, dpi: int = 110) -> list[Path]:
    """The main figures of one run as PNG files beside its results.csv; returns their paths.

    latency.png, busbw.png, winners.png, status.png always; gain.png when a thresholds.json sits
    in the run directory or its parent (the machine's folder under results/), comparing its rules
    with the plain default backend (nccl on GPU, gloo on CPU).
    """
    run_dir = Path(run_dir)
    frame = read_results(run_dir)
    meta = read_meta(run_dir)
    key = str(frame["hardware_key"].dropna().iloc[0]) if frame["hardware_key"].notna().any() \
        else None
    thresholds = _thresholds_near(run_dir)
    rules = rules_by_group(thresholds, key) if thresholds else None
    figures: dict[str, Figure] = {
        "latency": plot_latency(frame),
        "busbw": plot_busbw(frame, meta),
        "winners": plot_winners(frame, rules),
        "status": plot_status(frame),
    }
    if rules:
        device = (meta.get("arguments") or {}).get("device", "cpu")
        base = "nccl" if device == "cuda" else "gloo"

        def tuned(ws: int, dtype: str, mode: str, nbytes: int) -> str | None:
            table = rules.get((ws, dtype, mode))
            return rule_choice(table, nbytes) if table else None

        figures["gain"] = plot_gain(gain_table(frame, {"thresholds.json": tuned}, base))
    paths = []
    for name, fig in figures.items():
        path = run_dir / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths
