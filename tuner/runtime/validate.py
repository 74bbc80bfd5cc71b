"""Validation of a decoded thresholds.json document (schema version 1, see `schema`).

Works on the decoded JSON (dicts and lists) so that `schema` builds its objects only from a
document that passed; every error is one line naming the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from typing import Any

from bench.backends import get_spec, known_names, needs_buffer
from bench.dtypes import DTYPES as TORCH_DTYPES
from bench.run.hardware import KEY_PATTERN, device_of_key
from tuner.runtime.evidence_fields import EVIDENCE_FIELDS  # measured in rounds (issue 19)

__all__ = [
    "SCHEMA_VERSION",
    "DTYPES",
    "MODES",
    "NUMERICS",
    "LIMITS",
    "TableError",
    "OutOfRange",
    "check_document",
]

SCHEMA_VERSION = 1
DTYPES = tuple(TORCH_DTYPES)  # the names, from the one map
MODES = ("eager", "graph")
_TOP_FIELDS = ("schema_version", "generated_by", "tables")
_TABLE_FIELDS = ("hardware_key", "world_size", "dtype", "mode", "rules", "max_size", "evidence")
# the table's arithmetic guarantee (issue 23): "exact" = every rule's algorithm was measured
# following the reference arithmetic at every size it covers; absent (older files) = "any"
_TABLE_OPTIONAL = ("numerics",)
NUMERICS = ("any", "exact")
_RULE_REQUIRED = ("max_bytes", "algorithm")
_RULE_OPTIONAL = ("params",)
_EVIDENCE_REQUIRED = ("run_id", "points", "regret_vs_oracle", "gain_vs_nccl_geomean")
_EVIDENCE_OPTIONAL = (
    "baseline",
    "run_ids",
    "buffer_bytes",
    "regret_max",
    "sizes",
    "weights",
    "rules_limit",
    "memory_budget",
    "source",
)


# What one thresholds.json may hold (the schema states them; `schema` enforces the file's bytes
# and depth while reading, `check_document` the rest). Far above any fitted table (a few tables
# of tens of rules), low enough that loading and building the routes stay well under seconds.
LIMITS = {
    "file_bytes": 16 * 1024 * 1024,
    "depth": 32,  # nesting of objects and lists, generated_by included
    "tables": 1024,
    "rules": 10_000,  # per table
    "configurations": 64,  # distinct algorithm + params in the file: each is a backend built
    "integer": 2**53,  # magnitude of any integer (the integers every JSON reader agrees on)
}


class TableError(ValueError):
    """A thresholds file that is not valid: one line naming the field."""


class OutOfRange:
    """An integer literal longer than any the schema allows, kept as its digit count so the
    validator can name its field (int() of 5,000 digits is refused by Python itself)."""

    __slots__ = ("digits",)

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))


# JSON kinds by Python type, bool before int (a bool is an int)
_KINDS = (
    (type(None), "null"),
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "a list"),
    (dict, "an object"),
    (OutOfRange, "an integer of too many digits"),
)


def _kind(value: Any) -> str:
    return next((name for kind, name in _KINDS if isinstance(value, kind)), type(value).__name__)


def _shown(value: Any) -> str:
    if isinstance(value, OutOfRange):
        return f"an integer of {value.digits} digits"
    if isinstance(value, int) and not isinstance(value, bool) and not _is_int(value):
        return f"{value} (beyond +-2**53)"
    text = (
        json.dumps(value)
        if isinstance(value, (str, int, float, bool, type(None)))
        else _kind(value)
    )
    return text if len(text) <= 40 else text[:37] + "..."


def _fail(where: str, expected: str, value: Any = dataclasses.MISSING) -> TableError:
    got = "" if value is dataclasses.MISSING else f", got {_shown(value)}"
    return TableError(f"{where}: expected {expected}{got}")


def _is_int(value: Any) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and -LIMITS["integer"] <= value <= LIMITS["integer"]
    )


def _is_number(value: Any) -> bool:
    if isinstance(value, int):
        return _is_int(value)
    return isinstance(value, float) and math.isfinite(value)


def _free_form(obj: Any, where: str) -> None:
    """Any JSON (generated_by): nested at most LIMITS['depth'], integers within bounds."""
    todo = [(obj, where, 1)]
    while todo:
        value, at, depth = todo.pop()
        if depth > LIMITS["depth"]:
            raise TableError(f"{at}: nested deeper than {LIMITS['depth']} levels")
        if isinstance(value, dict):
            todo.extend((v, f"{at}.{k}", depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((v, f"{at}[{i}]", depth + 1) for i, v in enumerate(value))
        elif isinstance(value, (int, OutOfRange)) and not isinstance(value, bool):
            if not _is_int(value):
                raise _fail(at, "an integer within +-2**53", value)


def _fields(obj: Any, where: str, required: Iterable[str], optional: Iterable[str] = ()) -> None:
    if not isinstance(obj, dict):
        raise _fail(where or "file", "an object", obj)
    required, optional = tuple(required), tuple(optional)
    for name in required:
        if name not in obj:
            raise TableError(f"{_join(where, name)}: missing (required field)")
    for name in obj:
        if name not in required and name not in optional:
            allowed = ", ".join(required + optional)
            raise TableError(f"{_join(where, name)}: unexpected field (allowed: {allowed})")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _spec_of(algorithm: str) -> Any:
    """The algorithm's BackendSpec, or None where its family does not import here."""
    try:
        return get_spec(algorithm)
    except KeyError:
        return None


