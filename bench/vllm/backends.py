"""vLLM's own all-reduce communicators as plug-in backends of `bench sweep`.

Registered through the entry point group `allreduce_autotune.backends` (pyproject.toml)
whether vLLM is installed or not: without it every probe says so, and a table may still name
these algorithms (tuned elsewhere). Each backend builds one of vLLM's communicators over the
sweep's gloo group, as vLLM's `CudaCommunicator` does over its CPU group, and calls it the way
vLLM does (`bench.vllm.paths`):

| name | vLLM object | needs (probed; the reason is recorded where one is missing) |
| --- | --- | --- |
| `vllm_custom_ar`, `vllm_custom_ar_one_shot`, `vllm_custom_ar_two_shot` | CustomAllreduce, max_size just above the sweep's largest size | vLLM's CUDA library, world size 2/4/6/8, one GPU per rank on one host; vLLM checks P2P and NVLink at construction |
| `vllm_symm_mem_two_shot`, `vllm_symm_mem_multimem` | SymmMemCommunicator with force_multimem and max_size_override | NVLink multicast, even for two-shot: vLLM disables the communicator when the rendezvous gives no multicast pointer. Skipped where the machine keeps multicast off (TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NCCL_NVLS_ENABLE=0 or NVSHMEM_DISABLE_NVLS=1), else probed with this project's own `symm_mem_multimem` probe (the driver's answer): never by creating a multicast object |
| `vllm_pynccl` | PyNcclCommunicator | libnccl (vLLM finds it), one GPU per rank |
| `vllm_quick_reduce` | QuickAllReduce | ROCm MI300/MI350 and VLLM_ROCM_QUICK_REDUCE_QUANTIZATION set (vLLM's default, NONE, turns it off) |

Graph mode times `custom_all_reduce` outside vLLM's own `capture()` context: the staged path
(one copy into the IPC buffer); inside vLLM's graph capture it reads the captured buffers
in place and saves that copy.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util

import torch

from bench.backends import get_spec, register
from bench.backends.base import BackendSpec, CommContext
from bench.backends.gpu_gate import cuda_reason, device_index, one_gpu_per_rank_reason
from bench.environment import get, multicast_off
from bench.vllm.paths import (
    PATHS,
    Communicators,
    Path,
    accepts,
    bind,
    custom_ar_max_size,
    device_capability,
    grow_max_sizes,
    reduce,
    symm_mem_max_size,
)

__all__ = ["VllmAllReduce", "NAMES", "vllm_missing", "multicast_off_reason"]

_MODULE = "vllm.distributed.device_communicators."
_HALF = (torch.float16, torch.bfloat16)
_ALL = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class _Family:
    """One of vLLM's communicator classes, as its paths' specs state it."""

    cls: str  # the class name in vLLM's module
    module: str  # under vllm.distributed.device_communicators
    dtypes: tuple[torch.dtype, ...]
    alignment: int  # bytes
    needs_buffer: bool
    world_sizes: tuple[int, ...] | None = None  # None: any


# CudaCommunicator's attribute -> the family
_FAMILIES = {
    "ca_comm": _Family("CustomAllreduce", "custom_all_reduce", _ALL, 16, True, (2, 4, 6, 8)),
    "symm_mem_comm": _Family("SymmMemCommunicator", "symm_mem", (torch.bfloat16,), 4, True),
    "pynccl_comm": _Family("PyNcclCommunicator", "pynccl", _ALL, 1, False),
    "qr_comm": _Family("QuickAllReduce", "quick_all_reduce", _HALF, 16, True, (2, 4, 8)),
}
NAMES = tuple(name for name, path in PATHS.items() if path.communicator in _FAMILIES)
QUICK_REDUCE_ENV = "VLLM_ROCM_QUICK_REDUCE_QUANTIZATION"


def vllm_missing() -> str | None:
    """Why vLLM cannot be used here (not installed), or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm; see docs/vllm.md)"
    return None


def multicast_off_reason(environ=None) -> str | None:
    """The machine keeps NVLink multicast off (`bench.environment.multicast_off`: the three
    variables are exported together there): vLLM's symmetric memory must not be built, its
    rendezvous would create multicast objects."""
    switch = multicast_off(environ)
    return f"no NVLink multicast ({switch}: kept off on this machine)" if switch else None


def _module(path: Path):
    return importlib.import_module(_MODULE + _FAMILIES[path.communicator].module)


