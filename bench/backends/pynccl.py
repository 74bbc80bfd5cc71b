"""`pynccl` and `pynccl_symm`: the project's own ctypes binding of libnccl.

Rank 0 calls ncclGetUniqueId and broadcasts it over the CPU (gloo) group; every rank calls
ncclCommInitRank on its own GPU; a small warm-up all-reduce checks the communicator. Each
all-reduce is enqueued on the current torch CUDA stream, so it can be captured in a CUDA graph.

Knobs: `ctas` bounds NCCL's CTAs through ncclConfig_t (minCTAs = maxCTAs; 0 = NCCL's choice).
`algo` and `proto` set NCCL_ALGO / NCCL_PROTO only while this communicator is created: NCCL
reads them when it builds the communicator's tuning model (ncclTopoTuneModel, at init), so the
choice is per communicator. At world size 1 NCCL runs no algorithm at all, so they have no effect.

`pynccl_symm` runs on a buffer from ncclMemAlloc registered as a symmetric window
(ncclCommWindowRegister with NCCL_WIN_COLL_SYMMETRIC, NCCL >= 2.27), where NCCL can pick its
symmetric kernels. The input is copied in and the sum copied out, as serving engines do with
their registered buffers; the copies are in the timed region.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bench.backends import get_spec, register
from bench.backends.base import BackendSpec, CommContext
from bench.backends.gpu_gate import cuda_reason, device_index, one_gpu_per_rank_reason
from bench.backends.libnccl import (
    ALGOS,
    CTAS,
    PROTOS,
    WIN_COLL_SYMMETRIC,
    NcclLibrary,
    NcclLoadError,
    algo_proto_env,
    load_library,
    nccl_dtype,
)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_WINDOW_ALIGN_BYTES = 4096  # NCCL_WIN_REQUIRED_ALIGNMENT


class _CudaArray:
    """`__cuda_array_interface__` over raw device bytes, so torch can alias NCCL's memory."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 2,
            "strides": None,
        }