def _node_device(hardware_key: str) -> str | None:
    """cpu or cuda for keys `bench.run.hardware.hardware_key` writes; None for any other key."""
    known = hardware_key.startswith("cpu-") or KEY_PATTERN.fullmatch(hardware_key)
    return device_of_key(hardware_key) if known else None


def _device_of(algorithm: str) -> str | None:
    try:
        return get_spec(algorithm).device
    except KeyError:
        return None


def _check_hardware(table: dict, where: str) -> None:
    """A table routes only to algorithms that run on the node its hardware_key names."""
    node = _node_device(table["hardware_key"])
    if node is None:
        return
    if node == "cpu" and table["mode"] == "graph":
        raise TableError(
            f"{where}.mode: graph needs CUDA, but hardware_key "
            f"{table['hardware_key']!r} names a CPU node"
        )
    for i, rule in enumerate(table["rules"]):
        device = _device_of(rule["algorithm"])
        if device is not None and device != node:
            raise TableError(
                f"{where}.rules[{i}].algorithm: {rule['algorithm']} runs on "
                f"{device}, but hardware_key {table['hardware_key']!r} names a "
                f"{node} node"
            )


def _rule(obj: Any, where: str, known: list[str]) -> None:
    _fields(obj, where, _RULE_REQUIRED, _RULE_OPTIONAL)
    max_bytes = obj["max_bytes"]
    if max_bytes is not None and not (_is_int(max_bytes) and max_bytes > 0):
        raise _fail(f"{where}.max_bytes", "an integer > 0 or null", max_bytes)
    algorithm = obj["algorithm"]
    if not isinstance(algorithm, str):
        raise _fail(f"{where}.algorithm", "a string", algorithm)
    if algorithm not in known:
        raise _fail(f"{where}.algorithm", f"a known algorithm ({', '.join(known)})", algorithm)
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise _fail(f"{where}.params", "an object of knob values", params)
    spec = _spec_of(algorithm)
    for knob, value in params.items():
        if not (isinstance(value, (str, float, bool)) or _is_int(value)) or (
            isinstance(value, float) and not math.isfinite(value)
        ):
            raise _fail(f"{where}.params.{knob}", "a string, number or boolean", value)
        # the backend's spec judges its knobs (names, types, values): one statement of them
        reason = spec.check_params({knob: value}) if spec is not None else None
        if reason:
            raise TableError(f"{where}.params.{knob}: {reason}")


def _evidence(obj: Any, where: str) -> None:
    _fields(obj, where, _EVIDENCE_REQUIRED, (*_EVIDENCE_OPTIONAL, *EVIDENCE_FIELDS))
    checks = {
        **EVIDENCE_FIELDS,
        "run_id": (lambda v: isinstance(v, str), "a string"),
        "points": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "regret_vs_oracle": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "gain_vs_nccl_geomean": (
            lambda v: v is None or (_is_number(v) and v > 0),
            "a number > 0 or null",
        ),
        "baseline": (lambda v: isinstance(v, str), "a string"),
        "run_ids": (
            lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "a list of strings",
        ),
        "buffer_bytes": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "regret_max": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "sizes": (
            lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v),
            "[smallest, largest] bytes",
        ),
        "weights": (lambda v: isinstance(v, str), "a string"),
        "rules_limit": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "memory_budget": (
            lambda v: v is None or (_is_int(v) and v >= 0),
            "an integer >= 0 or null",
        ),
        "source": (lambda v: v in ("fit", "live"), '"fit" or "live"'),
    }
    for name, value in obj.items():
        ok, expected = checks[name]
        if not ok(value):
            raise _fail(f"{where}.{name}", expected, value)


def _table(obj: Any, where: str, known: list[str]) -> None:
    _fields(obj, where, _TABLE_FIELDS, _TABLE_OPTIONAL)
    if obj.get("numerics", "any") not in NUMERICS:
        raise _fail(f"{where}.numerics", f"one of {', '.join(NUMERICS)}", obj["numerics"])
    if not isinstance(obj["hardware_key"], str) or not obj["hardware_key"]:
        raise _fail(f"{where}.hardware_key", "a non-empty string", obj["hardware_key"])
    if not (_is_int(obj["world_size"]) and obj["world_size"] >= 1):
        raise _fail(f"{where}.world_size", "an integer >= 1", obj["world_size"])
    if obj["dtype"] not in DTYPES:
        raise _fail(f"{where}.dtype", f"one of {', '.join(DTYPES)}", obj["dtype"])
    if obj["mode"] not in MODES:
        raise _fail(f"{where}.mode", f"one of {', '.join(MODES)}", obj["mode"])
    _rules(obj["rules"], where, known)
    _max_size(obj["max_size"], obj["rules"], where)
    _evidence(obj["evidence"], f"{where}.evidence")
    _check_hardware(obj, where)


