"""`bench report`: nccl-tests-style tables of a run and the best backend per size; with --plots
its figures, with --index the index of a whole results folder (`bench.analysis.index`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from bench.analysis import index
from bench.analysis.results import (
    SchemaError,
    correct_rows,
    count_rows,
    fastest_rows,
    read_meta,
    read_results,
)
from bench.analysis.rounds import aa_spread, read_rounds
from bench.launch.flags import UsageError
from bench.launch.paths import writable_dir
from bench.sizes import format_size

__all__ = [
    "format_run",
    "print_summary",
    "measured_rows",
    "best_per_size",
    "noise_lines",
    "add_arguments",
    "run",
]


def best_per_size(frame):
    """Fastest correct measured backend per (world_size, dtype, mode, bytes)."""
    return fastest_rows(frame, ["world_size", "dtype", "mode", "bytes"])


def format_run(frame) -> str:
    """One block per (world size, dtype, mode): a time column per backend, then the best."""
    lines: list[str] = []
    measured = frame[frame["latency_us"].notna()]
    best = best_per_size(frame)
    for (ws, dtype, mode), group in frame.groupby(["world_size", "dtype", "mode"], sort=True):
        names = [
            b
            for b in dict.fromkeys(group["backend"])
            if b
            in set(
                measured[
                    (measured.world_size == ws)
                    & (measured.dtype == dtype)
                    & (measured["mode"] == mode)
                ]["backend"]
            )
        ]
        if not names:
            continue
        lines.append(f"# world_size {ws}  dtype {dtype}  mode {mode}  redop sum")
        head = f"{'size':>8} {'count':>10} " + " ".join(f"{n[:16]:>16}" for n in names)
        head += f"  {'best':<18} {'busbw':>8} {'#wrong':>6}"
        units = f"{'(B)':>8} {'(elements)':>10} " + " ".join(f"{'(us)':>16}" for _ in names)
        units += f"  {'':<18} {'(GB/s)':>8} {'':>6}"
        lines += [head, units]
        table = group.set_index(["bytes", "backend"])
        for nbytes in sorted(group["bytes"].unique()):
            cells = []
            wrong = 0
            count = int(group[group["bytes"] == nbytes]["count"].iloc[0])
            for name in names:
                if (nbytes, name) not in table.index:
                    cells.append(f"{'':>16}")
                    continue
                row = table.loc[(nbytes, name)]
                if row["latency_us"] != row["latency_us"]:  # NaN: skipped
                    cells.append(f"{'-':>16}")
                    continue
                mark = "" if row["correct"] else "!"
                wrong += 0 if row["correct"] else 1
                cells.append(f"{row['latency_us']:>15.1f}{mark or ' '}")
            pick = best[
                (best.world_size == ws)
                & (best.dtype == dtype)
                & (best["mode"] == mode)
                & (best.bytes == nbytes)
            ]
            best_name = pick["backend"].iloc[0] if len(pick) else "-"
            busbw = f"{pick['busbw_gbps'].iloc[0]:.2f}" if len(pick) else "-"
            lines.append(
                f"{format_size(int(nbytes)):>8} {count:>10} "
                + " ".join(cells)
                + f"  {best_name:<18} {busbw:>8} {wrong:>6}"
            )
        lines.append("")
    skipped = frame[frame["latency_us"].isna()]
    if len(skipped):
        lines.append("# skipped (backend: reason, points)")
        for (name, reason), grp in skipped.groupby(["backend", "skipped_reason"], sort=False):
            lines.append(f"#   {name}: {reason} ({len(grp)} points)")
    return "\n".join(lines)


def wrong_rows(frame):
    return frame[frame["latency_us"].notna() & (frame["correct"] != True)]  # noqa: E712


def measured_rows(run_dir: str | Path) -> int:
    """How many rows of the run hold a timing (not skipped)."""
    return int(read_results(run_dir)["latency_us"].notna().sum())


def print_summary(run_dir: str | Path, stream: TextIO | None = None) -> int:
    """Print the run's tables; shout about any incorrect row. Returns the count of them."""
    stream = stream or sys.stdout
    frame = read_results(run_dir)
    print(format_run(frame), file=stream)
    wrong = wrong_rows(frame)
    if len(wrong):
        print("\n" + "!" * 72, file=stream)
        print(f"!! {len(wrong)} MEASURED POINTS RETURNED A WRONG SUM:", file=stream)
        for _, row in wrong.head(20).iterrows():
            print(
                f"!!   {row['backend']} ws={row['world_size']} {row['dtype']} {row['mode']} "
                f"{int(row['bytes'])}B max_abs_err={row['max_abs_err']}"
                + (" (ranks got different bits)" if row["same_bits"] is False else ""),
                file=stream,
            )
        print("!" * 72, file=stream)
    for line in noise_lines(run_dir, frame):
        print(line, file=stream)
    print(f"# results: {Path(run_dir) / 'results.csv'}", file=stream)
    return len(wrong)


