"""What a whole row of a run's tables and a run's meta.json are, for every reader and writer.

A crash can leave a row cut short. Without its newline it is cut off by the writer; with one (a
later newline, a glued row, an old file) it is a record with the wrong number of fields, or a
row that says neither its latency nor why it was skipped. Such a record is dropped, everywhere
the table is read or reopened, so that it is never kept beside the point measured again. A
record with the right fields but a cell of the wrong kind is not a crash's: the table is not
this project's, refused naming the line and the column (`SchemaError`).

The rules are per column name (`CELL_RULES`), so another table of the run (rounds) reuses them
by naming its columns; a column without a rule takes any text.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SchemaError",
    "CELL_RULES",
    "csv_line",
    "whole_records",
    "with_columns",
    "check_meta",
]


class SchemaError(ValueError):
    """A results file that is not the table this project writes."""


def _text(cell: str) -> bool:
    return cell != ""


def _count(cell: str) -> bool:
    return cell.isdigit()


def _number_or_empty(cell: str) -> bool:
    if cell == "":
        return True
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _numbers(cell: str) -> bool:
    try:
        return bool([float(x) for x in cell.split()])
    except ValueError:
        return False


def _flag_or_empty(cell: str) -> bool:
    return cell in ("", "True", "False")


# (rule, what it expects): a cell failing its rule makes the table not this project's
CELL_RULES: dict[str, tuple[Callable[[str], bool], str]] = {
    **{name: (_text, "a non-empty text") for name in ("run_id", "hardware_key", "backend")},
    **{name: (_text, "a non-empty text") for name in ("dtype", "mode")},
    **{name: (_count, "a whole number") for name in ("world_size", "nnodes", "bytes", "count")},
    "iters": (_count, "a whole number"),
    **{
        name: (_number_or_empty, "a number or empty")
        for name in (
            "latency_us",
            "p10_us",
            "p90_us",
            "algbw_gbps",
            "busbw_gbps",
            "max_abs_err",
            "max_err_ulp",
        )
    },
    **{name: (_flag_or_empty, "True, False or empty") for name in ("correct", "same_bits")},
    "numerics": (lambda cell: cell in ("", "reference", "other"), "reference, other or empty"),
    # rounds.csv
    **{name: (_count, "a whole number") for name in ("round", "position")},
    "samples_us": (_numbers, "numbers separated by spaces"),
}


def csv_line(cells: Iterable[Any]) -> bytes:
    """One CSV record, as the csv module writes it (quoting included)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow(cells)
    return buffer.getvalue().encode()


def _said(record: dict[str, str]) -> bool:
    """A results row says its latency or why it was skipped, never both nor neither (a row cut
    inside its reason, right after the comma, says neither)."""
    if "latency_us" not in record or "skipped_reason" not in record:
        return True
    return (record["latency_us"] == "") != (record["skipped_reason"] == "")


def whole_records(data: bytes, columns: Sequence[str], path: Path | str) -> tuple[bytes, int]:
    """(the table's bytes with only its whole records, how many records were dropped).

    `data` is the whole file, header first (checked by the caller). A last line without its
    newline is dropped (a row being written); a record with the wrong number of fields or
    that says neither a latency nor a reason is dropped (a row cut short); a cell of the wrong
    kind raises SchemaError naming the line and the column."""
    body_start = data.find(b"\n") + 1
    if body_start == 0:
        return data, 0
    ended = data[: data.rfind(b"\n") + 1]
    dropped = 0 if ended == data else 1
    try:
        text = ended[body_start:].decode()
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{path}: not a results table ({exc})") from None
    kept: list[bytes] = []
    line = 1
    for cells in csv.reader(io.StringIO(text, newline="")):
        line += 1
        if not cells:
            continue
        if len(cells) != len(columns):
            dropped += 1
            continue
        record = dict(zip(columns, cells, strict=True))
        if not _said(record):
            dropped += 1
            continue
        for name, cell in record.items():
            rule = CELL_RULES.get(name)
            if rule is not None and not rule[0](cell):
                raise SchemaError(
                    f"{path} line {line}: {name}: expected {rule[1]}, got {cell[:40]!r}"
                )
        kept.append(csv_line(cells))
    if dropped == 0:
        return data, 0
    return ended[:body_start] + b"".join(kept), dropped


def with_columns(
    data: bytes, held: Sequence[str], columns: Sequence[str], path: Path | str
) -> tuple[bytes, int]:
    """A table of columns `held` as one of `columns` (a superset): the new cells empty, the
    records not whole left out; (its bytes, how many records were dropped)."""
    kept, dropped = whole_records(data, held, path)
    body = kept[kept.find(b"\n") + 1 :].decode()
    lines = [csv_line(columns)]
    for cells in csv.reader(io.StringIO(body, newline="")):
        if cells:
            record = dict(zip(held, cells, strict=True))
            lines.append(csv_line(record.get(c, "") for c in columns))
    return b"".join(lines), dropped


# meta.json: every field some reader takes, with the kind it must have where present (null
# counts as absent: the readers fall back); nested fields by their path
_META_KINDS: dict[tuple[str, ...], tuple[type, str]] = {
    ("run_id",): (str, "a string"),
    ("hardware_key",): (str, "a string"),
    ("started",): (str, "a string"),
    ("finished",): (str, "a string"),
    ("nnodes",): (int, "an integer"),
    ("hosts",): (int, "an integer"),
    ("arguments",): (dict, "an object"),
    ("arguments", "params"): (dict, "an object of backend: {knob: value}"),
    ("arguments", "device"): (str, "a string"),
    ("fingerprint",): (dict, "an object"),
    ("fingerprint", "hardware_key"): (str, "a string"),
    ("fingerprint", "gpu"): (dict, "an object"),
    ("fingerprint", "gpu", "gpus"): (list, "a list"),
}


def check_meta(meta: Any, path: Path | str) -> dict[str, Any]:
    """`meta` if it has the shape every reader of meta.json expects, else SchemaError naming
    the field."""
    if not isinstance(meta, dict):
        raise SchemaError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for where, (kind, expected) in _META_KINDS.items():
        value: Any = meta
        for name in where:
            value = value.get(name) if isinstance(value, Mapping) else None
        if value is not None and not (isinstance(value, kind) and not isinstance(value, bool)):
            raise SchemaError(f"{path}: {'.'.join(where)}: expected {expected}")
    params = (meta.get("arguments") or {}).get("params") or {}
    for backend, knobs in params.items():
        if not isinstance(knobs, dict):
            raise SchemaError(f"{path}: arguments.params.{backend}: expected an object")
    return meta
