"""`torch.ops.allreduce_autotune.all_reduce`: the dispatcher as a registered torch op.

A model calls `all_reduce(tensor)` (or the op itself) instead of `torch.distributed.all_reduce`
and the table decides, inside `torch.compile` graphs and CUDA graphs alike:

- the op is functional (out-of-place, as vLLM's `torch.ops.vllm.all_reduce`) with a fake
  implementation, so dynamo and AOT autograd trace it as one node: no graph break, no
  recompilation per size;
- the backend is chosen when the op runs: eagerly, once per call (a dict hit per byte size);
  during CUDA-graph capture, once, with the table's graph rules; a replay runs the captured
  kernels and does no host work at all;
- a process installs one dispatcher per group name at start-up (`install`, or `with
  serving(dispatcher):` to uninstall and release it at the end); every rank must
  install the same table (the engines' plugins check that), or ranks would pick different
  backends for one call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = [
    "install",
    "uninstall",
    "installed",
    "numerics",
    "serving",
    "all_reduce",
    "OP_NAME",
    "DEFAULT_GROUP",
]

OP_NAME = "allreduce_autotune::all_reduce"
DEFAULT_GROUP = "world"
# per group: (the dispatcher, its out-of-place call: `all_reduce_out`, else its in-place
# `all_reduce` on a copy)
_INSTALLED: dict[str, tuple[object, object]] = {}


def install(dispatcher, group: str = DEFAULT_GROUP) -> None:
    """Route the op's calls for `group` to `dispatcher` (a `tuner.runtime.dispatch.Dispatcher`, or
    anything with its `all_reduce`)."""
    out_of_place = getattr(dispatcher, "all_reduce_out", None)
    if out_of_place is None:

        def out_of_place(tensor: torch.Tensor) -> torch.Tensor:
            return dispatcher.all_reduce(tensor.clone())

    _INSTALLED[group] = (dispatcher, out_of_place)


def uninstall(group: str = DEFAULT_GROUP):
    """Forget `group`'s dispatcher and return it (the caller releases it)."""
    return _INSTALLED.pop(group, (None, None))[0]


def installed(group: str = DEFAULT_GROUP):
    return _INSTALLED.get(group, (None, None))[0]


def numerics(dtype: torch.dtype, mode: str = "eager", group: str = DEFAULT_GROUP) -> str:
    """The installed dispatcher's arithmetic guarantee for `dtype` in `mode` ("exact": the
    op gives an element the same bits whatever the message it travels in; "any"); "any" where
    none is installed."""
    dispatcher = installed(group)
    return "any" if dispatcher is None else dispatcher.numerics(dtype, mode)


@contextlib.contextmanager
def serving(dispatcher, group: str = DEFAULT_GROUP) -> Iterator:
    """`install(dispatcher, group)` for the block; on leaving it (also by an exception) the
    op forgets the group and the dispatcher releases its backends."""
    install(dispatcher, group)
    try:
        yield dispatcher
    finally:
        uninstall(group)
        dispatcher.release()


def _all_reduce(tensor: torch.Tensor, group: str) -> torch.Tensor:
    installed = _INSTALLED.get(group)
    if installed is None:
        raise RuntimeError(
            f"{OP_NAME}: no dispatcher installed for group {group!r} (call "
            "tuner.runtime.op.install(dispatcher, group) at start-up; installed: "
            f"{', '.join(sorted(_INSTALLED)) or 'none'})"
        )
    return installed[1](tensor)  # out of place: the caller's tensor stays as it was


def _all_reduce_fake(tensor: torch.Tensor, group: str) -> torch.Tensor:
    return torch.empty_like(tensor)


# A plain library definition rather than torch.library.custom_op: the same op for dynamo, AOT
# autograd and CUDA graphs, at ~3 us per eager call instead of ~9 us (measured side by side,
# scripts/op_overhead.py); one implementation for every device (CompositeExplicitAutograd)
_LIBRARY = torch.library.Library(OP_NAME.split("::")[0], "DEF")
_LIBRARY.define("all_reduce(Tensor tensor, str group) -> Tensor")
_LIBRARY.impl("all_reduce", _all_reduce, "CompositeExplicitAutograd")
torch.library.register_fake(OP_NAME)(_all_reduce_fake)


def all_reduce(tensor: torch.Tensor, group: str = DEFAULT_GROUP) -> torch.Tensor:
    """The sum of `tensor` over `group`'s ranks, as a new tensor, through the registered op."""
    return _OP(tensor, group)


_OP = torch.ops.allreduce_autotune.all_reduce.default
