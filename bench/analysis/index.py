"""`bench report --index [ROOT] [--write FILE] [--plots]`: the markdown index of a results folder.

With --write, the text between the file's `<!-- index: ...-->` and `<!-- end index -->` markers
is replaced; without it the index is printed. With --plots every run's figures are drawn first
(`bench report RUN --plots` for each run), so one command regenerates everything in results/
that is not committed:

    bench report --index results --plots --write results/README.md

Per run: what was measured (backends, world sizes, dtypes, modes, sizes), its counts of correct,
wrong and skipped rows, and its figures (those `--plots` draws). Per (run, world size, dtype,
mode): the headline ratios, at the smallest size (latency) and the largest size (bus bandwidth)
measured, of the fastest backend against the default one (the registry's floor: nccl where
measured, else gloo), each with the line numbers of the raw rows in results.csv (header = line 1),
so every number can be checked by hand.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench.analysis.results import correct_rows
from bench.launch.flags import UsageError
from bench.launch.paths import writable_dir, writable_file, write_output
from bench.sizes import format_size

__all__ = ["BEGIN", "END", "REGENERATED", "add_arguments", "run", "index_text", "write_into"]

BEGIN, END = "<!-- index:", "<!-- end index -->"
# files under results/ that are made, not committed: never listed as evidence
REGENERATED = (".db", ".db-journal", ".pyc", ".lock")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--index [ROOT]` and `--write FILE` (on `bench report`, beside its `--plots`)."""
    parser.add_argument(
        "--index",
        nargs="?",
        const="results",
        default=None,
        metavar="ROOT",
        help="print the markdown index of every run and thresholds.json under "
        "ROOT (default: results)",
    )
    parser.add_argument(
        "--write",
        default=None,
        metavar="FILE",
        help="with --index: replace the index between FILE's markers instead of printing it",
    )


def _rel(path: Path, base: Path) -> str:
    """`path` as a link from `base` (`../` where it lies elsewhere)."""
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _line(row, rel: str) -> str:
    return f"[L{int(row['line'])}]({rel}/results.csv#L{int(row['line'])})"


def _ratio_cells(group, default: str, rel: str) -> tuple[list[str], list[str]]:
    """The smallest size's latency and the largest size's busbw, fastest vs default, and the
    raw rows they come from."""
    cells, lines = [], []
    for nbytes in (group["bytes"].min(), group["bytes"].max()):
        at = group[group["bytes"] == nbytes]
        best = at.loc[at["latency_us"].idxmin()]
        base = at[at["backend"] == default]
        size = format_size(int(nbytes))
        if base.empty:
            cells.append(
                f"{size}: {best['backend']} {best['latency_us']:.1f} us ({default} not measured)"
            )
            lines.append(_line(best, rel))
            continue
        base = base.iloc[0]
        ratio = base["latency_us"] / best["latency_us"]
        if nbytes == group["bytes"].min():
            cells.append(
                f"{size}: {best['backend']} {best['latency_us']:.1f} us vs "
                f"{base['latency_us']:.1f} us (x{ratio:.1f})"
            )
        else:
            cells.append(
                f"{size}: {best['backend']} {best['busbw_gbps']:.2f} GB/s vs "
                f"{base['busbw_gbps']:.2f} GB/s (x{ratio:.1f})"
            )
        lines += [_line(best, rel), _line(base, rel)]
    return cells, lines


