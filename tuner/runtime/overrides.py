"""Operator overrides of a thresholds table at start-up, by argument or environment.

``force``      one algorithm for every size (``ALLREDUCE_AUTOTUNE_FORCE=shm_one_shot``);
``max_bytes``  {algorithm: bytes}: that algorithm's (last) rule now ends at bytes, taking sizes
               from the rules after it; an algorithm the table does not name takes every size
               up to bytes (``ALLREDUCE_AUTOTUNE_MAX_BYTES=shm_one_shot=65536,...``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from bench.backends import floor_name, known_names, needs_buffer
from bench.environment import get
from bench.run.hardware import device_of_key
from bench.sizes import parse_size
from tuner.runtime.schema import Rule, Table

__all__ = [
    "OverrideError",
    "parse_overrides",
    "apply_max_bytes",
    "ENV_FORCE",
    "ENV_MAX_BYTES",
    "DEFAULT_MAX_BYTES",
]

ENV_FORCE = "ALLREDUCE_AUTOTUNE_FORCE"
ENV_MAX_BYTES = "ALLREDUCE_AUTOTUNE_MAX_BYTES"
DEFAULT_MAX_BYTES = 64 << 20  # the buffer of a forced algorithm the table does not size


class OverrideError(ValueError):
    """A bad override (one line, names the variable or argument)."""


def parse_overrides(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """{"force": name | None, "max_bytes": {name: bytes}}; the argument wins over the
    environment, key by key."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - {"force", "max_bytes"}
    if unknown:
        raise OverrideError(
            f"overrides: unknown key {sorted(unknown)[0]!r} (accepted: force, max_bytes)"
        )
    known = known_names()
    force = overrides.get("force", get(ENV_FORCE, environ) or None)
    where = "overrides['force']" if "force" in overrides else ENV_FORCE
    if force is not None and force not in known:
        raise OverrideError(f"{where}: unknown algorithm {force!r} (known: {', '.join(known)})")
    if "max_bytes" in overrides:
        raw, where = overrides["max_bytes"] or {}, "overrides['max_bytes']"
        if not isinstance(raw, Mapping):
            raise OverrideError(f"{where}: expected a dict of algorithm: bytes")
        items = list(raw.items())
    else:
        where = ENV_MAX_BYTES
        items = []
        for part in filter(
            None, (p.strip() for p in (get(ENV_MAX_BYTES, environ) or "").split(","))
        ):
            name, sep, value = part.partition("=")
            if not sep:
                raise OverrideError(
                    f"{ENV_MAX_BYTES}: expected ALGORITHM=BYTES[,...], got {part!r}"
                )
            items.append((name.strip(), value.strip()))
    max_bytes: dict[str, int] = {}
    for name, value in items:
        if name not in known:
            raise OverrideError(f"{where}: unknown algorithm {name!r} (known: {', '.join(known)})")
        try:
            max_bytes[name] = parse_size(value)
        except ValueError as exc:
            raise OverrideError(f"{where}: {name}: {exc}") from None
    return {"force": force, "max_bytes": max_bytes}


def apply_max_bytes(table: Table, name: str, nbytes: int) -> Table:
    """`name` takes every size up to `nbytes` from its (last) rule's start; rules it then covers
    entirely go; a catch-all it shortens hands the rest to the floor's place (a new catch-all
    of the next rule, or the table's last algorithm). Not in the table: it takes 0..nbytes."""
    rules = list(table.rules)
    mine = [i for i, r in enumerate(rules) if r.algorithm == name]
    if mine:
        index = mine[-1]
        start = rules[index - 1].max_bytes if index else 0
        if nbytes <= start:  # empty range: the rule goes
            del rules[index]
            if index == len(rules):  # it was the catch-all: the one before takes over
                last = rules[-1]
                rules[-1] = Rule(None, last.algorithm, last.params)
            rules = _dedupe(rules)
            return dataclasses.replace(
                table, rules=tuple(rules), max_size=_max_sizes(rules, table.max_size)
            )
        params = rules[index].params
        head = rules[:index] + [Rule(nbytes, name, params)]
        tail = [r for r in rules[index + 1 :] if r.max_bytes is None or r.max_bytes > nbytes]
        if rules[index].max_bytes is None:  # it was the catch-all: the floor takes the rest
            tail = [Rule(None, _floor_name(table), {})]
        rules = head + tail
    else:
        tail = [r for r in rules if r.max_bytes is None or r.max_bytes > nbytes]
        rules = [Rule(nbytes, name, {})] + tail
    rules = _dedupe(rules)
    sizes = dict(table.max_size)
    sizes[name] = max(sizes.get(name, 0), nbytes)
    return dataclasses.replace(table, rules=tuple(rules), max_size=_max_sizes(rules, sizes))


def _floor_name(table: Table) -> str:
    return floor_name(device_of_key(table.hardware_key))


def _dedupe(rules: list[Rule]) -> list[Rule]:
    out: list[Rule] = []
    for rule in rules:
        if out and out[-1].algorithm == rule.algorithm and out[-1].params == rule.params:
            out[-1] = rule
        else:
            out.append(rule)
    return out


def _max_sizes(rules: Sequence[Rule], sizes: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for rule in rules:
        if not needs_buffer(rule.algorithm):
            continue
        need = max(sizes.get(rule.algorithm, 0), rule.max_bytes or 0) or DEFAULT_MAX_BYTES
        out[rule.algorithm] = max(out.get(rule.algorithm, 0), need)
    return out
