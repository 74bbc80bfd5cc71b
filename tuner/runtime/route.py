"""The per-call structure: size ranges with a cached lookup (`SizeRoute`), and the
dispatcher's route (`Route`), whose ranges hold chains of links: (backend, the largest bytes
it may take, its out-of-place call), all fixed when the route is built (`build_route`).

A lookup (`route[nbytes]`) is one dict hit for a byte size seen before (the sizes a model all-reduces repeat:
cheaper than the bisect); a miss bisects the rule bounds and keeps the answer, up to a
bound on the cache. The dispatcher's route keeps, per size, only the links whose size limit
admits it: the limit is checked once per size, not per call (the backend's own gate still
checks its buffer on every call: one size check per call).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import torch

from bench.backends import WritesElsewhere, needs_buffer, params_key
from tuner.runtime.schema import Rule, Table

__all__ = ["SizeRoute", "Route", "Link", "build_route", "backend_key", "out_of_place", "NO_LIMIT"]

NO_LIMIT = 1 << 62
Value = TypeVar("Value")


class SizeRoute(dict[int, Value]):
    """Ordered size ranges, one value each: the finite upper bounds (increasing; the last
    range is the rest) and a value per range. `route[nbytes]` is the value of the range that
    holds `nbytes` (`for_size` may narrow it to that size): a dict of the sizes seen so far,
    filled on a miss (`__missing__`: the bisect), so a hit is one C-level dict lookup."""

    __slots__ = ("bounds", "values", "source")
    _CACHE_LIMIT = 4096

    def __init__(self, bounds: list[int], values: tuple[Value, ...], source: str = "") -> None:
        super().__init__()
        self.bounds, self.values, self.source = bounds, values, source

    def for_size(self, nbytes: int, value: Value) -> Value:
        """The range's value as one size sees it (here: as it is)."""
        return value

    def __missing__(self, nbytes: int) -> Value:
        value = self.for_size(nbytes, self.values[bisect.bisect_left(self.bounds, nbytes)])
        if len(self) < self._CACHE_LIMIT:
            self[nbytes] = value
        return value


class Link(NamedTuple):
    """One backend of a chain: the backend, the largest bytes it may take (its buffer;
    NO_LIMIT for one that reduces in the caller's tensor), and its out-of-place call."""

    backend: Any
    max_bytes: int
    out_of_place: Callable[[torch.Tensor], torch.Tensor]


class Route(SizeRoute[tuple[Link, ...]]):
    """A table's rules for the dispatcher: per range the chain of links to try in order; per
    size only the links whose limit admits it (the floor, without limit, ends every chain)."""

    __slots__ = ()

    def for_size(self, nbytes: int, value: tuple[Link, ...]) -> tuple[Link, ...]:
        return tuple(link for link in value if nbytes <= link.max_bytes)


def out_of_place(backend) -> Callable[[torch.Tensor], torch.Tensor]:
    """`tensor -> a new tensor holding the sum`, `tensor` left as it was (the gate has taken
    it): written into a new tensor where the backend can write elsewhere, the backend's own
    result where it returns a new tensor, else the sum of a copy."""
    if isinstance(backend, WritesElsewhere):
        return lambda tensor: backend.all_reduce_into(tensor, torch.empty_like(tensor))
    if not backend.in_place:
        return backend.all_reduce
    return lambda tensor: backend.all_reduce(tensor.clone())


def floor_route(floor) -> Route:
    """Every size to the floor: a dtype the tables do not cover."""
    return Route([], ((Link(floor, NO_LIMIT, out_of_place(floor)),),), source="floor")


def backend_key(rule: Rule) -> str:
    return rule.algorithm if not rule.params else f"{rule.algorithm}{params_key(rule.params)}"


def build_route(
    table: Table, backends: Mapping[str, Any], limits: Mapping[str, int], floor
) -> Route:
    """Per rule, the links to try in order: the rule's own backend, those of the following
    rules, then the floor (no size limit). Built from the last rule back: a rule's chain is
    its own backend before the next rule's chain (without it), so the work is linear in the
    rules (each chain holds at most one link per distinct backend)."""
    bounds = [r.max_bytes for r in table.rules if r.max_bytes is not None]
    chains: list[tuple[Link, ...]] = []
    after: tuple[Link, ...] = (Link(floor, NO_LIMIT, out_of_place(floor)),)
    for rule in reversed(table.rules):
        key = backend_key(rule)
        backend = backends.get(key)
        if backend is not None and backend is not floor:
            limit = limits[key] if needs_buffer(rule.algorithm) else NO_LIMIT
            own = Link(backend, limit, out_of_place(backend))
            after = (own, *(k for k in after if k.backend is not backend))
        chains.append(after)
    chains.reverse()
    return Route(bounds, tuple(chains), source=f"{table.dtype} {table.mode}")
