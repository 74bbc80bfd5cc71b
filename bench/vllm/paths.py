"""vLLM's all-reduce paths: how each is gated and called, and vLLM's size tables grown in place.

A path is one of vLLM's communicators plus the setting that picks its algorithm. Read from
vLLM 0.34.0 (the same in 0.32.0); the attribute names are `CudaCommunicator`'s:

| path | vLLM object | vLLM's gate | call |
| --- | --- | --- | --- |
| `vllm_custom_ar` (+ `_one_shot`, `_two_shot`) | `ca_comm`: CustomAllreduce | `should_custom_ar`: fp32/fp16/bf16, bytes % 16, weakly contiguous, ws 2 or fully connected, ws <= 8, bytes < max_size (strict) | `custom_all_reduce` (the CUDA-graph aware entry); the one- or two-stage kernel forced through `VLLM_CUSTOM_ALLREDUCE_ALGO`, which vLLM's C++ reads on every launch (its only way in: see `_custom_call`) |
| `vllm_symm_mem_two_shot`, `vllm_symm_mem_multimem` | `symm_mem_comm`: SymmMemCommunicator | `should_use_symm_mem`: bf16 only, bytes % 4, bytes <= max_size (inclusive) | `all_reduce` of a copy of the communicator made when the route is built with `force_multimem` False / True (vLLM's constructor argument; vLLM's own object is never changed: `bind`) |
| `vllm_pynccl` | `pynccl_comm`: PyNcclCommunicator | not disabled (here also: contiguous, on its device) | `all_reduce` |
| `vllm_quick_reduce` | `qr_comm`: QuickAllReduce (ROCm MI300/MI350) | `should_quick_allreduce` | `quick_all_reduce` |
| `nccl` | `device_group` | none | `torch.distributed.all_reduce` on a copy: vLLM's own last resort |

Every call is out-of-place (the sum is a new tensor, the input is left as it was), as vLLM's
`CudaCommunicator.all_reduce` is. `run` returns None when the communicator is absent,
disabled or its gate declines: the caller falls back.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from bench.backends.base import scoped_env

__all__ = [
    "Path",
    "PATHS",
    "Communicators",
    "ALGO_ENV",
    "CUSTOM_AR_DEFAULT_MAX_SIZE",
    "accepts",
    "bind",
    "reduce",
    "run",
    "custom_ar_max_size",
    "symm_mem_max_size",
    "grow_max_sizes",
    "device_capability",
]

ALGO_ENV = "VLLM_CUSTOM_ALLREDUCE_ALGO"
# CustomAllreduce's constructor default; CudaCommunicator passes no max_size of its own
CUSTOM_AR_DEFAULT_MAX_SIZE = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Path:
    """One vLLM all-reduce path: the communicator (CudaCommunicator's attribute), the name of
    vLLM's gate (for reasons), and the algorithm setting, if any."""

    name: str
    communicator: str
    gate: str
    algo: str | None = None  # VLLM_CUSTOM_ALLREDUCE_ALGO for the call; None: vLLM's choice
    multimem: bool | None = None  # SymmMemCommunicator.force_multimem for the call


PATHS: dict[str, Path] = {
    p.name: p
    for p in (
        Path("vllm_custom_ar", "ca_comm", "should_custom_ar"),
        Path("vllm_custom_ar_one_shot", "ca_comm", "should_custom_ar", algo="1stage"),
        Path("vllm_custom_ar_two_shot", "ca_comm", "should_custom_ar", algo="2stage"),
        Path("vllm_symm_mem_two_shot", "symm_mem_comm", "should_use_symm_mem", multimem=False),
        Path("vllm_symm_mem_multimem", "symm_mem_comm", "should_use_symm_mem", multimem=True),
        Path("vllm_pynccl", "pynccl_comm", "disabled"),
        Path("vllm_quick_reduce", "qr_comm", "should_quick_allreduce"),
        Path("nccl", "device_group", "none"),
    )
}


@dataclasses.dataclass
class Communicators:
    """The vLLM objects a path may use, under CudaCommunicator's attribute names (so a
    CudaCommunicator itself serves wherever this does)."""

    ca_comm: Any = None
    symm_mem_comm: Any = None
    pynccl_comm: Any = None
    qr_comm: Any = None
    device_group: Any = None


def _custom_gate(ca, tensor: torch.Tensor) -> bool:
    return ca is not None and not ca.disabled and bool(ca.should_custom_ar(tensor))


def _symm_gate(symm, tensor: torch.Tensor) -> bool:
    return symm is not None and not symm.disabled and bool(symm.should_use_symm_mem(tensor))


def _pynccl_gate(pynccl, tensor: torch.Tensor) -> bool:
    return (
        pynccl is not None
        and not pynccl.disabled
        and tensor.is_contiguous()
        and tensor.device == pynccl.device
    )


def _quick_gate(quick, tensor: torch.Tensor) -> bool:
    return quick is not None and not quick.disabled and bool(quick.should_quick_allreduce(tensor))


def _nccl_gate(group, tensor: torch.Tensor) -> bool:
    return group is not None


def _custom_call(path: Path, ca, tensor: torch.Tensor):
    if path.algo is None:
        return ca.custom_all_reduce(tensor)
    # vLLM 0.34.0 offers no other way to pick the kernel: CustomAllreduce has no algorithm
    # argument and its C++ (`_C_stable_libtorch`) reads VLLM_CUSTOM_ALLREDUCE_ALGO at every
    # launch (captured: fixed in the graph). So the variable is set for the call and restored,
    # raise or not; ~3 us a call on the 2-core CPU box (scripts/vllm_algo_env_cost.py: 0.2 us
    # without it, 3.3 us with it, load ~3). Hazard: another thread
    # that reads the environment during the call sees the forced value (tests cover the
    # restore; tests/test_vllm_backends.py).
    with scoped_env({ALGO_ENV: path.algo}):
        return ca.custom_all_reduce(tensor)


# vLLM's SymmMemCommunicator -> {force_multimem: a shallow copy with it set}, made by `bind`
_SYMM_VARIANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _symm_variant(symm, multimem: bool | None):
    """`symm` itself where its force_multimem already says `multimem`, else a shallow copy
    that says it: the same buffer, group and handle (vLLM sets force_multimem only in its
    constructor and reads it per call), vLLM's own object untouched."""
    if multimem is None or symm.force_multimem == multimem:
        return symm
    variants = _SYMM_VARIANTS.setdefault(symm, {})
    variant = variants.get(multimem)
    if variant is None:
        variant = variants[multimem] = copy.copy(symm)
        variant.force_multimem = multimem
    return variant


def bind(paths: Iterable[Path], comms) -> None:
    """When a route is built over `comms`: every variant its paths will call made now (the
    symmetric-memory algorithm as vLLM's constructor argument), so a call changes nothing."""
    symm = getattr(comms, "symm_mem_comm", None)
    if symm is None:
        return
    for path in paths:
        if path.communicator == "symm_mem_comm":
            _symm_variant(symm, path.multimem)


def _symm_call(path: Path, symm, tensor: torch.Tensor):
    return _symm_variant(symm, path.multimem).all_reduce(tensor)


def _nccl_call(path: Path, group, tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.clone()
    dist.all_reduce(out, group=group)
    return out


_GATES: dict[str, Callable[[Any, torch.Tensor], bool]] = {
    "ca_comm": _custom_gate,
    "symm_mem_comm": _symm_gate,
    "pynccl_comm": _pynccl_gate,
    "qr_comm": _quick_gate,
    "device_group": _nccl_gate,
}
_CALLS: dict[str, Callable[[Path, Any, torch.Tensor], Any]] = {
    "ca_comm": _custom_call,
    "symm_mem_comm": _symm_call,
    "pynccl_comm": lambda path, pynccl, tensor: pynccl.all_reduce(tensor),
    "qr_comm": lambda path, quick, tensor: quick.quick_all_reduce(tensor),
    "device_group": _nccl_call,
}


def accepts(path: Path, comms, tensor: torch.Tensor) -> bool:
    """Whether the path's communicator exists, is enabled and its own gate takes `tensor`.
    Local and cheap (shape, dtype and the communicator's static state), so every rank of a
    group answers alike for the same call."""
    return _GATES[path.communicator](getattr(comms, path.communicator, None), tensor)


def reduce(path: Path, comms, tensor: torch.Tensor):
    """The sum of `tensor` over the group through `path` (the caller checked `accepts`)."""
    return _CALLS[path.communicator](path, getattr(comms, path.communicator), tensor)


def run(path: Path, comms, tensor: torch.Tensor):
    """The sum through `path`, or None when its communicator declines `tensor`."""
    comm = getattr(comms, path.communicator, None)
    if not _GATES[path.communicator](comm, tensor):
        return None
    return _CALLS[path.communicator](path, comm, tensor)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def custom_ar_max_size(largest_bytes: int) -> int:
    """CustomAllreduce takes bytes < max_size (strict) in 16-byte multiples: the smallest
    max_size that takes `largest_bytes`."""
    return _round_up(int(largest_bytes) + 1, 16)


def symm_mem_max_size(largest_bytes: int) -> int:
    """SymmMemCommunicator takes bytes <= max_size and holds max_size // 2 bf16 elements."""
    return _round_up(int(largest_bytes), 16)


def grow_max_sizes(
    capability: str, world_size: int, *, custom_ar: int | None = None, symm_mem: int | None = None
) -> list[str]:
    """Raise vLLM's max-size entries for (capability, world_size) to at least the given
    max_size values, in place (never rebinding: custom_all_reduce.py and symm_mem.py import the
    dicts by name, and read them when a communicator is constructed). Entries are never
    lowered. A symmetric-memory row or world size vLLM lacks is added (without one the
    communicator disables itself); a custom all-reduce row vLLM lacks is left out (without one
    there is no clamp: the constructor's max_size holds). One text per change."""
    from vllm.distributed.device_communicators import all_reduce_utils as utils

    changes = []
    for table_name, need, add_row in (
        ("CUSTOM_ALL_REDUCE_MAX_SIZES", custom_ar, False),
        ("SYMM_MEM_ALL_REDUCE_MAX_SIZES", symm_mem, True),
    ):
        table = getattr(utils, table_name)
        if need is None or (capability not in table and not add_row):
            continue
        row = table.setdefault(capability, {})
        old = row.get(world_size)
        if old is None or old < need:
            row[world_size] = need
            changes.append(f"{table_name}[{capability!r}][{world_size}] {old} -> {need}")
    return changes


def device_capability() -> str | None:
    """The capability vLLM keys its tables by ("9.0"), None where it knows none (CPU)."""
    from vllm.platforms import current_platform

    capability = current_platform.get_device_capability()
    return None if capability is None else capability.as_version_str()
