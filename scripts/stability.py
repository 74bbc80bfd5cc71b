"""Do independent sweeps of one machine give the same thresholds.json? (issue 19's benchmark)

    python scripts/stability.py RUN_A RUN_B RUN_C [--label after-ws2] [--markdown OUT.md]
    python scripts/stability.py RUN_A RUN_B RUN_C --first-rounds 3   # as if swept with 3 rounds

Fits one table per run (as `tuner fit RUN` does, every group: dtype x mode), then, per group:
- agreement: the same algorithms in the same order, and every boundary within one size step
  (a factor 2) of the others';
- each table's regret out of sample, on the OTHER runs' rows (`tuner validate`'s scoring):
  geomean and the worst size, named.
Prints one line per (group, table) and a verdict line per group; `--markdown` writes the same
as a table. Every figure is read from the runs given; nothing is assumed.

`--first-rounds K` keeps only each point's first K rounds (rounds.csv) and rebuilds results.csv
from them as the sweep does (median of the round medians, p10/p90 over their iterations): runs
swept with many rounds then say how the tables would have come out with fewer, which is how
the default `--rounds` was chosen (same runs, same machine minutes, only K differs).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from bench.analysis.results import read_results
from bench.analysis.rounds import read_rounds
from bench.run.rounds import PointRounds, RoundFigure
from tuner.runtime.schema import load
from tuner.table.builder import log_uniform_weights
from tuner.table.data import load_rows
from tuner.table.evidence import score_table


def _rules_text(table) -> str:
    parts, low = [], None
    for rule in table.rules:
        top = "inf" if rule.max_bytes is None else _size(rule.max_bytes)
        parts.append(f"{rule.algorithm}<={top}")
        low = rule.max_bytes
    del low
    return " ".join(parts)


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _agree(tables) -> tuple[bool, str]:
    """Same algorithms in the same order; boundaries within one size step (factor 2)."""
    orders = {tuple(r.algorithm for r in t.rules) for t in tables}
    if len(orders) > 1:
        return False, "different algorithms or order"
    bounds = [[r.max_bytes for r in t.rules] for t in tables]
    for column in zip(*bounds, strict=True):
        finite = [b for b in column if b is not None]
        if len(finite) != len(column) and finite:
            return False, "a catch-all where another has a bound"
        if finite and max(finite) > 2 * min(finite):
            return False, f"boundaries {', '.join(_size(b) for b in finite)} over one step apart"
    return True, "agree"


def _fit(run: Path, folder: Path, code: Path | None = None):
    """`tuner fit RUN` as a user runs it (a fresh study), its tables by group; `code`: the
    checkout whose tuner fits (an older one, for a before/after comparison)."""
    out = folder / f"{run.name}.thresholds.json"
    cmd = [sys.executable, "-m", "tuner.cli", "fit", str(run), "-o", str(out)]
    env = {**os.environ, "PYTHONPATH": str(code)} if code else None
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return load_rows([run]), {t.key: t for t in load(out).tables}


def first_rounds(run: Path, rounds: int, folder: Path) -> Path:
    """A copy of `run` with each point's first `rounds` rounds only, results.csv rebuilt."""
    out = folder / run.name
    shutil.copytree(run, out)
    kept = read_rounds(run)
    kept = kept[kept["round"] < rounds]
    kept.to_csv(out / "rounds.csv", index=False)
    frame = read_results(run)
    key = ["backend", "world_size", "dtype", "mode", "bytes"]
    for point, group in kept.groupby(key):
        gathered = PointRounds()
        for row in group.itertuples():
            samples = tuple(float(x) for x in str(row.samples_us).split())
            gathered.add(int(row.round), RoundFigure(float(row.latency_us), samples, 0))
        stats = gathered.stats(int(point[-1]), int(point[1]))
        at = (frame[key] == pd.Series(dict(zip(key, point, strict=True)))).all(axis=1)
        for column in ("latency_us", "p10_us", "p90_us", "algbw_gbps", "busbw_gbps"):
            frame.loc[at, column] = getattr(stats, column)
    frame.to_csv(out / "results.csv", index=False)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--label", default="")
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument(
        "--fit-with", type=Path, default=None, help="the checkout whose `tuner fit` fits (before)"
    )
    p.add_argument(
        "--first-rounds", type=int, default=None, help="keep each point's first K rounds only"
    )
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        fit_on = args.runs
        if args.first_rounds:
            cut = Path(folder) / "cut"
            cut.mkdir()
            fit_on = [first_rounds(run, args.first_rounds, cut) for run in args.runs]
        # each table fitted on its (cut) run, scored on the other runs' full rows
        fitted = [
            (run, load_rows([run]), _fit(fit, Path(folder), args.fit_with)[1])
            for run, fit in zip(args.runs, fit_on, strict=True)
        ]
    lines = [
        f"| {args.label} group | run | rules | out-of-sample geomean | worst size |",
        "| --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for key in sorted(set().union(*(set(t) for _, _, t in fitted))):
        tables = [t[key] for _, _, t in fitted if key in t]
        ok, why = _agree(tables)
        group = f"ws{key[1]} {key[2]} {key[3]}"
        worst_geo = 0.0
        for run, _, by_key in fitted:
            if key not in by_key:
                continue
            others = [r for r2, r, _ in fitted if r2 != run]
            score = score_table(by_key[key], pd.concat(others), log_uniform_weights) or {}
            geo = score.get("regret_geomean", math.nan)
            worst_text = (
                f"{score['regret_worst'] * 100:.1f}% at {_size(score['worst_bytes'])}"
                if "regret_worst" in score
                else "n/a"
            )
            worst_geo = max(worst_geo, geo if geo == geo else 0.0)
            lines.append(
                f"| {group} | {run.name} | {_rules_text(by_key[key])} | {geo * 100:.2f}% | "
                f"{worst_text} |"
            )
        verdicts.append(
            f"{group}: tables {why}; worst out-of-sample geomean {worst_geo * 100:.2f}%"
        )
    text = "\n".join(lines + [""] + verdicts)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
