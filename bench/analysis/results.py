"""The results table: one row per run x backend x world size x dtype x size x mode.

`results.csv` is appended and flushed after every point, so a crash loses nothing and
`--resume` measures only what is missing. One writer per run directory: a second sweep on the
same directory is refused (an exclusive lock on `.lock`), never interleaved.
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "TABLE_KEY",
    "point_key",
    "fastest_rows",
    "COLUMNS",
    "POINT_KEY",
    "ResultsWriter",
    "RunDirLocked",
    "SchemaError",
    "read_results",
    "read_meta",
    "write_meta",
    "completed_points",
    "busbw_factor",
    "correct_rows",
]

COLUMNS: tuple[str, ...] = (
    "run_id", "hardware_key", "backend", "world_size", "nnodes", "dtype", "bytes", "count",
    "mode", "iters", "latency_us", "p10_us", "p90_us", "algbw_gbps", "busbw_gbps", "correct",
    "max_abs_err", "skipped_reason",
)
NUMERIC_COLUMNS: tuple[str, ...] = (
    "world_size", "nnodes", "bytes", "count", "iters", "latency_us", "p10_us", "p90_us",
    "algbw_gbps", "busbw_gbps", "max_abs_err",
)
# what identifies a point (a rerun with --resume skips keys already present)
POINT_KEY: tuple[str, ...] = ("backend", "world_size", "dtype", "bytes", "mode")
# what one thresholds.json table covers (the tuner fits one table per group of rows)
TABLE_KEY: tuple[str, ...] = ("hardware_key", "world_size", "dtype", "mode")

RESULTS_FILE = "results.csv"
META_FILE = "meta.json"
LOCK_FILE = ".lock"


class SchemaError(ValueError):
    """A results file that is not the table this project writes."""


class RunDirLocked(RuntimeError):
    """Another sweep is writing into this run directory."""


def busbw_factor(world_size: int) -> float:
    """nccl-tests' all-reduce bus bandwidth factor: busbw = algbw * 2(n-1)/n."""
    return 2.0 * (world_size - 1) / world_size if world_size > 1 else 1.0


def _check_header(header: list[str], path: Path) -> None:
    if tuple(header) != COLUMNS:
        missing = [c for c in COLUMNS if c not in header]
        extra = [c for c in header if c not in COLUMNS]
        detail = []
        if missing:
            detail.append(f"missing {','.join(missing)}")
        if extra:
            detail.append(f"unexpected {','.join(extra)}")
        if not detail:
            detail.append("columns out of order")
        raise SchemaError(f"{path}: not a results table ({'; '.join(detail)})")


class ResultsWriter:
    """Append-only writer for `<run_dir>/results.csv`, holding the run directory's lock."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.run_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RunDirLocked(
                f"{self.run_dir} is being written by another sweep; use another --out"
            ) from None
        self.path = self.run_dir / RESULTS_FILE
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            with open(self.path, newline="") as fh:
                _check_header(next(csv.reader(fh), []), self.path)
            _drop_partial_row(self.path)
        self._fh = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._fh, fieldnames=COLUMNS, extrasaction="raise")
        if new:
            self._csv.writeheader()
            self._flush()

    def _flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def append(self, row: Mapping[str, Any]) -> None:
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise SchemaError(f"row lacks columns {missing}")
        self._csv.writerow({k: _cell(row[k]) for k in COLUMNS})
        self._flush()

    def close(self) -> None:
        if self._fh and not self._fh.closed:
            self._fh.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_partial_row(path: Path) -> None:
    """A writer killed mid-row leaves a line without its newline: cut it (the point is
    measured again) so that the next row does not glue onto it."""
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_results(run_dir: str | os.PathLike):
    """The results of one run directory (or a results.csv path) as a pandas frame."""
    import pandas as pd

    path = Path(run_dir)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results table")
    try:
        with open(path, newline="") as fh:
            _check_header(next(csv.reader(fh), []), path)
        frame = pd.read_csv(path, dtype={"skipped_reason": "string", "run_id": "string",
                                         "hardware_key": "string", "backend": "string",
                                         "dtype": "string", "mode": "string"})
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise SchemaError(f"{path}: not a results table ({str(exc).splitlines()[0]})") from None
    for column in NUMERIC_COLUMNS:  # a cell that is not a number is named, not crashed on
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column].notna() & numbers.isna()
        if bad.any():
            index = bad.to_numpy().nonzero()[0][0]
            raise SchemaError(f"{path} line {index + 2}: {column}: expected a number, got "
                              f"{frame[column].iloc[index]!r}")
        frame[column] = numbers
    frame["correct"] = frame["correct"].map(
        {True: True, False: False, "True": True, "False": False}
    ).astype("boolean")
    return frame


def correct_rows(frame):
    """The rows measured with a correct sum (a latency, and `correct` true): the only rows a
    winner, a ratio or a gain is computed from."""
    return frame[frame["latency_us"].notna() & frame["correct"].fillna(False).astype(bool)]


def point_key(**fields: Any) -> tuple:
    """The POINT_KEY of a row, or of a planned point given by name."""
    return (fields["backend"], int(fields["world_size"]), fields["dtype"], int(fields["bytes"]),
            fields["mode"])


def fastest_rows(frame, keys: Iterable[str]):
    """Per group of `keys`, the correct measured row with the lowest latency."""
    keys = list(keys)
    ok = correct_rows(frame)
    if ok.empty:
        return ok
    return ok.loc[ok.groupby(keys)["latency_us"].idxmin()].sort_values(keys)


def completed_points(run_dir: str | os.PathLike) -> set[tuple]:
    """Point keys already in a run's table (measured or skipped)."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        return set()
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        _check_header(list(reader.fieldnames or []), path)
        return {point_key(**r) for r in reader
                if r.get(COLUMNS[-1]) is not None}  # a row cut short by a crash is not complete


def write_meta(run_dir: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    path = Path(run_dir) / META_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())
