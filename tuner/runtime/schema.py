"""thresholds.json: the schema (version 1), strict loading, and matching a running node.

The file is data only (JSON; no pickle, no eval). Loading validates everything and refuses a
bad file with one line that names the field and what was expected.

Schema version 1, as DESIGN.md gives it::

    {"schema_version": 1, "generated_by": {...},
     "tables": [{"hardware_key": str, "world_size": int >= 1, "dtype": str, "mode": str,
                 "rules": [{"max_bytes": int > 0 | null, "algorithm": str,
                            "params": {knob: scalar}}, ...],
                 "max_size": {algorithm: int > 0},
                 "evidence": {"run_id": str, "points": int, "regret_vs_oracle": float,
                              "gain_vs_nccl_geomean": float | null, ...}}]}

What this project adds (documented here, validated like the rest):

- ``rules[*].params`` is optional; its keys must be knobs of the algorithm (checked against the
  backend registry when the algorithm's family imports here) and its values JSON scalars (not
  checked against the registry's candidate values: those are what the search tries, and they
  move with tuning; the backend itself judges a value when it is built).
- ``max_size`` holds an entry for every algorithm of the rules that needs a buffer (all but
  ``BUFFERLESS``), none for algorithms the rules do not use, and is at least the largest finite
  ``max_bytes`` of that algorithm's rules (its buffer must hold every size the table routes to it).
- ``evidence`` may also carry: ``baseline`` (the backend the gain is measured against: nccl on
  GPU, gloo on CPU), ``run_ids`` (every run the table was fitted from), ``buffer_bytes`` (buffer
  memory of the table, max_size x world size summed), ``regret_max`` (the worst single size),
  ``sizes`` ([smallest, largest] measured bytes), ``weights`` ("log-uniform" or "workload:..."),
  ``rules_limit``, ``memory_budget`` (bytes or null), ``source`` ("fit" or "live").
- ``generated_by`` is a free-form object (tool, version, time, command line).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "BUFFERLESS",
    "TableError",
    "Rule",
    "Table",
    "Thresholds",
    "load",
    "loads",
    "from_json",
    "table_key",
]

SCHEMA_VERSION = 1
# algorithms that reduce in the caller's tensor and hold no buffer of their own
BUFFERLESS = frozenset({"gloo", "nccl", "pynccl"})

_TOP_FIELDS = ("schema_version", "generated_by", "tables")
_TABLE_FIELDS = ("hardware_key", "world_size", "dtype", "mode", "rules", "max_size", "evidence")
_RULE_REQUIRED = ("max_bytes", "algorithm")
_RULE_OPTIONAL = ("params",)
_EVIDENCE_REQUIRED = ("run_id", "points", "regret_vs_oracle", "gain_vs_nccl_geomean")
_EVIDENCE_OPTIONAL = ("baseline", "run_ids", "buffer_bytes", "regret_max", "sizes", "weights",
                      "rules_limit", "memory_budget", "source")
_DTYPES = ("float32", "bfloat16", "float16")
_MODES = ("eager", "graph")


class TableError(ValueError):
    """A thresholds file that is not valid: one line naming the field."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Sizes up to and including `max_bytes` (None: every larger size) go to `algorithm`."""

    max_bytes: int | None
    algorithm: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_bytes": self.max_bytes, "algorithm": self.algorithm}
        if self.params:
            out["params"] = dict(self.params)
        return out


def table_key(hardware_key: str, world_size: int, dtype: str, mode: str) -> tuple:
    return (hardware_key, int(world_size), dtype, mode)


@dataclasses.dataclass(frozen=True)
class Table:
    hardware_key: str
    world_size: int
    dtype: str
    mode: str
    rules: tuple[Rule, ...]
    max_size: Mapping[str, int]
    evidence: Mapping[str, Any]

    @property
    def key(self) -> tuple:
        return table_key(self.hardware_key, self.world_size, self.dtype, self.mode)

    def algorithm_for(self, nbytes: int) -> Rule:
        """The rule that covers `nbytes` (the first whose max_bytes is >= it)."""
        for rule in self.rules:
            if rule.max_bytes is None or nbytes <= rule.max_bytes:
                return rule
        return self.rules[-1]

    def to_json(self) -> dict[str, Any]:
        return {"hardware_key": self.hardware_key, "world_size": self.world_size,
                "dtype": self.dtype, "mode": self.mode,
                "rules": [r.to_json() for r in self.rules],
                "max_size": dict(self.max_size), "evidence": dict(self.evidence)}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    tables: tuple[Table, ...]
    generated_by: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def find(self, hardware_key: str, world_size: int, dtype: str, mode: str) -> Table | None:
        wanted = table_key(hardware_key, world_size, dtype, mode)
        for table in self.tables:
            if table.key == wanted:
                return table
        return None

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "generated_by": dict(self.generated_by),
                "tables": [t.to_json() for t in self.tables]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Validate (a table we cannot load back is never written), then write atomically."""
        text = self.dumps()
        loads(text, source=str(path))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


# --------------------------------------------------------------------------- validation


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _kind(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fail(where: str, expected: str, value: Any = dataclasses.MISSING) -> TableError:
    got = "" if value is dataclasses.MISSING else f", got {_shown(value)}"
    return TableError(f"{where}: expected {expected}{got}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


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


def _known_algorithms() -> list[str]:
    from bench.backends import known_names

    return known_names()


def _knobs_of(algorithm: str) -> Mapping[str, Any] | None:
    """The algorithm's knob table, or None where its family does not import here."""
    from bench.backends import get_spec

    try:
        return get_spec(algorithm).knobs
    except KeyError:
        return None