def _rules(rules: Any, where: str, known: list[str]) -> None:
    if not isinstance(rules, list) or not rules:
        raise _fail(f"{where}.rules", "a non-empty list of rules", rules)
    if len(rules) > LIMITS["rules"]:
        raise TableError(
            f"{where}.rules: expected at most {LIMITS['rules']} rules per table, got {len(rules)}"
        )
    for i, rule in enumerate(rules):
        _rule(rule, f"{where}.rules[{i}]", known)
    for i, rule in enumerate(rules[:-1]):
        if rule["max_bytes"] is None:
            raise TableError(
                f"{where}.rules[{i}].max_bytes: null is only allowed in the last "
                "rule (the catch-all)"
            )
        after = rules[i + 1]["max_bytes"]
        if after is not None and after <= rule["max_bytes"]:
            raise TableError(
                f"{where}.rules[{i + 1}].max_bytes: expected more than "
                f"{rule['max_bytes']} (rules increase), got {after}"
            )
    if rules[-1]["max_bytes"] is not None:
        raise TableError(
            f"{where}.rules[{len(rules) - 1}].max_bytes: expected null (the last "
            f"rule is the catch-all), got {rules[-1]['max_bytes']}"
        )


def _max_size(max_size: Any, rules: list[dict], where: str) -> None:
    """An entry for every algorithm of the rules that holds a buffer, at least as large as the
    largest size its rules route to it; none for algorithms the rules do not use."""
    if not isinstance(max_size, dict):
        raise _fail(f"{where}.max_size", "an object of algorithm: bytes", max_size)
    used = {r["algorithm"] for r in rules}
    for name, value in max_size.items():
        if name not in used:
            raise TableError(f"{where}.max_size.{name}: unexpected (no rule uses {name})")
        if not (_is_int(value) and value > 0):
            raise _fail(f"{where}.max_size.{name}", "an integer > 0", value)
    for i, rule in enumerate(rules):
        name, upper = rule["algorithm"], rule["max_bytes"]
        if not needs_buffer(name):
            continue
        if name not in max_size:
            raise TableError(
                f"{where}.max_size.{name}: missing (rules[{i}] uses {name}, which needs a buffer)"
            )
        if upper is not None and max_size[name] < upper:
            raise TableError(
                f"{where}.max_size.{name}: expected >= {upper} "
                f"(rules[{i}].max_bytes), got {max_size[name]}"
            )


def check_document(obj: Any) -> None:
    """Validate a decoded thresholds document; raises TableError naming the field."""
    if not isinstance(obj, dict):
        raise _fail("file", "a JSON object at the top level", obj)
    if "schema_version" in obj and obj["schema_version"] != SCHEMA_VERSION:
        raise _fail(
            "schema_version",
            f"{SCHEMA_VERSION} (the only version this tuner reads)",
            obj["schema_version"],
        )
    _fields(obj, "", _TOP_FIELDS)
    if not isinstance(obj["generated_by"], dict):
        raise _fail("generated_by", "an object", obj["generated_by"])
    _free_form(obj["generated_by"], "generated_by")
    if not isinstance(obj["tables"], list):
        raise _fail("tables", "a list", obj["tables"])
    if len(obj["tables"]) > LIMITS["tables"]:
        raise TableError(
            f"tables: expected at most {LIMITS['tables']} tables, got {len(obj['tables'])}"
        )

    known = known_names()
    seen: dict[tuple, int] = {}
    for i, table in enumerate(obj["tables"]):
        _table(table, f"tables[{i}]", known)
        key = (table["hardware_key"], table["world_size"], table["dtype"], table["mode"])
        if key in seen:
            hw, ws, dtype, mode = key
            raise TableError(
                f"tables[{i}]: duplicate of tables[{seen[key]}] "
                f"({hw}, world_size {ws}, {dtype}, {mode})"
            )
        seen[key] = i
    _configurations(obj["tables"])


def _configurations(tables: list[dict]) -> None:
    """At most LIMITS['configurations'] distinct algorithm + params: the dispatcher builds one
    backend (and its buffer) for each."""
    seen: set[tuple[str, str]] = set()
    for i, table in enumerate(tables):
        for j, rule in enumerate(table["rules"]):
            seen.add((rule["algorithm"], json.dumps(rule.get("params", {}), sort_keys=True)))
            if len(seen) > LIMITS["configurations"]:
                raise TableError(
                    f"tables[{i}].rules[{j}]: expected at most {LIMITS['configurations']} "
                    "distinct algorithm + params settings in a file (each is a backend to build)"
                )
