"""The runtime dispatcher: thresholds.json in, one `all_reduce(tensor)` out.

At start-up (collective over the group) `Dispatcher.from_file(path, group=...)`:

1. reads the file (a bad file raises `TableError`, naming the field);
2. computes the running hardware key (rank 0, `bench.run.hardware.fingerprint`) and takes the
   tables of exactly that key and the group's world size; where there is none it warns once,
   naming what it looked for and what the file has, and every size goes to the floor (nccl on
   GPU, gloo on CPU);
3. applies overrides (argument, else environment):
   ``force``     one algorithm for every size (``ALLREDUCE_AUTOTUNE_FORCE=shm_one_shot``);
   ``max_bytes`` {algorithm: bytes}: that algorithm's (last) rule now ends at bytes, taking
                 sizes from the rules after it; an algorithm the table does not name takes every
                 size up to bytes (``ALLREDUCE_AUTOTUNE_MAX_BYTES=shm_one_shot=65536,...``);
4. builds only the backends the tables use, each once per knob setting, with the rule's params
   and a buffer of the largest size its rules route to it (the algorithm's max_size for the
   catch-all), agreed on by every rank (a backend one rank cannot build is skipped on all, and
   named in the one warning).

Per call: the table of the tensor's dtype and mode (graph while a CUDA graph is being
captured; a dtype without a table of its own uses another dtype's rules), a bisect over the
precomputed rule bounds, then each backend of the rule's chain (the rule's own, then those of
the following rules, then the floor) is tried: size <= its max_size, then its own `can_take`
gate (dtype, contiguity, alignment); the first that can, reduces. No host
synchronisation, no allocation (except a contiguous copy when even the floor's gate refuses a
non-contiguous tensor), nothing that breaks CUDA-graph capture. `last_backend` names the
backend that handled the last call, `calls` counts them per backend.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from bench.backends import params_key
from bench.run.context import broadcast_object, build_backend, make_context
from tuner.runtime.schema import BUFFERLESS, Rule, Table, Thresholds, load

__all__ = ["Dispatcher", "DispatchWarning", "OverrideError", "parse_overrides",
           "apply_max_bytes", "ENV_FORCE", "ENV_MAX_BYTES"]

ENV_FORCE = "ALLREDUCE_AUTOTUNE_FORCE"
ENV_MAX_BYTES = "ALLREDUCE_AUTOTUNE_MAX_BYTES"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_MAX_BYTES = 64 << 20  # a forced algorithm the table does not size
_NO_LIMIT = 1 << 62


class DispatchWarning(RuntimeWarning):
    """The dispatcher could not use (part of) the table and says what it does instead."""


class OverrideError(ValueError):
    """A bad override (one line, names the variable or argument)."""


def parse_overrides(overrides: Mapping[str, Any] | None = None,
                    environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """{"force": name | None, "max_bytes": {name: bytes}}; the argument wins over the
    environment, key by key."""
    from bench.backends import known_names
    from bench.sizes import parse_size

    environ = os.environ if environ is None else environ
    overrides = dict(overrides or {})
    unknown = set(overrides) - {"force", "max_bytes"}
    if unknown:
        raise OverrideError(f"overrides: unknown key {sorted(unknown)[0]!r} "
                            "(accepted: force, max_bytes)")
    known = known_names()
    force = overrides.get("force", environ.get(ENV_FORCE) or None)
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
        for part in filter(None, (p.strip() for p in environ.get(ENV_MAX_BYTES, "").split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise OverrideError(f"{ENV_MAX_BYTES}: expected ALGORITHM=BYTES[,...], "
                                    f"got {part!r}")
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
            return dataclasses.replace(table, rules=tuple(rules),
                                       max_size=_max_sizes(rules, table.max_size))
        params = rules[index].params
        head = rules[:index] + [Rule(nbytes, name, params)]
        tail = [r for r in rules[index + 1:] if r.max_bytes is None or r.max_bytes > nbytes]
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
    return "gloo" if table.hardware_key.startswith("cpu-") else "nccl"


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
        if rule.algorithm in BUFFERLESS:
            continue
        need = max(sizes.get(rule.algorithm, 0), rule.max_bytes or 0) or _DEFAULT_MAX_BYTES
        out[rule.algorithm] = max(out.get(rule.algorithm, 0), need)
    return out


class _TorchFloor:
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


class _Route:
    """One table's rules, ready for the per-call lookup: the finite bounds (increasing), per
    rule the (backend, max bytes) chain to try, and a cache of the chain per exact size (the
    sizes a model all-reduces repeat: a dict hit is cheaper than the bisect)."""

    __slots__ = ("bounds", "chains", "by_size")
    _CACHE_LIMIT = 4096

    def __init__(self, bounds: list[int], chains: tuple[tuple[Any, ...], ...]) -> None:
        self.bounds, self.chains = bounds, chains
        self.by_size: dict[int, tuple] = {}

    def chain_for(self, nbytes: int) -> tuple:
        chain = self.chains[_bisect(self.bounds, nbytes)]
        if len(self.by_size) < self._CACHE_LIMIT:
            self.by_size[nbytes] = chain
        return chain


_bisect = bisect.bisect_left
_capturing = torch.cuda.is_current_stream_capturing


class Dispatcher:
    """Routes each all-reduce to the backend its table names (see the module docstring)."""

    def __init__(self, ctx, floor, routes: Mapping[tuple, _Route], backends: Mapping[str, Any],
                 hardware_key: str, tables: Sequence[Table], notes: Sequence[str]) -> None:
        self.ctx = ctx
        self.floor = floor
        self.backends = dict(backends)  # "name" or "name[params]" -> backend
        self.hardware_key = hardware_key
        self.tables = tuple(tables)
        self.notes = tuple(notes)
        self._eager = {dtype: r for (dtype, mode), r in routes.items() if mode == "eager"}
        self._graph = {dtype: r for (dtype, mode), r in routes.items() if mode == "graph"}
        self._fallback = _Route([], (((floor, _NO_LIMIT),),))
        self._cuda = ctx.device.type == "cuda"
        self.last_backend: str | None = None
        self.calls: dict[str, int] = {}

    # -- start-up ---------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path, group=None, device=None, overrides: Mapping[str, Any] | None = None,
                  timeout_s: float = 60.0) -> Dispatcher:
        return cls.from_thresholds(load(path), group=group, device=device, overrides=overrides,
                                   timeout_s=timeout_s, source=str(path))

    @classmethod
    def from_thresholds(cls, thresholds: Thresholds, group=None, device=None,
                        overrides: Mapping[str, Any] | None = None, timeout_s: float = 60.0,
                        source: str = "thresholds") -> Dispatcher:
        from bench.run.hardware import fingerprint

        options = parse_overrides(overrides)
        ctx = make_context(group, device, timeout_s)
        hardware_key = broadcast_object(
            fingerprint(ctx.device.type)["hardware_key"] if ctx.rank == 0 else None,
            ctx.cpu_group)
        floor_name = "nccl" if ctx.device.type == "cuda" else "gloo"
        notes: list[str] = []
        tables = [t for t in thresholds.tables
                  if t.hardware_key == hardware_key and t.world_size == ctx.world_size]
        if not tables:
            has = sorted({f"{t.hardware_key} ws{t.world_size}" for t in thresholds.tables})
            notes.append(f"no table for {hardware_key} world_size {ctx.world_size} in {source} "
                         f"(it has: {', '.join(has) or 'no tables'}); using {floor_name} for "
                         "every size")
        for name, nbytes in options["max_bytes"].items():
            tables = [apply_max_bytes(t, name, nbytes) for t in tables]
        if options["force"] and not tables:
            tables = [Table(hardware_key, ctx.world_size, dtype, "eager", (Rule(None, floor_name),),
                            {}, {}) for dtype in ("float32",)]
        if options["force"]:
            forced = options["force"]
            size = max([t.max_size.get(forced, 0) for t in tables] +
                       [r.max_bytes or 0 for t in tables for r in t.rules]) or _DEFAULT_MAX_BYTES
            tables = [dataclasses.replace(t, rules=(Rule(None, forced, {}),),
                                          max_size={forced: size}) for t in tables]
        floor, reason = build_backend(floor_name, {}, _largest(tables), ctx, instance="floor")
        if floor is None:
            notes.append(f"floor {floor_name} unavailable ({reason}); using torch.distributed")
            floor = _TorchFloor(floor_name, group or dist.group.WORLD)
        backends: dict[str, Any] = {}
        wanted: dict[str, tuple[str, dict, int]] = {}
        for table in tables:
            for rule in table.rules:
                key = _backend_key(rule)
                size = _instance_bytes(table, rule)
                if key in wanted:
                    size = max(size, wanted[key][2])
                wanted[key] = (rule.algorithm, dict(rule.params), size)
        for index, key in enumerate(sorted(wanted)):
            name, params, size = wanted[key]
            if name == floor_name and not params:
                backends[key] = floor
                continue
            backend, reason = build_backend(name, params, size, ctx, instance=str(index))
            if backend is None:
                notes.append(f"{key} unavailable here ({reason}); its sizes fall through")
            else:
                backends[key] = backend
        limits = {key: size for key, (_, _, size) in wanted.items()}
        routes = {}
        for table in tables:
            routes[(_DTYPES[table.dtype], table.mode)] = _route(table, backends, limits, floor)
        _fill_missing_dtypes(routes)
        if notes and ctx.rank == 0:
            warnings.warn("allreduce-autotune dispatcher: " + "; ".join(notes), DispatchWarning,
                          stacklevel=3)
        return cls(ctx, floor, routes, backends, hardware_key, tables, notes)

    # -- per call ---------------------------------------------------------------------------

    def decide(self, tensor: torch.Tensor):
        """The backend that will reduce `tensor` (rule lookup + gates), None: the floor
        refuses it too (a non-contiguous tensor)."""
        routes = self._graph if (self._cuda and _capturing()) else self._eager
        route = routes.get(tensor.dtype, self._fallback)
        nbytes = tensor.nbytes
        chain = route.by_size.get(nbytes) or route.chain_for(nbytes)
        for backend, max_bytes in chain:
            if nbytes <= max_bytes and backend.can_take(tensor) is None:
                return backend
        return None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group; returns the result (possibly `tensor` itself)."""
        backend = self.decide(tensor)
        if backend is None:  # even the floor's gate refused: reduce a contiguous copy
            self._count(self.floor.name)
            flat = tensor.contiguous()
            out = self.floor.all_reduce(flat)
            tensor.copy_(out)
            return tensor
        self._count(backend.name)
        return backend.all_reduce(tensor)

    def _count(self, name: str) -> None:
        self.last_backend = name
        self.calls[name] = self.calls.get(name, 0) + 1

    def describe(self) -> list[str]:
        lines = [f"dispatcher for {self.hardware_key} world_size {self.ctx.world_size}: "
                 f"{len(self.tables)} table(s), backends {', '.join(self.backends) or 'none'}, "
                 f"floor {self.floor.name}"]
        lines += [f"  note: {n}" for n in self.notes]
        return lines

    def release(self) -> None:
        for backend in {id(b): b for b in [*self.backends.values(), self.floor]}.values():
            backend.release()
        self.backends.clear()

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _backend_key(rule: Rule) -> str:
    return rule.algorithm if not rule.params else f"{rule.algorithm}{params_key(rule.params)}"