def _node_device(hardware_key: str) -> str | None:
    """cpu or cuda for keys `bench.run.hardware.hardware_key` writes; None for any other key."""
    if hardware_key.startswith("cpu-"):
        return "cpu"
    if re.fullmatch(r"[a-z0-9-]+-x\d+-(nvlink|pcie|nop2p|single)", hardware_key):
        return "cuda"
    return None


def _device_of(algorithm: str) -> str | None:
    from bench.backends import get_spec

    try:
        return get_spec(algorithm).device
    except KeyError:
        return None


def _check_hardware(table: Table, where: str) -> None:
    """A table routes only to algorithms that run on the node its hardware_key names."""
    node = _node_device(table.hardware_key)
    if node is None:
        return
    if node == "cpu" and table.mode == "graph":
        raise TableError(f"{where}.mode: graph needs CUDA, but hardware_key "
                         f"{table.hardware_key!r} names a CPU node")
    for i, rule in enumerate(table.rules):
        device = _device_of(rule.algorithm)
        if device is not None and device != node:
            raise TableError(f"{where}.rules[{i}].algorithm: {rule.algorithm} runs on {device}, "
                             f"but hardware_key {table.hardware_key!r} names a {node} node")


def _rule(obj: Any, where: str, known: list[str]) -> Rule:
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
    knobs = _knobs_of(algorithm)
    for knob, value in params.items():
        if not isinstance(value, (str, int, float, bool)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise _fail(f"{where}.params.{knob}", "a string, number or boolean", value)
        if knobs is not None and knob not in knobs:
            raise _fail(f"{where}.params.{knob}",
                        f"a knob of {algorithm} ({', '.join(knobs) or 'it has none'})")
    return Rule(max_bytes=max_bytes, algorithm=algorithm, params=dict(params))


def _evidence(obj: Any, where: str) -> dict[str, Any]:
    _fields(obj, where, _EVIDENCE_REQUIRED, _EVIDENCE_OPTIONAL)
    checks = {
        "run_id": (lambda v: isinstance(v, str), "a string"),
        "points": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "regret_vs_oracle": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "gain_vs_nccl_geomean": (lambda v: v is None or (_is_number(v) and v > 0),
                                 "a number > 0 or null"),
        "baseline": (lambda v: isinstance(v, str), "a string"),
        "run_ids": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                    "a list of strings"),
        "buffer_bytes": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "regret_max": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "sizes": (lambda v: isinstance(v, list) and len(v) == 2 and all(
            _is_int(x) and x > 0 for x in v), "[smallest, largest] bytes"),
        "weights": (lambda v: isinstance(v, str), "a string"),
        "rules_limit": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "memory_budget": (lambda v: v is None or (_is_int(v) and v >= 0),
                          "an integer >= 0 or null"),
        "source": (lambda v: v in ("fit", "live"), '"fit" or "live"'),
    }
    for name, value in obj.items():
        ok, expected = checks[name]
        if not ok(value):
            raise _fail(f"{where}.{name}", expected, value)
    return dict(obj)


