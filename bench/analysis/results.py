"""The results table: one row per run x backend x world size x dtype x size x mode.

`results.csv` is appended and flushed after every point, so a crash loses nothing and
`--resume` measures only what is missing. One writer per run directory: a second sweep on the
same directory is refused (an exclusive lock on `.lock`, removed when the writer closes),
never interleaved; a new run claims the directory under that lock (`claim=True`), so two
sweeps started on one directory never both write it. Rows not whole are left out wherever the
table is read or reopened (`rows`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.analysis.rows import SchemaError, check_meta, csv_line, whole_records, with_columns

__all__ = [
    "TABLE_KEY",
    "point_key",
    "fastest_rows",
    "COLUMNS",
    "NUMERICS_COLUMNS",
    "POINT_KEY",
    "ResultsWriter",
    "RunDirLocked",
    "RunDirTaken",
    "TableRemoved",
    "SchemaError",
    "read_results",
    "read_meta",
    "write_meta",
    "completed_points",
    "completed_rounds",
    "ROUND_COLUMNS",
    "ROUNDS_FILE",
    "count_rows",
    "busbw_factor",
    "correct_rows",
]

COLUMNS: tuple[str, ...] = (
    "run_id",
    "hardware_key",
    "backend",
    "world_size",
    "nnodes",
    "dtype",
    "bytes",
    "count",
    "mode",
    "iters",
    "latency_us",
    "p10_us",
    "p90_us",
    "algbw_gbps",
    "busbw_gbps",
    "correct",
    "max_abs_err",
    "same_bits",
    "numerics",
    "max_err_ulp",
    "skipped_reason",
)
# the arithmetic measured per point (bench.run.numerics); runs written before lack them
NUMERICS_COLUMNS: tuple[str, ...] = ("same_bits", "numerics", "max_err_ulp")
# a results table written before the numerics: read (its new cells unknown) and, on --resume,
# rewritten with them empty
LEGACY_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in NUMERICS_COLUMNS)
NUMERIC_COLUMNS: tuple[str, ...] = (
    "world_size",
    "nnodes",
    "bytes",
    "count",
    "iters",
    "latency_us",
    "p10_us",
    "p90_us",
    "algbw_gbps",
    "busbw_gbps",
    "max_abs_err",
    "max_err_ulp",
)
# what identifies a point (a rerun with --resume skips keys already present)
POINT_KEY: tuple[str, ...] = ("backend", "world_size", "dtype", "bytes", "mode")
# what one thresholds.json table covers (the tuner fits one table per group of rows)
TABLE_KEY: tuple[str, ...] = ("hardware_key", "world_size", "dtype", "mode")

# the side table of rounds: one row per measured (point, round). Rows of one (run, round,
# dtype, mode, bytes) were measured side by side, seconds apart: the pairs that comparisons
# between backends are made of. `position` is the backend's place in that round's rotating
# order; `latency_us` the round's median of the slowest rank's per-iteration time;
# `samples_us` those per-iteration times, space-separated (p10/p90 over all rounds, resumes).
ROUND_COLUMNS: tuple[str, ...] = (
    "run_id",
    "hardware_key",
    "backend",
    "world_size",
    "dtype",
    "mode",
    "bytes",
    "round",
    "position",
    "iters",
    "latency_us",
    "samples_us",
)

RESULTS_FILE = "results.csv"
ROUNDS_FILE = "rounds.csv"
META_FILE = "meta.json"
LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another sweep is writing into this run directory."""


class RunDirTaken(RunDirLocked):
    """A new run found the directory holding another run's rows (started after this one's
    check, finished before this one's writer opened)."""


def busbw_factor(world_size: int) -> float:
    """nccl-tests' all-reduce bus bandwidth factor: busbw = algbw * 2(n-1)/n."""
    return 2.0 * (world_size - 1) / world_size if world_size > 1 else 1.0


def _check_header(
    header: list[str], path: Path, columns: tuple[str, ...] = COLUMNS
) -> tuple[str, ...]:
    """The columns the file holds: `columns`, or for the results table its legacy columns
    (a run written before the numerics); SchemaError otherwise."""
    if columns == COLUMNS and tuple(header) == LEGACY_COLUMNS:
        return LEGACY_COLUMNS
    if tuple(header) != columns:
        missing = [c for c in columns if c not in header]
        extra = [c for c in header if c not in columns]
        detail = []
        if missing:
            detail.append(f"missing {','.join(missing)}")
        if extra:
            detail.append(f"unexpected {','.join(extra)}")
        if not detail:
            detail.append("columns out of order")
        raise SchemaError(f"{path}: not a results table ({'; '.join(detail)})")
    return columns


def _file_columns(path: Path, columns: tuple[str, ...] = COLUMNS) -> tuple[str, ...]:
    with open(path, newline="") as fh:
        return _check_header(next(csv.reader(fh), []), path, columns)


