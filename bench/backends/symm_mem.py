"""`symm_mem_one_shot`, `symm_mem_two_shot`, `symm_mem_multimem`: PyTorch symmetric memory.

One buffer per group, allocated once at the backend's max size with
`torch.distributed._symmetric_memory.empty` and exchanged with `rendezvous` over a NCCL process
group of the sweep's ranks. Each all-reduce copies its input into the buffer and runs
`torch.ops.symm_mem.one_shot_all_reduce_out` (sum written straight into the input tensor),
`two_shot_all_reduce_` or `multimem_all_reduce_` (in the buffer, then copied back), as vLLM's
symmetric-memory communicator does. The ops are CUDA-graph capturable.

Multimem needs NVLink multicast: when TORCH_SYMM_MEM_DISABLE_MULTICAST is set, or the device
has no multicast support, or the rendezvous handle carries no multicast pointer, it is skipped
with the reason "no NVLink multicast". This module never creates multicast objects itself.
PyTorch refuses ranks that share a GPU ("allocations from overlapping devices"), so those skip.
"""

from __future__ import annotations

import datetime
import warnings

import torch
import torch.distributed as dist

from bench.backends import get_spec, register
from bench.backends.base import BackendSpec, CommContext
from bench.backends.gpu_gate import cuda_reason, device_index, one_gpu_per_rank_reason
from bench.environment import multicast_off

_DTYPES = (torch.float32, torch.bfloat16)
_ALIGNMENT = 16  # the ops load and store 16-byte vectors
_OPS = {
    "one_shot": "one_shot_all_reduce_out",
    "two_shot": "two_shot_all_reduce_",
    "multimem": "multimem_all_reduce_",
}


class BackendUnavailable(RuntimeError):
    """Raised by create() when the group cannot run this algorithm; the message is the reason."""


def _symm_module():
    import torch.distributed._symmetric_memory as symm_mem

    return symm_mem


def _enable_for_group(symm_mem, group_name: str) -> None:
    """Older torch needs the group registered; newer deprecates (and ignores) the call."""
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    enabled = getattr(symm_mem, "is_symm_mem_enabled_for_group", None)
    if enable is None or (enabled is not None and enabled(group_name)):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable(group_name)


class SymmMemAllReduce:
    in_place = True

    def __init__(self, ctx: CommContext, max_bytes: int | None, algorithm: str) -> None:
        self.name = f"symm_mem_{algorithm}"
        self.algorithm = algorithm
        self.device = ctx.device
        self._index = device_index(ctx.device)
        self._op = getattr(torch.ops.symm_mem, _OPS[algorithm])
        symm_mem = _symm_module()
        self._group = dist.new_group(
            backend="nccl", timeout=datetime.timedelta(seconds=ctx.timeout_s)
        )
        self.group_name = self._group.group_name
        try:
            _enable_for_group(symm_mem, self.group_name)
            nbytes = -(-max(int(max_bytes or 0), _ALIGNMENT) // _ALIGNMENT) * _ALIGNMENT
            self._max_bytes = nbytes
            self._gate = get_spec(self.name).gate(nbytes, self._index)
            self._buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._handle = symm_mem.rendezvous(self._buffer, self.group_name)
            self.multicast_ptr = int(getattr(self._handle, "multicast_ptr", 0) or 0)
            if algorithm == "multimem" and not self.multicast_ptr:
                raise BackendUnavailable(
                    "no NVLink multicast (the rendezvous handle has no multicast pointer)"
                )
            self._warm_up(ctx.world_size)
        except Exception:
            self.release()
            raise

    def _warm_up(self, world_size: int) -> None:
        """One small all-reduce per dtype, so an op that refuses this group fails here (a
        skip reason) rather than in the middle of a sweep."""
        for dtype in _DTYPES:
            count = min(1024, self._max_bytes // torch.empty((), dtype=dtype).element_size())
            probe = torch.ones(count, dtype=dtype, device=self.device)
            self.all_reduce(probe)
            torch.cuda.synchronize(self.device)
            if probe[0].item() != world_size:
                raise RuntimeError(
                    f"{self.name} warm-up gave {probe[0].item()}, expected {world_size}"
                )

    def can_take(self, tensor: torch.Tensor) -> str | None:
        return self._gate(tensor)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_into(tensor, tensor)

    def all_reduce_into(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Staged through the symmetric buffer; the sum written into `out` (may be `tensor`).
        No second gate: the caller took `can_take` first."""
        staged = self._buffer[: tensor.nbytes].view(tensor.dtype)
        staged.copy_(tensor.reshape(-1))
        if self.algorithm == "one_shot":
            self._op(staged, "sum", self.group_name, out.view(-1))  # the out argument
        else:
            self._op(staged, "sum", self.group_name)
            out.view(-1).copy_(staged)
        return out

    def release(self) -> None:
        self._handle = None
        self._buffer = None
        if getattr(self, "_group", None) is not None:
            group, self._group = self._group, None
            torch.cuda.synchronize(self.device)
            dist.destroy_process_group(group)


def _probe(algorithm: str):
    name = f"symm_mem_{algorithm}"

    def probe(ctx: CommContext) -> str | None:
        reason = cuda_reason(ctx, name)
        switch = multicast_off() if reason is None and algorithm == "multimem" else None
        if switch:
            reason = f"no NVLink multicast ({switch}: kept off on this machine)"
        reason = reason or one_gpu_per_rank_reason(ctx, "PyTorch symmetric memory")
        if reason:
            return reason
        if not ctx.same_host or ctx.nnodes > 1:
            return f"{name} needs all ranks on one host ({ctx.nnodes} hosts)"
        try:
            symm_mem = _symm_module()
        except Exception as exc:
            return f"torch {torch.__version__} has no symmetric memory ({type(exc).__name__})"
        if not hasattr(torch.ops.symm_mem, _OPS[algorithm]):
            return f"torch {torch.__version__} has no torch.ops.symm_mem.{_OPS[algorithm]}"
        if not dist.is_nccl_available():
            return f"torch {torch.__version__} was built without NCCL (the group's backend)"
        if algorithm == "multimem":
            from torch._C._autograd import DeviceType

            index = ctx.device.index if ctx.device.index is not None else 0
            if not symm_mem._SymmetricMemory.has_multicast_support(DeviceType.CUDA, index):
                return f"no NVLink multicast on {ctx.device} (device or driver lacks it)"
        return None

    return probe


def _create(algorithm: str):
    def create(ctx: CommContext, max_bytes: int | None, **params) -> SymmMemAllReduce:
        return SymmMemAllReduce(ctx, max_bytes, algorithm, **params)

    return create


# one_shot: every rank reads all peers' buffers and sums; two_shot: reduce-scatter then
# all-gather over peer buffers; multimem: NVLink multicast loads/stores (needs NVLS)
for _algorithm in ("one_shot", "two_shot", "multimem"):
    register(
        BackendSpec(
            name=f"symm_mem_{_algorithm}",
            device="cuda",
            probe=_probe(_algorithm),
            create=_create(_algorithm),
            dtypes=_DTYPES,
            alignment=_ALIGNMENT,
        )
    )