class VllmAllReduce:
    """One vLLM communicator driven through one path; out-of-place, as vLLM calls it."""

    in_place = False

    def __init__(
        self, path: Path, comms: Communicators, max_bytes: int, device: torch.device
    ) -> None:
        self.name = path.name
        self.max_bytes = max_bytes
        self._path, self._comms = path, comms
        self._comm = getattr(comms, path.communicator)
        bind([path], comms)  # built with the path's algorithm already: nothing to change
        # the spec's checks (dtypes, alignment from _FAMILIES), then vLLM's own gate
        self._gate = get_spec(path.name).gate(max_bytes, device_index(device))

    def can_take(self, tensor: torch.Tensor) -> str | None:
        reason = self._gate(tensor)
        if reason is None and not accepts(self._path, self._comms, tensor):
            reason = f"vLLM's {type(self._comm).__name__}.{self._path.gate} declines it"
        return reason

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return reduce(self._path, self._comms, tensor)

    def release(self) -> None:
        comm, self._comm = self._comm, None
        if comm is None:
            return
        for verb in ("close", "destroy"):  # CustomAllreduce/QuickAllReduce, PyNccl
            if callable(getattr(comm, verb, None)):
                getattr(comm, verb)()
                break
        setattr(self._comms, self._path.communicator, None)


def _family_reason(path: Path, ctx: CommContext) -> str | None:
    family = _FAMILIES[path.communicator]
    cls, module, sizes = family.cls, family.module, family.world_sizes
    if sizes and ctx.world_size not in sizes:
        return (
            f"vLLM's {cls} takes world sizes {', '.join(map(str, sizes))} "
            f"(this sweep has {ctx.world_size})"
        )
    if path.communicator != "pynccl_comm" and (ctx.nnodes > 1 or not ctx.same_host):
        return f"vLLM's {cls} needs every rank on one host ({ctx.nnodes} hosts)"
    if path.communicator == "symm_mem_comm":
        reason = multicast_off_reason() or get_spec("symm_mem_multimem").probe(ctx)
        if reason:
            return f"vLLM's {cls} needs NVLink multicast, even for two-shot: {reason}"
    try:
        loaded = _module(path)
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return f"vLLM's {module} does not import here ({text})"
    flag = {"ca_comm": "custom_ar", "qr_comm": "quick_ar"}.get(path.communicator)
    if flag and not getattr(loaded, flag, False):
        return f"vLLM's {cls} library did not load (vllm._C ops missing: not a GPU build?)"
    if path.communicator == "qr_comm" and (get(QUICK_REDUCE_ENV) or "NONE").upper() == "NONE":
        return (
            f"vLLM's {cls} is off: {QUICK_REDUCE_ENV} is NONE (vLLM's default); set FP, "
            "INT8, INT6 or INT4"
        )
    return None


def _probe(path: Path):
    def probe(ctx: CommContext) -> str | None:
        reason = vllm_missing()
        if reason is None and path.communicator == "qr_comm":
            if ctx.device.type != "cuda":
                reason = (
                    f"{path.name} needs a ROCm GPU (AMD MI300/MI350); this sweep runs on "
                    f"{ctx.device.type}"
                )
            elif torch.version.hip is None:
                reason = (
                    f"{path.name} runs on ROCm only (AMD MI300/MI350); torch "
                    f"{torch.__version__} is a CUDA build"
                )
        reason = (
            reason
            or cuda_reason(ctx, path.name)
            or one_gpu_per_rank_reason(ctx, f"vLLM's {_FAMILIES[path.communicator].cls}")
        )
        return reason or _family_reason(path, ctx)

    return probe


def _build(path: Path, ctx: CommContext, max_bytes: int):
    cls = getattr(_module(path), _FAMILIES[path.communicator].cls)
    group, device = ctx.cpu_group, ctx.device
    if path.communicator == "ca_comm":
        return cls(group=group, device=device, max_size=custom_ar_max_size(max_bytes))
    if path.communicator == "symm_mem_comm":
        size = symm_mem_max_size(max_bytes)
        capability = device_capability()
        if capability:  # without a row for this capability the communicator stays off
            grow_max_sizes(capability, ctx.world_size, symm_mem=size)
        return cls(group=group, device=device, force_multimem=path.multimem, max_size_override=size)
    return cls(group=group, device=device)


def _create(path: Path):
    def create(ctx: CommContext, max_bytes: int | None, **params) -> VllmAllReduce:
        comm = _build(path, ctx, max(int(max_bytes or 0), 16))
        backend = VllmAllReduce(
            path,
            Communicators(**{path.communicator: comm}),
            int(max_bytes or 0) or None,
            ctx.device,
        )
        if comm.disabled:
            backend.release()
            raise RuntimeError(
                f"vLLM's {type(comm).__name__} disabled itself (its log line above says why)"
            )
        return backend

    return create


for _name in NAMES:
    _path = PATHS[_name]
    _family = _FAMILIES[_path.communicator]
    register(
        BackendSpec(
            name=_name,
            device="cuda",
            probe=_probe(_path),
            create=_create(_path),
            dtypes=_family.dtypes,
            alignment=_family.alignment,
            needs_buffer=_family.needs_buffer,
        )
    )
