"""The table-building flags shared by `tuner fit` and `tuner live`: the workload histogram,
the rule limit and the memory budget, and the Pareto front they print."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from bench.launch.flags import UsageError, int_flag
from bench.launch.paths import output_error, writable_file
from bench.sizes import parse_size

__all__ = [
    "add_table_flags",
    "table_options",
    "read_workload",
    "write_pareto",
    "probe_outputs",
    "save_outputs",
]


def add_table_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        default=None,
        metavar="HIST.csv",
        help="message-size histogram (columns bytes,count) to weight the regret; "
        "default: uniform in log size",
    )
    p.add_argument("--max-rules", dest="max_rules", default="8", help="rules per table (>= 1)")
    p.add_argument(
        "--memory-budget",
        dest="memory_budget",
        default=None,
        metavar="BYTES",
        help="buffer memory a table may use (max_size x world size summed), e.g. 256M",
    )
    p.add_argument(
        "--min-gain",
        dest="min_gain",
        default=None,
        metavar="FRACTION",
        help="with rounds: the least paired advantage (0.05 = 5%%, the default) that moves a "
        "size from one backend to another; smaller differences are ties",
    )
    p.add_argument(
        "--pareto",
        default=None,
        metavar="CSV",
        help="also write every table's Pareto front (memory vs regret) here",
    )


def _bytes_flag(flag: str, text: str | None) -> int | None:
    if text is None:
        return None
    if str(text).strip() == "0":
        return 0
    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def read_workload(path: str) -> dict[int, float]:
    """A histogram CSV with a header: bytes (1024, 4K, ...) and count (or weight)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--workload: {path} is not a file")
    with open(file, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        weight = "count" if "count" in fields else "weight" if "weight" in fields else None
        if "bytes" not in fields or weight is None:
            raise UsageError(
                f"--workload: {path}: expected columns bytes,count "
                f"(got {','.join(fields) or 'no header'})"
            )
        histogram: dict[int, float] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            try:
                nbytes = parse_size(row["bytes"])
                count = float(row[weight])
            except (ValueError, KeyError):
                raise UsageError(
                    f"--workload: {path} line {line}: expected bytes,count, got "
                    f"{row.get('bytes')!r},{row.get(weight)!r}"
                ) from None
            if count < 0 or count != count:
                raise UsageError(f"--workload: {path} line {line}: count must be >= 0")
            histogram[nbytes] = histogram.get(nbytes, 0.0) + count
    if not histogram or sum(histogram.values()) <= 0:
        raise UsageError(f"--workload: {path}: no positive count")
    return histogram


def table_options(args) -> dict:
    return {
        "workload": read_workload(args.workload) if args.workload else None,
        "max_rules": int_flag("--max-rules", args.max_rules),
        "memory_budget": _bytes_flag("--memory-budget", args.memory_budget),
        "min_gain": _fraction_flag("--min-gain", args.min_gain),
    }


def _fraction_flag(flag: str, text: str | None) -> float | None:
    """A fraction in [0, 1) (0.05 = 5%), or None where not given."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:  # NaN included
        raise UsageError(f"{flag}: expected a fraction in [0, 1) such as 0.05, got {text!r}")
    return value


def write_pareto(path: str, fits) -> None:
    from tuner.table.fit import pareto_rows  # optional: optuna; tuner.cli imports this module

    rows = pareto_rows(fits)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["label"])
        writer.writeheader()
        writer.writerows(rows)


def probe_outputs(output: str, study_db: str | None = None, pareto: str | None = None) -> None:
    """Every file `tuner fit` / `tuner live` will write, checked by doing before the work
    (a study given as a database URL is the database's to check). The study's folder is
    made and kept: SQLite does not make it."""
    writable_file("-o", output)
    if pareto:
        writable_file("--pareto", pareto)
    if study_db and "://" not in study_db:
        writable_file("--study-db", study_db, keep=True)
        _check_study(study_db)


def _check_study(path: str) -> None:
    """An existing --study-db file must open as an Optuna study database."""
    if not Path(path).is_file() or Path(path).stat().st_size == 0:
        return
    import optuna

    from tuner.search.study import storage_url  # optional: optuna; tuner.cli imports this module

    try:
        optuna.storages.RDBStorage(storage_url(path))
    except Exception as exc:  # not SQLite, or another schema: SQLAlchemy's or Optuna's error
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:160]
        raise UsageError(f"--study-db: {path} is not an Optuna study database ({detail})") from None


def save_outputs(thresholds, fits, output: str, pareto: str | None) -> None:
    """thresholds.json and the Pareto front; an OS error is one line naming the flag."""
    for flag, path, write in (
        ("-o", output, lambda: thresholds.save(output)),
        ("--pareto", pareto, lambda: write_pareto(pareto, fits)),
    ):
        if path:
            try:
                write()
            except OSError as exc:
                raise output_error(flag, path, exc) from None