def _upgrade_legacy(path: Path) -> int:
    """A table written before the numerics, rewritten whole with their cells empty (so a
    resumed run appends rows of today's columns); the records not whole it dropped."""
    data, dropped = with_columns(path.read_bytes(), LEGACY_COLUMNS, COLUMNS, path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return dropped


class TableRemoved(FileNotFoundError):
    """The table's file was removed (with its folder, or alone) while a sweep wrote it."""


class ResultsWriter:
    """Append-only writer for `<run_dir>/results.csv`, holding the run directory's lock.

    Each row is one `write` of its whole line, then fsync'd. A row that cannot be written (a
    full disk, a file-size limit) is cut off again, so the file always ends with a whole row,
    and the OSError is raised. A file removed meanwhile (its link count drops to 0) raises
    `TableRemoved`; `restore()` then writes everything the table held again, kept in memory
    for that (a run's table is small)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        claim: bool = False,
        file_name: str = RESULTS_FILE,
        columns: tuple[str, ...] = COLUMNS,
        lock: bool = True,
    ) -> None:
        """`claim`: this is a new run, the directory's first (its table absent or empty, seen
        under the lock: RunDirTaken otherwise, nothing written). `file_name`/`columns`:
        another table of the run (the rounds); `lock`: whether this writer holds the
        directory's lock (one writer per run does; a side table's writer, opened by the
        lock holder, does not take it twice)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.columns = columns
        self._lock_fd: int | None = _take_lock(self.run_dir) if lock else None
        self.path = self.run_dir / file_name
        self._fd: int | None = None
        self.dropped = 0  # records not whole, left out of a table found here
        try:
            new = not self.path.exists() or self.path.stat().st_size == 0
            if claim and not new:
                raise RunDirTaken(
                    f"{self.run_dir} already holds a run (results.csv, written by another "
                    f"sweep meanwhile); continue it with --resume {self.run_dir}, or pick "
                    "another --out"
                )
            if not new:
                if _file_columns(self.path, columns) != columns:
                    self.dropped = _upgrade_legacy(self.path)
                self.dropped += _keep_whole_rows(self.path, columns)
            self._text = bytearray(b"" if new else self.path.read_bytes())
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if new:
                self._write(csv_line(columns))
        except BaseException:
            self.close()
            raise

    @property
    def rows(self) -> int:
        """Data rows the table holds (this writer's and those it found)."""
        return max(0, self._text.count(b"\n") - 1)

    def append(self, row: Mapping[str, Any]) -> None:
        # the numerics are unknown where a writer does not measure them (empty cells)
        missing = [c for c in self.columns if c not in row and c not in NUMERICS_COLUMNS]
        if missing:
            raise SchemaError(f"row lacks columns {missing}")
        self._write(csv_line(_cell(row.get(k)) for k in self.columns))

    def _write(self, data: bytes) -> None:
        held = len(self._text)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, held)  # no part of the row stays behind
            except OSError:
                pass
            raise
        self._text += data
        if os.fstat(self._fd).st_nlink == 0:
            raise TableRemoved(errno.ENOENT, "removed during the sweep", str(self.path))

    def removed(self) -> bool:
        """Whether the table's file was removed (unlinked) while this writer held it."""
        return self._fd is not None and os.fstat(self._fd).st_nlink == 0

    def restore(self) -> None:
        """After `TableRemoved`: the folder and the file again, with every row this writer
        held (never over a file someone else made there meanwhile)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = self._lock_fd  # still ours, unless the folder went with it
        if lock_fd is not None and os.fstat(lock_fd).st_nlink == 0:
            lock_fd = _take_lock(self.run_dir)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError:
            if lock_fd != self._lock_fd:
                os.close(lock_fd)
            raise
        os.close(self._fd)
        if lock_fd != self._lock_fd:
            os.close(self._lock_fd)
        self._fd, self._lock_fd = fd, lock_fd
        text, self._text = bytes(self._text), bytearray()
        self._write(text)

    def close(self) -> None:
        if self._lock_fd is not None:
            _drop_lock(self.run_dir, self._lock_fd)
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _take_lock(run_dir: Path) -> int:
    """The run directory's lock, held open; RunDirLocked when another sweep holds it.

    The holder removes the file before it lets go (`_drop_lock`), so a lock taken on a file
    that is no longer the one at the path is no lock: tried again on the path's file."""
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLocked(
                f"{run_dir} is being written by another sweep; use another --out"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _drop_lock(run_dir: Path, fd: int) -> None:
    """Remove the lock file while holding it (a finished run leaves no `.lock`); never one
    that is no longer this writer's."""
    path = run_dir / LOCK_FILE
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()


def _keep_whole_rows(path: Path, columns: tuple[str, ...] = COLUMNS) -> int:
    """Before appending: the table without its records that are not whole (a row being written
    when a writer died, with or without a newline after it), replaced whole; how many were
    dropped (their points are measured again)."""
    data = path.read_bytes()
    kept, dropped = whole_records(data, columns, path)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(kept)
        os.replace(tmp, path)
    return dropped


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
        held = _file_columns(path)
        data, _ = whole_records(path.read_bytes(), held, path)  # rows cut short: left out
        frame = pd.read_csv(
            io.BytesIO(data),
            dtype={
                "skipped_reason": "string",
                "run_id": "string",
                "hardware_key": "string",
                "backend": "string",
                "dtype": "string",
                "mode": "string",
                "numerics": "string",
            },
        )
        for column in COLUMNS:  # a run written before the numerics: unknown (empty)
            if column not in frame.columns:
                frame[column] = None
        frame = frame[list(COLUMNS)]
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SchemaError(f"{path}: not a results table ({str(exc).splitlines()[0]})") from None
    for column in NUMERIC_COLUMNS:  # a cell that is not a number is named, not crashed on
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column].notna() & numbers.isna()
        if bad.any():
            index = bad.to_numpy().nonzero()[0][0]
            raise SchemaError(
                f"{path} line {index + 2}: {column}: expected a number, got "
                f"{frame[column].iloc[index]!r}"
            )
        frame[column] = numbers
    for column in ("correct", "same_bits"):
        frame[column] = (
            frame[column]
            .map({True: True, False: False, "True": True, "False": False})
            .astype("boolean")
        )
    frame["numerics"] = frame["numerics"].astype("string")
    return frame


