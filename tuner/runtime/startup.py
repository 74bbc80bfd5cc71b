"""The dispatcher's start-up: from a thresholds table to ready routes (collective over a group).

1. the running hardware key (rank 0's fingerprint) picks the tables of exactly that key and the
   group's world size; none: every size goes to the floor (nccl on GPU, gloo on CPU), said once;
2. overrides (argument, else environment: `overrides`) reshape those tables;
3. the backends the tables use are built once per knob setting, each with a buffer of the
   largest size its rules route to it, agreed on by every rank (one that a rank cannot build is
   skipped on all, and named);
4. each (dtype, mode) gets a route: per rule, the chain of backends to try. A dtype or mode
   without a table of its own reuses another's rules, silently: a table from the default sweep
   (bfloat16 and float32) serves float16 so on every start; `Dispatcher.describe` and `tuner
   show` say which (`reuse_donor`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from bench.backends import floor_name, needs_buffer
from bench.dtypes import DTYPES as TORCH_DTYPES
from bench.run.context import broadcast_object, build_backend, make_context
from bench.run.hardware import fingerprint
from tuner.runtime.overrides import DEFAULT_MAX_BYTES, apply_max_bytes, parse_overrides
from tuner.runtime.route import Route, backend_key, build_route
from tuner.runtime.schema import DTYPES, MODES, Rule, Table, Thresholds

__all__ = ["Plan", "plan", "reuse_donor"]


class TorchFloor:
    """torch.distributed on the caller's group: the floor when the registry's cannot be built."""

    in_place = True

    def __init__(self, name: str, group) -> None:
        self.name, self._group = name, group

    def can_take(self, tensor: torch.Tensor) -> str | None:
        return None if tensor.is_contiguous() else "tensor is not contiguous"

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self._group)
        return tensor

    def release(self) -> None:
        self._group = None


@dataclasses.dataclass
class Plan:
    """What the dispatcher is built from."""

    ctx: Any
    floor: Any
    routes: dict[tuple[torch.dtype, str], Route]
    backends: dict[str, Any]  # "name" or "name{params}" -> backend
    hardware_key: str
    tables: tuple[Table, ...]
    notes: list[str]


def plan(
    thresholds: Thresholds,
    group=None,
    device=None,
    overrides: Mapping[str, Any] | None = None,
    timeout_s: float = 60.0,
    source: str = "thresholds",
) -> Plan:
    """Collective over `group`: every rank returns the same plan (see the module docstring)."""
    options = parse_overrides(overrides)
    ctx = make_context(group, device, timeout_s)

    hardware_key = broadcast_object(
        fingerprint(ctx.device.type)["hardware_key"] if ctx.rank == 0 else None, ctx.cpu_group
    )
    floor_of = floor_name(ctx.device.type)
    notes: list[str] = []
    found = thresholds.tables_for(hardware_key, ctx.world_size)
    if not found:
        no_table = thresholds.no_table(hardware_key, ctx.world_size, source)
        notes.append(f"{no_table}; using {floor_of} for every size")
    tables = _apply([t for _, t in found], options, hardware_key, ctx.world_size, floor_of)
    floor, reason = build_backend(floor_of, {}, _largest(tables), ctx, instance="floor")
    if floor is None:
        notes.append(f"floor {floor_of} unavailable ({reason}); using torch.distributed")
        floor = TorchFloor(floor_of, group or dist.group.WORLD)
    backends, limits = _build(tables, ctx, floor, floor_of, notes)
    routes = {
        (TORCH_DTYPES[t.dtype], t.mode): build_route(t, backends, limits, floor) for t in tables
    }
    modes = MODES if ctx.device.type == "cuda" else ("eager",)
    if routes:
        _reuse_for_missing(routes, modes)
    return Plan(ctx, floor, routes, backends, hardware_key, tuple(tables), notes)


def _apply(
    tables: list[Table],
    options: Mapping[str, Any],
    hardware_key: str,
    world_size: int,
    floor_of: str,
) -> list[Table]:
    if options["max_bytes"] or options["force"]:  # the rules measured are not the rules run
        tables = [dataclasses.replace(t, numerics="any") for t in tables]
    for name, nbytes in options["max_bytes"].items():
        tables = [apply_max_bytes(t, name, nbytes) for t in tables]
    forced = options["force"]
    if not forced:
        return tables
    if not tables:
        tables = [
            Table(hardware_key, world_size, "float32", "eager", (Rule(None, floor_of),), {}, {})
        ]
    size = (
        max(
            [t.max_size.get(forced, 0) for t in tables]
            + [r.max_bytes or 0 for t in tables for r in t.rules]
        )
        or DEFAULT_MAX_BYTES
    )
    return [
        dataclasses.replace(t, rules=(Rule(None, forced, {}),), max_size={forced: size})
        for t in tables
    ]


def _build(
    tables: Sequence[Table], ctx, floor, floor_of: str, notes: list[str]
) -> tuple[dict[str, Any], dict[str, int]]:
    """Every backend the rules name, once per knob setting, with the largest buffer any of its
    rules needs (the builder's memory model)."""
    wanted: dict[str, tuple[str, dict, int]] = {}
    for table in tables:
        for rule in table.rules:
            key = backend_key(rule)
            size = max(_instance_bytes(table, rule), wanted.get(key, ("", {}, 0))[2])
            wanted[key] = (rule.algorithm, dict(rule.params), size)
    backends: dict[str, Any] = {}
    for index, key in enumerate(sorted(wanted)):
        name, params, size = wanted[key]
        if name == floor_of and not params:
            backends[key] = floor
            continue
        backend, reason = build_backend(name, params, size, ctx, instance=str(index))
        if backend is None:
            notes.append(f"{key} unavailable here ({reason}); its sizes fall through")
        else:
            backends[key] = backend
    return backends, {key: size for key, (_, _, size) in wanted.items()}


def _largest(tables: Sequence[Table]) -> int:
    sizes = [t.evidence.get("sizes", [0, 0])[1] for t in tables if t.evidence.get("sizes")]
    sizes += [v for t in tables for v in t.max_size.values()]
    return max(sizes, default=0) or DEFAULT_MAX_BYTES


def _instance_bytes(table: Table, rule: Rule) -> int:
    """The buffer of a rule's backend: its upper end (the algorithm's max_size for the
    catch-all)."""
    if not needs_buffer(rule.algorithm):
        return _largest([table])
    return rule.max_bytes or table.max_size.get(rule.algorithm) or _largest([table])


def reuse_donor(have: Sequence[tuple[str, str]], dtype: str, mode: str) -> tuple[str, str]:
    """The (dtype, mode) whose rules a (dtype, mode) without a table of its own takes, of those
    that `have` one: another dtype in the same mode (bfloat16, float32, float16 in that
    order), else the same dtype in the other mode, else any (the backends' gates still apply)."""
    return (
        next(((d, mode) for d in ("bfloat16", "float32", "float16") if (d, mode) in have), None)
        or next((k for k in have if k[0] == dtype), None)
        or next(iter(have))
    )


def _reuse_for_missing(routes: dict[tuple, Route], modes: Sequence[str]) -> None:
    """Every (dtype, mode) without a table routed by `reuse_donor`'s (silently: the route's
    `source` names the rules it follows, and `Dispatcher.describe` says so)."""
    name_of = {v: k for k, v in TORCH_DTYPES.items()}
    have = [(name_of[d], m) for d, m in routes]
    for mode in modes:
        for dtype_name in DTYPES:
            dtype = TORCH_DTYPES[dtype_name]
            if (dtype, mode) not in routes:
                donor, donor_mode = reuse_donor(have, dtype_name, mode)
                routes[(dtype, mode)] = routes[(TORCH_DTYPES[donor], donor_mode)]