def _table(obj: Any, where: str, known: list[str]) -> Table:
    _fields(obj, where, _TABLE_FIELDS)
    if not isinstance(obj["hardware_key"], str) or not obj["hardware_key"]:
        raise _fail(f"{where}.hardware_key", "a non-empty string", obj["hardware_key"])
    if not (_is_int(obj["world_size"]) and obj["world_size"] >= 1):
        raise _fail(f"{where}.world_size", "an integer >= 1", obj["world_size"])
    if obj["dtype"] not in _DTYPES:
        raise _fail(f"{where}.dtype", f"one of {', '.join(_DTYPES)}", obj["dtype"])
    if obj["mode"] not in _MODES:
        raise _fail(f"{where}.mode", f"one of {', '.join(_MODES)}", obj["mode"])
    raw_rules = obj["rules"]
    if not isinstance(raw_rules, list) or not raw_rules:
        raise _fail(f"{where}.rules", "a non-empty list of rules", raw_rules)
    rules = [_rule(r, f"{where}.rules[{i}]", known) for i, r in enumerate(raw_rules)]
    for i, rule in enumerate(rules[:-1]):
        if rule.max_bytes is None:
            raise TableError(f"{where}.rules[{i}].max_bytes: null is only allowed in the last "
                             "rule (the catch-all)")
        after = rules[i + 1].max_bytes
        if after is not None and after <= rule.max_bytes:
            raise TableError(f"{where}.rules[{i + 1}].max_bytes: expected more than "
                             f"{rule.max_bytes} (rules increase), got {after}")
    if rules[-1].max_bytes is not None:
        raise TableError(f"{where}.rules[{len(rules) - 1}].max_bytes: expected null (the last "
                         f"rule is the catch-all), got {rules[-1].max_bytes}")
    max_size = obj["max_size"]
    if not isinstance(max_size, dict):
        raise _fail(f"{where}.max_size", "an object of algorithm: bytes", max_size)
    used = {r.algorithm for r in rules}
    for name, value in max_size.items():
        if name not in used:
            raise TableError(f"{where}.max_size.{name}: unexpected (no rule uses {name})")
        if not (_is_int(value) and value > 0):
            raise _fail(f"{where}.max_size.{name}", "an integer > 0", value)
    for i, rule in enumerate(rules):
        if rule.algorithm in BUFFERLESS:
            continue
        if rule.algorithm not in max_size:
            raise TableError(f"{where}.max_size.{rule.algorithm}: missing (rules[{i}] uses "
                             f"{rule.algorithm}, which needs a buffer)")
        if rule.max_bytes is not None and max_size[rule.algorithm] < rule.max_bytes:
            raise TableError(f"{where}.max_size.{rule.algorithm}: expected >= "
                             f"{rule.max_bytes} (rules[{i}].max_bytes), got "
                             f"{max_size[rule.algorithm]}")
    evidence = _evidence(obj["evidence"], f"{where}.evidence")
    table = Table(hardware_key=obj["hardware_key"], world_size=obj["world_size"],
                  dtype=obj["dtype"], mode=obj["mode"], rules=tuple(rules),
                  max_size=dict(max_size), evidence=evidence)
    _check_hardware(table, where)
    return table


def from_json(obj: Any) -> Thresholds:
    """Validate a decoded JSON document; raises TableError naming the field."""
    if not isinstance(obj, dict):
        raise _fail("file", "a JSON object at the top level", obj)
    if "schema_version" in obj and obj["schema_version"] != SCHEMA_VERSION:
        raise _fail("schema_version", f"{SCHEMA_VERSION} (the only version this tuner reads)",
                    obj["schema_version"])
    _fields(obj, "", _TOP_FIELDS)
    if not isinstance(obj["generated_by"], dict):
        raise _fail("generated_by", "an object", obj["generated_by"])
    if not isinstance(obj["tables"], list):
        raise _fail("tables", "a list", obj["tables"])
    known = _known_algorithms()
    tables = [_table(t, f"tables[{i}]", known) for i, t in enumerate(obj["tables"])]
    seen: dict[tuple, int] = {}
    for i, table in enumerate(tables):
        if table.key in seen:
            hw, ws, dtype, mode = table.key
            raise TableError(f"tables[{i}]: duplicate of tables[{seen[table.key]}] "
                             f"({hw}, world_size {ws}, {dtype}, {mode})")
        seen[table.key] = i
    return Thresholds(tables=tuple(tables), generated_by=dict(obj["generated_by"]),
                      schema_version=SCHEMA_VERSION)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise TableError(f"{key}: appears twice in one object")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise TableError(f"not JSON: {name} is not a JSON value")


def loads(text: str, source: str = "thresholds.json") -> Thresholds:
    """Parse and validate; every error is one line starting with `source`."""
    try:
        try:
            obj = json.loads(text, object_pairs_hook=_no_duplicate_keys,
                             parse_constant=_no_constants)
        except json.JSONDecodeError as exc:
            raise TableError(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
                from None
        return from_json(obj)
    except TableError as exc:
        raise TableError(f"{source}: {exc}") from None


def load(path: str | os.PathLike) -> Thresholds:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TableError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TableError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    return loads(text, source=str(path))