def correct_rows(frame):
    """The rows measured with a correct sum (a latency, and `correct` true): the only rows a
    winner, a ratio or a gain is computed from."""
    return frame[frame["latency_us"].notna() & frame["correct"].fillna(False).astype(bool)]


def point_key(**fields: Any) -> tuple:
    """The POINT_KEY of a row, or of a planned point given by name."""
    return (
        fields["backend"],
        int(fields["world_size"]),
        fields["dtype"],
        int(fields["bytes"]),
        fields["mode"],
    )


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
    held = _file_columns(path)
    data, _ = whole_records(path.read_bytes(), held, path)  # a row cut short is not done
    reader = csv.DictReader(io.StringIO(data.decode(), newline=""))
    return {point_key(**r) for r in reader}


def completed_rounds(run_dir: str | os.PathLike) -> dict[tuple, dict[int, tuple]]:
    """The rounds already measured, from a run's rounds.csv: point key -> {round: (latency_us,
    samples_us tuple, position)}; a row cut short by a crash is not kept. Empty where the
    run has no rounds table (a run made before rounds, or none measured yet)."""
    path = Path(run_dir) / ROUNDS_FILE
    if not path.exists():
        return {}
    done: dict[tuple, dict[int, tuple]] = {}
    with open(path, newline="") as fh:
        _check_header(next(csv.reader(fh), []), path, ROUND_COLUMNS)
    data, _ = whole_records(path.read_bytes(), ROUND_COLUMNS, path)  # rows cut short: out
    reader = csv.DictReader(io.StringIO(data.decode(), newline=""))
    for line, record in enumerate(reader, start=2):
        try:
            samples = tuple(float(x) for x in record["samples_us"].split())
            figure = (float(record["latency_us"]), samples, int(record["position"]))
            done.setdefault(point_key(**record), {})[int(record["round"])] = figure
        except (TypeError, ValueError, AttributeError, KeyError):
            raise SchemaError(f"{path} line {line}: not a whole round row") from None
    return done


def count_rows(run_dir: str | os.PathLike, file_name: str = RESULTS_FILE) -> int | None:
    """Whole data rows in a run's results.csv (or its rounds.csv: `file_name`; a row cut
    short by a crash is not counted); None when there is no such file."""
    path = Path(run_dir) / file_name
    columns = ROUND_COLUMNS if file_name == ROUNDS_FILE else COLUMNS
    try:
        data = path.read_bytes()
    except OSError:
        return None
    with contextlib.suppress(SchemaError, OSError, UnicodeDecodeError):
        columns = _file_columns(path, columns)
    with contextlib.suppress(SchemaError):  # counted as whole rows where the table is ours
        data, _ = whole_records(data, columns, path)
    data = data[: data.rfind(b"\n") + 1]
    records = csv.reader(io.StringIO(data.decode(errors="replace"), newline=""))
    return max(0, sum(1 for record in records if record) - 1)


def write_meta(run_dir: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """meta.json replaced whole (a temporary file renamed over it), or left as it was."""
    path = Path(run_dir) / META_FILE
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except OSError:  # a full disk: no half-written file left behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's meta.json ({} where there is none); SchemaError (or a JSON error) where it is not
    the shape every reader of it expects."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        return {}
    return check_meta(json.loads(path.read_text()), path)