def _largest(tables: Sequence[Table]) -> int:
    sizes = [t.evidence.get("sizes", [0, 0])[1] for t in tables if t.evidence.get("sizes")]
    sizes += [v for t in tables for v in t.max_size.values()]
    return max(sizes, default=0) or _DEFAULT_MAX_BYTES


def _instance_bytes(table: Table, rule: Rule) -> int:
    """The buffer of a rule's backend: its upper end (the algorithm's max_size for the
    catch-all); a backend serving several rules gets the largest (the builder's memory model)."""
    if rule.algorithm in BUFFERLESS:
        return _largest([table])
    return rule.max_bytes or table.max_size.get(rule.algorithm) or _largest([table])


def _route(table: Table, backends: Mapping[str, Any], limits: Mapping[str, int],
           floor) -> _Route:
    """Per rule, (backend, largest bytes it may take) to try in order: the rule's own, those
    of the following rules, then the floor (no size limit)."""
    bounds = [r.max_bytes for r in table.rules if r.max_bytes is not None]
    chains = []
    for i in range(len(table.rules)):
        chain: list[tuple[Any, int]] = []
        for rule in table.rules[i:]:
            backend = backends.get(_backend_key(rule))
            if backend is not None and backend is not floor and all(
                    b is not backend for b, _ in chain):
                limit = _NO_LIMIT if rule.algorithm in BUFFERLESS else limits[_backend_key(rule)]
                chain.append((backend, limit))
        chain.append((floor, _NO_LIMIT))
        chains.append(tuple(chain))
    return _Route(bounds, tuple(chains))


def _fill_missing_dtypes(routes: dict[tuple, _Route]) -> None:
    """A dtype without a table uses another dtype's rules of that mode (gates still apply)."""
    for mode in ("eager", "graph"):
        present = [d for d in (torch.bfloat16, torch.float32, torch.float16)
                   if (d, mode) in routes]
        other = [d for (d, m) in routes if m != mode]
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if (dtype, mode) in routes:
                continue
            if present:
                routes[(dtype, mode)] = routes[(present[0], mode)]
            elif (dtype, "eager" if mode == "graph" else "graph") in routes:
                routes[(dtype, mode)] = routes[(dtype, "eager" if mode == "graph" else "graph")]
            elif other:
                routes[(dtype, mode)] = routes[(other[0], "eager" if mode == "graph" else "graph")]
