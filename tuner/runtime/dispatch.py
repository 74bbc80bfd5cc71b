"""The runtime dispatcher: thresholds.json in, one `all_reduce(tensor)` out.

At start-up (collective over the group) `Dispatcher.from_file(path, group=...)` reads the file
(a bad file raises `TableError`, naming the field), matches the running hardware key and world
size exactly, applies the operator's overrides and builds only the backends the rules use
(`startup` says how); whatever it could not use is said once, in one `DispatchWarning`.

Per call: the route of the tensor's dtype and mode (graph while a CUDA graph is being
captured), its chain of links for the byte size (`route[nbytes]`: a dict hit for sizes
seen before, else a bisect over the rule bounds keeping the links whose size limit admits the
size), then each link's backend gate (`can_take`, which checks its buffer: the one size check
of a call); the first that takes the tensor reduces. No host synchronisation, no allocation
(except a contiguous copy when even the floor refuses a non-contiguous tensor), nothing that
breaks CUDA-graph capture, and no bookkeeping unless asked (`count_calls=True`:
`last_backend`, `calls`).

In place or out of place: `all_reduce(tensor)` returns the sum, which may be `tensor` itself
(summed in place) or a new tensor (a backend that is not `in_place`): use the result, and do
not rely on `tensor` afterwards. `all_reduce_out(tensor)` (the registered op's call) returns
the sum as a new tensor and leaves `tensor` as it was: a backend that can write elsewhere
(`bench.backends.WritesElsewhere`) writes into a new tensor, one that returns a new tensor is
called as it is, any other reduces a copy; which of the three is fixed per link when the route
is built (`route.out_of_place`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from tuner.runtime.overrides import ENV_FORCE, ENV_MAX_BYTES, OverrideError
from tuner.runtime.route import Link, floor_route
from tuner.runtime.schema import Thresholds, load
from tuner.runtime.startup import Plan, plan

__all__ = ["Dispatcher", "DispatchWarning", "OverrideError", "ENV_FORCE", "ENV_MAX_BYTES"]

_capturing = torch.cuda.is_current_stream_capturing


class DispatchWarning(RuntimeWarning):
    """The dispatcher could not use (part of) the table and says what it does instead."""


class Dispatcher:
    """Routes each all-reduce to the backend its table names (see the module docstring)."""

    def __init__(self, built: Plan, count_calls: bool = False) -> None:
        self.ctx = built.ctx
        self.floor = built.floor
        self.backends = built.backends
        self.hardware_key = built.hardware_key
        self.tables = built.tables
        self.notes = tuple(built.notes)
        self._routes = built.routes
        self._eager = {dtype: r for (dtype, mode), r in built.routes.items() if mode == "eager"}
        self._graph = {dtype: r for (dtype, mode), r in built.routes.items() if mode == "graph"}
        self._fallback = floor_route(self.floor)
        self._cuda = self.ctx.device.type == "cuda"
        self.last_backend: str | None = None
        self.calls: dict[str, int] = {}
        # an instance attribute: the plain path keeps no books
        self._choose = self._link_counted if count_calls else self._link

    # -- start-up ---------------------------------------------------------------------------

    @classmethod
    def from_file(
        cls,
        path,
        group=None,
        device=None,
        overrides: Mapping[str, Any] | None = None,
        timeout_s: float = 60.0,
        count_calls: bool = False,
    ) -> Dispatcher:
        return cls.from_thresholds(
            load(path),
            group=group,
            device=device,
            overrides=overrides,
            timeout_s=timeout_s,
            source=str(path),
            count_calls=count_calls,
        )

    @classmethod
    def from_thresholds(
        cls,
        thresholds: Thresholds,
        group=None,
        device=None,
        overrides: Mapping[str, Any] | None = None,
        timeout_s: float = 60.0,
        source: str = "thresholds",
        count_calls: bool = False,
    ) -> Dispatcher:
        built = plan(
            thresholds,
            group=group,
            device=device,
            overrides=overrides,
            timeout_s=timeout_s,
            source=source,
        )
        if built.notes and built.ctx.rank == 0:
            warnings.warn(
                "allreduce-autotune dispatcher: " + "; ".join(built.notes),
                DispatchWarning,
                stacklevel=3,
            )
        return cls(built, count_calls=count_calls)

    # -- per call ---------------------------------------------------------------------------

    def decide(self, tensor: torch.Tensor):
        """The backend that will reduce `tensor` (rule lookup + gates), None: the floor
        refuses it too (a non-contiguous tensor)."""
        link = self._link(tensor)
        return None if link is None else link.backend

    def _link(self, tensor: torch.Tensor) -> Link | None:
        routes = self._graph if (self._cuda and _capturing()) else self._eager
        for link in routes.get(tensor.dtype, self._fallback)[tensor.nbytes]:
            if link.backend.can_take(tensor) is None:
                return link
        return None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group; returns the result (possibly `tensor` itself)."""
        link = self._choose(tensor)
        if link is None:
            return self._reduce_copy(tensor)
        return link.backend.all_reduce(tensor)

    def all_reduce_out(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the group as a new tensor; `tensor` is left as it was."""
        link = self._choose(tensor)
        if link is None:
            return self._reduce_copy(tensor.clone())
        return link.out_of_place(tensor)

    def _reduce_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """Even the floor's gate refused (not contiguous): reduce a contiguous copy."""
        out = self.floor.all_reduce(tensor.contiguous())
        tensor.copy_(out)
        return tensor

    def _link_counted(self, tensor: torch.Tensor) -> Link | None:
        link = self._link(tensor)
        name = (self.floor if link is None else link.backend).name
        self.last_backend = name
        self.calls[name] = self.calls.get(name, 0) + 1
        return link

    # -- inspection and teardown ------------------------------------------------------------

    def numerics(self, dtype: torch.dtype, mode: str = "eager") -> str:
        """The arithmetic the table promises for `dtype` in `mode`: "exact" where its own table
        was fitted with `tuner fit --numerics exact` (every size range gives an element the
        same bits: the all-reduce is batch-invariant) and no override reshaped it; "any"
        otherwise (no table of its own, another dtype's or mode's rules, an override, the
        floor for every size)."""
        name = str(dtype).removeprefix("torch.")
        for table in self.tables:
            if table.dtype == name and table.mode == mode:
                return table.numerics
        return "any"

    def describe(self) -> list[str]:
        """One line per (dtype, mode): its size ranges and the backends each tries, in the
        order the dispatcher tries them."""
        lines = [
            f"dispatcher for {self.hardware_key} world_size {self.ctx.world_size}: "
            f"{len(self.tables)} table(s), floor {self.floor.name}"
        ]
        for (dtype, mode), route in sorted(self._routes.items(), key=lambda kv: str(kv[0])):
            ranges, low = [], 0
            for i, chain in enumerate(route.values):
                high = route.bounds[i] if i < len(route.bounds) else None
                span = f"{low + 1}..{high}" if high is not None else f"> {low}"
                ranges.append(f"{span}: {' > '.join(link.backend.name for link in chain)}")
                low = high if high is not None else low
            name = str(dtype).removeprefix("torch.")
            via = "" if route.source == f"{name} {mode}" else f" (rules of {route.source})"
            exact = ", numerics exact" if self.numerics(dtype, mode) == "exact" else ""
            lines.append(f"  {name} {mode}{via}{exact}: " + "; ".join(ranges))
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