def run_index(run: Path, base: Path) -> list[str]:
    """A run's section: what it measured, its row counts, figures and headline ratios."""
    from bench.analysis import plots  # optional: matplotlib

    frame = plots.load_runs([run])
    frame["line"] = frame.index + 2  # header is line 1
    rel = _rel(run, base)
    status = plots.status_table(frame)
    figures = sorted(plots.figure_names(run, frame))
    out = [
        f"### `{rel}`",
        "",
        f"- machine `{frame['hardware_key'].iloc[0]}`, run `{frame['run_id'].iloc[0]}`; "
        f"raw rows: [results.csv]({rel}/results.csv), [meta.json]({rel}/meta.json)",
        f"- backends {', '.join(sorted(set(frame['backend'])))}; world sizes "
        f"{', '.join(map(str, sorted(set(frame['world_size']))))}; dtypes "
        f"{', '.join(sorted(set(frame['dtype'])))}; modes {', '.join(sorted(set(frame['mode'])))}; "
        f"sizes {format_size(int(frame['bytes'].min()))}..{format_size(int(frame['bytes'].max()))}",
        f"- rows: {int(status['correct'].sum())} correct, {int(status['WRONG'].sum())} WRONG, "
        f"{int(status['skipped'].sum())} skipped",
        "- figures: " + ", ".join(f"[{name}]({rel}/{name}.png)" for name in figures),
        "",
    ]
    ok = correct_rows(frame)
    default = plots.default_baseline(ok)
    out += [
        f"| world size | dtype | mode | smallest size: fastest vs {default} (latency) "
        f"| largest size: fastest vs {default} (busbw) | rows |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (ws, dtype, mode), group in ok.groupby(["world_size", "dtype", "mode"]):
        cells, lines = _ratio_cells(group, default, rel)
        out.append(
            f"| {ws} | {dtype} | {mode} | {cells[0]} | {cells[1]} | "
            f"{', '.join(dict.fromkeys(lines))} |"
        )
    return out + [""]


def thresholds_index(path: Path, base: Path) -> list[str]:
    """A thresholds.json's section: one row per table, its rules and evidence."""
    doc = json.loads(path.read_text())
    rel = _rel(path, base)
    out = [
        f"### [`{rel}`]({rel})",
        "",
        "| machine | world size | dtype | mode | rules | regret vs oracle | gain vs default "
        "(geomean) | fitted from |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in doc.get("tables", []):
        rules = "; ".join(
            f"<= {format_size(r['max_bytes'])}: {r['algorithm']}"
            if r.get("max_bytes") is not None
            else f"rest: {r['algorithm']}"
            for r in t["rules"]
        )
        ev = t.get("evidence", {})
        gain = ev.get("gain_vs_nccl_geomean")
        out.append(
            f"| `{t['hardware_key']}` | {t['world_size']} | {t['dtype']} | {t['mode']} | "
            f"{rules} | {ev.get('regret_vs_oracle', float('nan')):.3f} | "
            f"{'-' if gain is None else f'x{gain:.2f}'} "
            f"({ev.get('baseline', 'nccl')}) | {', '.join(ev.get('run_ids') or [ev.get('run_id', '?')])} |"
        )
    return out + [""]


def _is_evidence(path: Path, runs: set[Path]) -> bool:
    """A committed file beside the runs: not in a run directory, not a table, not made."""
    return (
        path.is_file()
        and not any(parent.resolve() in runs for parent in path.parents)
        and path.name != "thresholds.json"
        and "__pycache__" not in path.parts
        and not path.name.endswith(REGENERATED)
    )


def evidence_index(root: Path, runs: list[Path], base: Path) -> list[str]:
    """Files beside the runs (logs, experiments, studies), one line per folder."""
    runs_set = {r.resolve() for r in runs}
    others = [p for p in sorted(root.glob("*/**/*")) if _is_evidence(p, runs_set)]
    if not others:
        return []
    lines = [
        "## Other committed evidence",
        "",
        "Files beside the runs (logs, studies, kernel figures), described in the write-ups:",
        "",
    ]
    for folder in sorted({p.parent for p in others}):
        names = ", ".join(f"[{p.name}]({_rel(p, base)})" for p in others if p.parent == folder)
        lines.append(f"- `{_rel(folder, base)}/`: {names}")
    return lines + [""]


def index_text(root: Path, base: Path) -> str:
    """The whole index of `root`, its links relative to `base` (the folder of the file that
    will hold it)."""
    from bench.analysis.plots import find_runs  # optional: matplotlib

    lines = ["## Committed runs", ""]
    runs = find_runs(root)
    if not runs:
        lines.append("No run committed yet.")
    for run in runs:
        lines += run_index(run, base)
    tables = sorted(root.glob("**/thresholds.json"))
    if tables:
        lines += ["## thresholds.json", ""]
        for path in tables:
            lines += thresholds_index(path, base)
    lines += evidence_index(root, runs, base)
    return "\n".join(lines)


def _around_markers(readme: Path) -> tuple[str, str]:
    """What stands before and after the file's index; UsageError without the markers."""
    doc = readme.read_text() if readme.is_file() else ""
    start, stop = doc.find(BEGIN), doc.find(END)
    if start < 0 or stop < start:
        raise UsageError(f"--write: {readme}: no '{BEGIN} ...' and '{END}' markers")
    return doc[: doc.index("\n", start) + 1], doc[stop:]


def write_into(readme: Path, text: str) -> None:
    """Replace what stands between the file's index markers with `text`."""
    head, tail = _around_markers(readme)
    write_output("--write", readme, head + text.rstrip() + "\n" + tail)


def run(args: argparse.Namespace) -> int:
    """`bench report --index`: draw every run's figures when --plots, then print or write."""
    from bench.analysis.plots import find_runs, write_run_plots  # optional: matplotlib

    root = Path(args.index)
    write = None
    if args.write:
        _around_markers(Path(args.write))  # checked before any figure is drawn
        write = writable_file("--write", args.write)
    if getattr(args, "plots", False):
        runs = find_runs(root)
        for run_dir in runs:  # every figure's folder checked before the first is drawn
            writable_dir("--plots", run_dir)
        for run_dir in runs:
            for path in write_run_plots(run_dir):
                print(f"# figure: {path}")
    text = index_text(root, write.parent if write else root)
    if write:
        write_into(write, text)
    else:
        print(text)
    return 0
