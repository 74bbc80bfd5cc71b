"""Print the markdown index of the committed runs for results/README.md.

    python scripts/results_index.py [results] [--write results/README.md]

With --write, the text between the README's `<!-- index: ...-->` and `<!-- end index -->`
markers is replaced; without it the index is printed.

Per run: what was measured (backends, world sizes, dtypes, modes, sizes), its counts of correct,
wrong and skipped rows, and its figures. Per (run, world size, dtype, mode): the headline ratios,
at the smallest size (latency) and the largest size (bus bandwidth) measured, of the fastest
backend against the default one (nccl on GPU, gloo on CPU), each with the line numbers of the raw
rows in results.csv (header = line 1), so every number can be checked by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.analysis import plots
from bench.sizes import format_size


def _rel(path: Path, base: Path) -> str:
    return path.resolve().relative_to(base.resolve()).as_posix()


def _line(row, rel: str) -> str:
    return f"[L{int(row['line'])}]({rel}/results.csv#L{int(row['line'])})"


def run_index(run: Path, base: Path) -> list[str]:
    frame = plots.load_runs([run])
    frame["line"] = frame.index + 2  # header is line 1
    rel = _rel(run, base)
    status = plots.status_table(frame)
    figures = sorted(run.glob("*.png"))
    out = [f"### `{rel}`", "",
           f"- machine `{frame['hardware_key'].iloc[0]}`, run `{frame['run_id'].iloc[0]}`; "
           f"raw rows: [results.csv]({rel}/results.csv), [meta.json]({rel}/meta.json)",
           f"- backends {', '.join(sorted(set(frame['backend'])))}; world sizes "
           f"{', '.join(map(str, sorted(set(frame['world_size']))))}; dtypes "
           f"{', '.join(sorted(set(frame['dtype'])))}; modes {', '.join(sorted(set(frame['mode'])))}; "
           f"sizes {format_size(int(frame['bytes'].min()))}..{format_size(int(frame['bytes'].max()))}",
           f"- rows: {int(status['correct'].sum())} correct, {int(status['WRONG'].sum())} WRONG, "
           f"{int(status['skipped'].sum())} skipped",
           "- figures: " + (", ".join(f"[{p.stem}]({rel}/{p.name})" for p in figures)
                            or "none yet (`bench report RUN --plots`)"), ""]
    ok = frame[frame["latency_us"].notna() & frame["correct"].fillna(False).astype(bool)]
    default = "nccl" if "nccl" in set(ok["backend"]) else "gloo"
    out += [f"| world size | dtype | mode | smallest size: fastest vs {default} (latency) "
            f"| largest size: fastest vs {default} (busbw) | rows |",
            "| --- | --- | --- | --- | --- | --- |"]
    for (ws, dtype, mode), group in ok.groupby(["world_size", "dtype", "mode"]):
        cells, lines = [], []
        for nbytes in (group["bytes"].min(), group["bytes"].max()):
            at = group[group["bytes"] == nbytes]
            best = at.loc[at["latency_us"].idxmin()]
            base = at[at["backend"] == default]
            size = format_size(int(nbytes))
            if base.empty:
                cells.append(f"{size}: {best['backend']} {best['latency_us']:.1f} us "
                             f"({default} not measured)")
                lines.append(_line(best, rel))
                continue
            base = base.iloc[0]
            ratio = base["latency_us"] / best["latency_us"]
            if nbytes == group["bytes"].min():
                cells.append(f"{size}: {best['backend']} {best['latency_us']:.1f} us vs "
                             f"{base['latency_us']:.1f} us (x{ratio:.1f})")
            else:
                cells.append(f"{size}: {best['backend']} {best['busbw_gbps']:.2f} GB/s vs "
                             f"{base['busbw_gbps']:.2f} GB/s (x{ratio:.1f})")
            lines += [_line(best, rel), _line(base, rel)]
        out.append(f"| {ws} | {dtype} | {mode} | {cells[0]} | {cells[1]} | "
                   f"{', '.join(dict.fromkeys(lines))} |")
    return out + [""]


def thresholds_index(path: Path, base: Path) -> list[str]:
    doc = json.loads(path.read_text())
    rel = _rel(path, base)
    out = [f"### [`{rel}`]({rel})", "",
           "| machine | world size | dtype | mode | rules | regret vs oracle | gain vs default "
           "(geomean) | fitted from |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in doc.get("tables", []):
        rules = "; ".join(f"<= {format_size(r['max_bytes'])}: {r['algorithm']}"
                          if r.get("max_bytes") is not None else f"rest: {r['algorithm']}"
                          for r in t["rules"])
        ev = t.get("evidence", {})
        gain = ev.get("gain_vs_nccl_geomean")
        out.append(f"| `{t['hardware_key']}` | {t['world_size']} | {t['dtype']} | {t['mode']} | "
                   f"{rules} | {ev.get('regret_vs_oracle', float('nan')):.3f} | "
                   f"{'-' if gain is None else f'x{gain:.2f}'} "
                   f"({ev.get('baseline', 'nccl')}) | {', '.join(ev.get('run_ids') or [ev.get('run_id', '?')])} |")
    return out + [""]


BEGIN, END = "<!-- index:", "<!-- end index -->"


def write_into(readme: Path, text: str) -> None:
    doc = readme.read_text()
    start, stop = doc.find(BEGIN), doc.find(END)
    if start < 0 or stop < start:
        raise SystemExit(f"{readme}: no '{BEGIN} ...' and '{END}' markers")
    head = doc[:doc.index("\n", start) + 1]
    readme.write_text(head + text.rstrip() + "\n" + doc[stop:])


def main(argv: list[str]) -> int:
    write = None
    if "--write" in argv:
        at = argv.index("--write")
        write = Path(argv[at + 1])
        argv = argv[:at] + argv[at + 2:]
    root = Path(argv[0] if argv else "results")
    base = write.parent if write else root
    lines = ["## Committed runs", ""]
    runs = plots.find_runs(root)
    if not runs:
        lines.append("No run committed yet.")
    for run in runs:
        lines += run_index(run, base)
    tables = sorted(root.glob("**/thresholds.json"))
    if tables:
        lines += ["## thresholds.json", ""]
        for path in tables:
            lines += thresholds_index(path, base)
    runs_set = {r.resolve() for r in runs}
    others = [p for p in sorted(root.glob("*/**/*")) if p.is_file()
              and not any(parent.resolve() in runs_set for parent in p.parents)
              and p.name not in ("thresholds.json", ".lock")]
    if others:
        lines += ["## Other committed evidence", "",
                  "Files beside the runs (logs, studies, kernel figures), described in the "
                  "write-ups:", ""]
        for folder in sorted({p.parent for p in others}):
            names = ", ".join(f"[{p.name}]({_rel(p, base)})" for p in others if p.parent == folder)
            lines.append(f"- `{_rel(folder, base)}/`: {names}")
        lines.append("")
    text = "\n".join(lines)
    if write:
        write_into(write, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
