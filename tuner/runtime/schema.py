"""thresholds.json: the schema (version 1), strict loading, and matching a running node.

The file is data only (JSON; no pickle, no eval). Loading validates everything and refuses a
bad file with one line that names the field and what was expected.

Schema version 1 (docs/thresholds.md is the contract, with every field)::

    {"schema_version": 1, "generated_by": {...},
     "tables": [{"hardware_key": str, "world_size": int >= 1, "dtype": str, "mode": str,
                 "rules": [{"max_bytes": int > 0 | null, "algorithm": str,
                            "params": {knob: scalar}}, ...],
                 "max_size": {algorithm: int > 0},
                 "evidence": {"run_id": str, "points": int, "regret_vs_oracle": float,
                              "gain_vs_nccl_geomean": float | null, ...}}]}

What this project adds (documented here, validated like the rest):

- ``rules[*].params`` is optional; its values are JSON scalars, and each knob and value is
  checked by the algorithm's spec (``BackendSpec.check_params``) when its family imports here.
- ``max_size`` holds an entry for every algorithm of the rules that needs a buffer (all but
  ``needs_buffer`` on its registry spec), none for algorithms the rules do not use, and is at least the largest finite
  ``max_bytes`` of that algorithm's rules (its buffer must hold every size the table routes to it).
- ``evidence`` may also carry: ``baseline`` (the backend the gain is measured against: nccl on
  GPU, gloo on CPU), ``run_ids`` (every run the table was fitted from), ``buffer_bytes`` (buffer
  memory of the table, max_size x world size summed), ``regret_max`` (the worst single size),
  ``sizes`` ([smallest, largest] measured bytes), ``weights`` ("log-uniform" or "workload:..."),
  ``rules_limit``, ``memory_budget`` (bytes or null), ``source`` ("fit" or "live"); from runs
  measured in rounds, ``rounds``, ``aa``, ``heldout``, ``validation``, ``per_rule`` and
  ``ties`` (`tuner.runtime.evidence_fields` says what each holds).
- ``numerics`` (optional, "any" where absent): "exact" where every rule's algorithm was
  measured following the reference arithmetic (rank-order sum, float32 accumulation, one
  rounding) at every size of its range, so every size range gives the same bits for the same
  element (`tuner fit --numerics exact`); "any" promises nothing about the arithmetic.
- ``generated_by`` is a free-form object (tool, version, time, command line).

Limits (``validate.LIMITS``; a file beyond one is refused naming the field, before anything is
built): the file at most 16 MiB; objects and lists nested at most 32 deep; at most 1,024 tables,
10,000 rules per table, and 64 distinct algorithm + params settings in the file (each is a
backend the dispatcher builds); every integer within +-2**53. ``rules[*].params`` values are
judged by the algorithm's ``BackendSpec.check_params`` (its knobs, their types and values).
Loading, validating and building the routes are linear in the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuner.runtime.validate import (
    DTYPES,
    LIMITS,
    MODES,
    NUMERICS,
    SCHEMA_VERSION,
    OutOfRange,
    TableError,
    check_document,
)

__all__ = [
    "SCHEMA_VERSION",
    "DTYPES",
    "LIMITS",
    "MODES",
    "NUMERICS",
    "TableError",
    "Rule",
    "Table",
    "Thresholds",
    "load",
    "loads",
    "from_json",
    "table_key",
]


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
    numerics: str = "any"  # the arithmetic guarantee: "exact" or "any" (NUMERICS)

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
        out = {
            "hardware_key": self.hardware_key,
            "world_size": self.world_size,
            "dtype": self.dtype,
            "mode": self.mode,
            "rules": [r.to_json() for r in self.rules],
            "max_size": dict(self.max_size),
            "evidence": dict(self.evidence),
        }
        if self.numerics != "any":  # absent means "any": files of before read back the same
            out["numerics"] = self.numerics
        return out


@dataclasses.dataclass(frozen=True)
class Thresholds:
    tables: tuple[Table, ...]
    generated_by: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def tables_for(self, hardware_key: str, world_size: int) -> list[tuple[int, Table]]:
        """(index in the file, table) of every table of exactly this hardware key and world
        size: the tables a process of that node and group follows."""
        return [
            (i, t)
            for i, t in enumerate(self.tables)
            if t.hardware_key == hardware_key and t.world_size == world_size
        ]

    def no_table(self, hardware_key: str, world_size: int, source: str) -> str:
        """The line for `tables_for` finding none: what was looked for, in which file, and what
        the file holds (the caller adds what it does instead)."""
        has = sorted({f"{t.hardware_key} ws{t.world_size}" for t in self.tables})
        return (
            f"no table for {hardware_key} world_size {world_size} in {source} "
            f"(it has: {', '.join(has) or 'no tables'})"
        )

    def find(self, hardware_key: str, world_size: int, dtype: str, mode: str) -> Table | None:
        wanted = table_key(hardware_key, world_size, dtype, mode)
        for table in self.tables:
            if table.key == wanted:
                return table
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "generated_by": dict(self.generated_by),
            "tables": [t.to_json() for t in self.tables],
        }

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


def from_json(obj: Any) -> Thresholds:
    """Validate a decoded JSON document, then build it; raises TableError naming the field."""
    check_document(obj)
    tables = tuple(
        Table(
            hardware_key=t["hardware_key"],
            world_size=t["world_size"],
            dtype=t["dtype"],
            mode=t["mode"],
            max_size=dict(t["max_size"]),
            evidence=dict(t["evidence"]),
            numerics=t.get("numerics", "any"),
            rules=tuple(
                Rule(r["max_bytes"], r["algorithm"], dict(r.get("params", {}))) for r in t["rules"]
            ),
        )
        for t in obj["tables"]
    )
    return Thresholds(
        tables=tables, generated_by=dict(obj["generated_by"]), schema_version=SCHEMA_VERSION
    )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise TableError(f"{key}: appears twice in one object")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise TableError(f"not JSON: {name} is not a JSON value")


def _int_or_out_of_range(text: str) -> int | OutOfRange:
    # 20 characters hold every integer the schema allows; longer is kept for the validator to
    # name its field (Python refuses int() of more than 4,300 digits, and it costs quadratic time)
    return int(text) if len(text) <= 20 else OutOfRange(text)


def loads(text: str, source: str = "thresholds.json") -> Thresholds:
    """Parse and validate; every error is one line starting with `source`."""
    try:
        if len(text) > LIMITS["file_bytes"] or len(text.encode()) > LIMITS["file_bytes"]:
            raise TableError(f"expected at most {LIMITS['file_bytes']} bytes, got more")
        try:
            obj = json.loads(
                text,
                object_pairs_hook=_no_duplicate_keys,
                parse_constant=_no_constants,
                parse_int=_int_or_out_of_range,
            )
        except json.JSONDecodeError as exc:
            raise TableError(
                f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        except RecursionError:
            raise TableError(f"nested deeper than {LIMITS['depth']} levels") from None
        return from_json(obj)
    except TableError as exc:
        raise TableError(f"{source}: {exc}") from None


def load(path: str | os.PathLike) -> Thresholds:
    path = Path(path)
    limit = LIMITS["file_bytes"]
    try:
        with path.open("rb") as stream:
            data = stream.read(limit + 1)  # never more than the limit, whatever the file holds
        if len(data) > limit:
            raise TableError(f"{path}: expected at most {limit} bytes, got more")
        text = data.decode()
    except FileNotFoundError:
        raise TableError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TableError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    return loads(text, source=str(path))