class PyNcclAllReduce:
    """One NCCL communicator over the group, driven through ctypes."""

    name = "pynccl"
    in_place = True

    def __init__(
        self,
        ctx: CommContext,
        max_bytes: int | None = None,
        *,
        ctas: int = 0,
        algo: str = "default",
        proto: str = "default",
    ) -> None:
        self.device = ctx.device
        self._index = device_index(ctx.device)
        self.lib: NcclLibrary = load_library()
        self.comm = 0
        self._max_bytes: int | None = None
        self._gate = get_spec(self.name).gate(None, self._index)
        payload = torch.zeros(128, dtype=torch.uint8)
        if ctx.rank == 0:
            payload.copy_(torch.frombuffer(bytearray(self.lib.unique_id()), dtype=torch.uint8))
        src = dist.get_global_rank(ctx.cpu_group, 0) if ctx.cpu_group is not None else 0
        dist.broadcast(payload, src=src, group=ctx.cpu_group)
        with torch.cuda.device(self.device), algo_proto_env(algo, proto):
            self.comm = self.lib.comm_init_rank(
                ctx.world_size, bytes(payload.tolist()), ctx.rank, min_ctas=ctas, max_ctas=ctas
            )
        self._check_warm_up(ctx.world_size)

    def _check_warm_up(self, world_size: int) -> None:
        warm = torch.ones(16, dtype=torch.float32, device=self.device)
        self._launch(warm, warm)
        torch.cuda.synchronize(self.device)
        if warm[0].item() != world_size:
            raise RuntimeError(
                f"pynccl warm-up all-reduce gave {warm[0].item()}, expected {world_size}"
            )

    def can_take(self, tensor: torch.Tensor) -> str | None:
        return self._gate(tensor)

    def _launch(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        # no per-call checks: the caller took `can_take` (device, dtype, size) first
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self.lib.all_reduce(
            send.data_ptr(),
            recv.data_ptr(),
            send.numel(),
            nccl_dtype(send.dtype),
            self.comm,
            stream,
        )

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_into(tensor, tensor)

    def all_reduce_into(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the group written into `out` (may be `tensor`; else made
        like it: no per-call checks)."""
        if not self.comm:
            raise RuntimeError(f"{self.name}: communicator released")
        self._launch(tensor, out)
        return out

    def release(self) -> None:
        if not self.comm:
            return
        comm, self.comm = self.comm, 0
        with torch.cuda.device(self.device):
            torch.cuda.synchronize(self.device)
            if self.lib.async_error(comm):
                self.lib.comm_abort(comm)
            else:
                self.lib.comm_destroy(comm)


class PyNcclSymmAllReduce(PyNcclAllReduce):
    """`pynccl` on an ncclMemAlloc buffer registered as a symmetric window."""

    name = "pynccl_symm"

    def __init__(self, ctx: CommContext, max_bytes: int | None = None, *, ctas: int = 0) -> None:
        super().__init__(ctx, max_bytes, ctas=ctas)
        nbytes = max(int(max_bytes or 0), _WINDOW_ALIGN_BYTES)
        nbytes = -(-nbytes // _WINDOW_ALIGN_BYTES) * _WINDOW_ALIGN_BYTES
        self._ptr, self._window = 0, 0
        try:
            with torch.cuda.device(self.device):
                self._ptr = self.lib.mem_alloc(nbytes)
                self._window = self.lib.window_register(
                    self.comm, self._ptr, nbytes, WIN_COLL_SYMMETRIC
                )
            self._buffer = torch.as_tensor(_CudaArray(self._ptr, nbytes), device=self.device)
            if self._buffer.data_ptr() != self._ptr:
                raise RuntimeError("torch did not alias the ncclMemAlloc buffer")
        except Exception:
            self.release()
            raise
        self._max_bytes = int(max_bytes or nbytes)
        self._gate = get_spec(self.name).gate(self._max_bytes, self._index)
        view = self._buffer[:64].view(torch.float32)
        view.fill_(1.0)
        self._launch(view, view)
        torch.cuda.synchronize(self.device)
        if view[0].item() != ctx.world_size:
            raise RuntimeError(
                f"pynccl_symm warm-up gave {view[0].item()}, expected {ctx.world_size}"
            )

    def all_reduce_into(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Through the window (NCCL's symmetric kernels need both buffers in it; within it:
        the caller took `can_take` first), the result copied into `out` (may be `tensor`)."""
        window = self._buffer[: tensor.nbytes].view(tensor.dtype)
        window.copy_(tensor.reshape(-1))
        self._launch(window, window)
        out.view(-1).copy_(window)
        return out

    def release(self) -> None:
        comm, ptr, window = self.comm, getattr(self, "_ptr", 0), getattr(self, "_window", 0)
        self._buffer = None
        if comm and (ptr or window):
            with torch.cuda.device(self.device):
                torch.cuda.synchronize(self.device)
                if window:
                    self.lib.window_deregister(comm, window)
                if ptr:
                    self.lib.mem_free(ptr)
            self._ptr = self._window = 0
        super().release()


def _library_reason() -> tuple[NcclLibrary | None, str | None]:
    try:
        return load_library(), None
    except NcclLoadError as exc:
        return None, str(exc)
    except Exception as exc:  # a library that loads but misbehaves
        return None, f"libnccl unusable: {type(exc).__name__}: {exc}"


def _probe(ctx: CommContext) -> str | None:
    reason = cuda_reason(ctx, "pynccl") or one_gpu_per_rank_reason(ctx, "NCCL")
    if reason:
        return reason
    return _library_reason()[1]


def _probe_symm(ctx: CommContext) -> str | None:
    reason = cuda_reason(ctx, "pynccl_symm") or one_gpu_per_rank_reason(ctx, "NCCL")
    if reason:
        return reason
    lib, reason = _library_reason()
    return reason or lib.symmetric_support()


register(
    BackendSpec(
        name="pynccl",
        device="cuda",
        probe=_probe,
        create=lambda ctx, max_bytes, **params: PyNcclAllReduce(ctx, max_bytes, **params),
        knobs={"ctas": CTAS, "algo": ALGOS, "proto": PROTOS},
        dtypes=_DTYPES,
        alignment=1,
        needs_buffer=False,
    )
)
register(
    BackendSpec(
        name="pynccl_symm",
        device="cuda",
        probe=_probe_symm,
        create=lambda ctx, max_bytes, **params: PyNcclSymmAllReduce(ctx, max_bytes, **params),
        knobs={"ctas": CTAS},
        dtypes=_DTYPES,
        alignment=4,  # the symmetric kernels take 4-byte multiples
    )
)