def noise_lines(run_dir: str | Path, frame) -> list[str]:
    """The run's noise said out loud: the sweep's warnings (meta.json), the A/A figure (from
    rounds.csv, else meta.json), and one line where it is larger than the gap between the
    best two backends at some sizes (their order there is one round's noise)."""
    noise = read_meta(run_dir).get("noise") or {}
    lines = [f"# noise: {w}" for w in noise.get("warnings") or []]
    try:
        rounds = read_rounds(run_dir)
    except ValueError as exc:
        raise SchemaError(str(exc)) from None
    aa = aa_spread(rounds) if len(rounds) else noise.get("aa")
    if not aa or aa.get("median_pct") is None:
        lines.append("# A/A noise: not measured (no rounds: a run made before rounds)")
        return lines
    median = aa["median_pct"]
    lines.append(
        f"# A/A noise (one backend, round to round): {median:.1f}% median, "
        f"{aa['p90_pct']:.1f}% p90 over {aa['points']} points, {aa['rounds']} rounds"
    )
    close = []
    keys = ["world_size", "dtype", "mode", "bytes"]
    for key, group in correct_rows(frame).groupby(keys, sort=True):
        if group["backend"].nunique() < 2:
            continue
        best, second = sorted(group["latency_us"])[:2]
        if (second / best - 1.0) * 100 < median:
            close.append(key)
    if close:
        sizes = sorted({int(k[3]) for k in close})
        lines.append(
            f"# ! the A/A noise is larger than the gap between the best two backends at "
            f"{len(close)} of {frame.groupby(keys).ngroups} points "
            f"({format_size(sizes[0])}..{format_size(sizes[-1])}): one round cannot order "
            "them; the paired rounds (tuner fit) decide"
        )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`bench report RUN_DIR [--plots]` and `bench report --index [ROOT] [--write FILE] [--plots]`."""
    parser.add_argument("run_dir", nargs="?", default=None)
    parser.add_argument(
        "--plots",
        action="store_true",
        help="also write PNG figures beside it (with --index: beside every run)",
    )
    parser.add_argument(
        "--thresholds",
        default=None,
        metavar="FILE",
        help="with --plots: the thresholds.json whose rules the figures compare (default: one "
        "fitted from this run, beside it)",
    )
    index.add_arguments(parser)


def _report_run(args: argparse.Namespace) -> int:
    if args.write is not None:
        raise UsageError("--write: goes with --index")
    if args.thresholds is not None and not (args.plots and Path(args.thresholds).is_file()):
        raise UsageError(
            f"--thresholds: expected an existing file, with --plots; got {args.thresholds!r}"
        )
    if args.run_dir is None:
        raise UsageError(
            "report: run_dir: give a run directory, or --index [ROOT] for a results folder"
        )
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"report: {run_dir} is not a directory")
    read_results(run_dir)  # a missing or bad table is named before anything is printed
    if count_rows(run_dir) == 0:
        raise UsageError(
            f"report: {run_dir / 'results.csv'} holds no row yet (the sweep "
            "that made it wrote none)"
        )
    if args.plots:
        writable_dir("--plots", run_dir)  # the figures go beside the table
    wrong = print_summary(run_dir)
    if args.plots:
        from bench.analysis.plots import (  # optional: matplotlib, for --plots only
            run_thresholds,
            write_run_plots,
        )

        table, tables = run_thresholds(run_dir, read_results(run_dir), args.thresholds)
        if tables:
            print(f"# rules compared: {table}")
        elif table:  # named, but for other machines
            print(f"# no gain figure: {table} has no table for this run's machine")
        else:  # a gain figure compares a table named, or fitted from this run, nothing else
            print("# no gain figure: no table fitted from this run beside it (--thresholds FILE)")
        for path in write_run_plots(run_dir, thresholds=args.thresholds):
            print(f"# figure: {path}")
    return 1 if wrong else 0


def run(args: argparse.Namespace) -> int:
    """`bench report`: 1 when the run holds a wrong sum, 0 otherwise; bad input raises the
    CLI's UsageError (exit 2), a bad results table or thresholds.json included."""
    errors: tuple[type[Exception], ...] = (FileNotFoundError, SchemaError)
    if args.plots or args.index is not None:  # rules are read: a bad thresholds.json is named
        from tuner.runtime.schema import TableError  # optional: torch, only where rules are read

        errors += (TableError,)
    try:
        if args.index is None:
            return _report_run(args)
        if args.run_dir is not None:
            raise UsageError("report: give a run directory or --index ROOT, not both")
        if args.thresholds is not None:
            raise UsageError("--thresholds: goes with a run directory, not --index")
        return index.run(args)
    except errors as exc:
        raise UsageError(f"report: {exc}") from None
