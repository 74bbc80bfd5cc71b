"""`custom_one_shot`, `custom_two_shot`: the project's own all-reduce, Triton kernels over
CUDA IPC buffers with their own flag barriers (`bench.kernels.reduce`, `bench.kernels.ipc`).

Every rank of one host exposes one buffer (flags + two data halves of `max_bytes`) to its
peers. A call launches one kernel that copies the input into this rank's buffer (inside the
kernel, so a CUDA graph captures it like any other launch: nothing is registered per call),
meets the peers at a per-program flag barrier, and then

- one-shot: reads every rank's buffer and writes the sum into the input;
- two-shot: reduces the tiles this rank owns into its buffer, meets again, gathers every tile.

Epochs live on the device, so eager calls and graph replays mix freely as long as every rank
makes the same calls in the same order on one stream. Spins are bounded (`max_spins`); a
timeout is stored in a pinned host word and raised as `TimeoutError` naming the peer, on the
next call or by `check()`. World sizes 2..8, odd included; one GPU per rank (with P2P) or
several ranks sharing a GPU (CUDA IPC between processes of one device).

A barrier kernel needs every peer's kernel running at the same time. With one GPU per rank
that holds when `blocks` is at most the GPU's multiprocessor count. With several ranks on one
GPU (the tests, under MPS) all ranks' programs must be resident together, and a rank held on
the host while its peers spin (a first-use compile or module load was seen to be) can stall
them past the spin budget: so the constructor loads every kernel variant without waiting on a
peer and meets the peers on the CPU before it returns (`_warm_up`), whoever creates it.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from bench.backends import get_spec, register
from bench.backends.base import BackendSpec, CommContext
from bench.backends.gpu_gate import device_index

__all__ = ["CustomAllReduce", "KNOBS", "probe"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGNMENT = 16  # bytes: the kernels move 16-byte vectors
_MAX_RANKS = 8  # mirrors bench.kernels.reduce.MAX_RANKS (that module needs Triton)
# spin reads before a barrier gives up (~1-6 us a read measured on one H200; MPS-less time-slicing of
# 8 ranks on one GPU takes ~17 ms a round, far inside it)
DEFAULT_MAX_SPINS = 10_000_000

# knobs: the first value is the default (the tuner searches the rest)
KNOBS: dict[str, tuple[int, ...]] = {
    "blocks": (32, 8, 16, 64, 128),  # programs in the grid (each has its own barrier slot)
    "num_warps": (8, 4, 16),  # warps per program
    "vec_bytes": (16, 8, 32),  # contiguous bytes per thread per run (16: one 128-bit access)
    "chunk": (2, 1, 4),  # runs per thread per loop step: tile = warps*32*vec*chunk elements
}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def probe(ctx: CommContext) -> str | None:
    """Why the custom all-reduce cannot run in this group, or None. Local checks only."""
    if not ctx.is_cuda:
        return f"custom all-reduce needs CUDA tensors (this sweep runs on {ctx.device.type})"
    if not 2 <= ctx.world_size <= _MAX_RANKS:
        return f"world size {ctx.world_size}: the custom all-reduce takes 2..{_MAX_RANKS} ranks"
    if ctx.nnodes > 1 or not ctx.same_host:
        return f"ranks span {ctx.nnodes} hosts: CUDA IPC buffers need every rank on one host"
    if ctx.local_world_size != ctx.world_size:
        return "not every rank is on this host: CUDA IPC buffers need one host"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not importable ({exc}); the custom kernels need it"
    if not torch.cuda.is_available():
        return "no CUDA device visible to this rank"
    visible = ctx.visible_gpus or torch.cuda.device_count()
    mine = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
    used = sorted({lr % visible for lr in range(ctx.local_world_size)})
    for other in used:
        if other != mine and not torch.cuda.can_device_access_peer(mine, other):
            return (
                f"GPU {mine} cannot access GPU {other} peer-to-peer: a peer's IPC buffer "
                "would be unreachable from this rank's kernel"
            )
    return None


class CustomAllReduce:
    """One IPC buffer set, one algorithm ("one_shot" or "two_shot"), fixed launch knobs."""

    in_place = True

    def __init__(
        self,
        ctx: CommContext,
        max_bytes: int,
        *,
        algorithm: str,
        blocks: int = KNOBS["blocks"][0],
        num_warps: int = KNOBS["num_warps"][0],
        vec_bytes: int = KNOBS["vec_bytes"][0],
        chunk: int = KNOBS["chunk"][0],
        max_spins: int = DEFAULT_MAX_SPINS,
    ) -> None:
        if algorithm not in ("one_shot", "two_shot"):
            raise ValueError(f"algorithm: expected one_shot or two_shot, got {algorithm!r}")
        spec = get_spec(f"custom_{algorithm}")  # its knobs, dtypes and alignment
        reason = spec.check_params(
            {"blocks": blocks, "num_warps": num_warps, "vec_bytes": vec_bytes, "chunk": chunk}
        )
        if reason:
            raise ValueError(reason)
        if max_spins < 1:
            raise ValueError(f"max_spins: expected an integer >= 1, got {max_spins}")
        from bench.kernels import reduce as kernels  # optional: triton
        from bench.kernels.ipc import IpcBuffer  # optional: triton

        self.name = f"custom_{algorithm}"
        self.algorithm = algorithm
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.device = ctx.device
        self._index = device_index(ctx.device)
        self.blocks, self.num_warps = blocks, num_warps
        self.vec_bytes, self.chunk, self.max_spins = vec_bytes, chunk, max_spins
        self.max_bytes = max(int(max_bytes), _ALIGNMENT)
        self._gate = spec.gate(self.max_bytes, self._index)
        self._cpu_group = ctx.cpu_group
        self._kernel = (
            kernels.one_shot_kernel if algorithm == "one_shot" else kernels.two_shot_kernel
        )
        self._flag_bytes = kernels.FLAG_BYTES
        self._max_blocks = kernels.MAX_BLOCKS
        self._half_bytes = _round_up(self.max_bytes, 256)
        self._failure: str | None = None
        self._views: dict[torch.dtype, list[torch.Tensor]] = {}
        self._buffer = IpcBuffer(
            self._flag_bytes + 2 * self._half_bytes,
            ctx.device,
            ctx.cpu_group,
            ctx.rank,
            ctx.world_size,
            zero_bytes=self._flag_bytes,
        )
        self._flag_table = torch.tensor(
            self._buffer.addresses(), dtype=torch.int64, device=ctx.device
        )
        self._own_flags = self._buffer.local[: self._flag_bytes].view(torch.int32)
        self._counters = torch.zeros(kernels.MAX_BLOCKS, dtype=torch.int32, device=ctx.device)
        # the timeout word: pinned host memory the kernel writes through its device address
        # (unified addressing), so the host reads it without synchronising
        self._status = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        self._status_np = self._status.numpy()
        self._decode = kernels.decode_status
        self._tile_elems = {
            size: kernels.tile_elems(num_warps, vec_bytes, chunk, size) for size in (2, 4)
        }
        # the release's meeting gives up after this long (a peer gone, or on an error path)
        self._meet_timeout_s = min(float(ctx.timeout_s), 30.0)
        self._warm_up()

    # -- the three verbs ------------------------------------------------------------------

    def can_take(self, tensor: torch.Tensor) -> str | None:
        if self._failure:
            return self._failure
        return self._gate(tensor)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; returns `tensor`. Stream-ordered: every rank
        must make the same calls in the same order (eagerly or inside a CUDA graph)."""
        return self.all_reduce_into(tensor, tensor)

    def all_reduce_into(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The sum written into `out` (may be `tensor`) by the same kernel: it copies `tensor`
        into this rank's buffer before the first meeting and writes only `out` after it."""
        self._raise_if_failed()
        if self._buffer is None:
            raise RuntimeError(f"{self.name}: all_reduce after release()")
        if tensor.numel():
            self._launch(tensor, out, self.max_spins)
        return out

    def release(self) -> None:
        """Wait for this rank's kernels, close the peers' mappings, meet the peers (no one
        still reads a buffer, no one still maps one), then free this rank's own buffer: owners
        free last, so a normal run leaves no shared CUDA tensor behind. Idempotent. After a
        timeout (a peer may be gone) the meeting is skipped; it gives up after at most 30 s
        (an error path where the peers are elsewhere): a release always ends."""
        if self._buffer is None:
            return
        try:
            torch.cuda.synchronize(self.device)
        except RuntimeError:
            pass
        self._views.clear()
        self._buffer.close_peers()
        if self._failure is None and self._status_np[0] == 0:
            _meet(self._cpu_group, self._meet_timeout_s)
        self._own_flags = None  # a view of the own buffer: it would keep it alive
        self._buffer.free_local()
        self._buffer = None

    # -- helpers --------------------------------------------------------------------------

    def _launch(self, tensor: torch.Tensor, out: torch.Tensor, max_spins: int) -> None:
        views = self._data_views(tensor.dtype)
        count = tensor.numel()
        tile = self._tile_elems[tensor.element_size()]
        peers = views + [views[0]] * (_MAX_RANKS - self.world_size)
        half_elems = self._half_bytes // tensor.element_size()
        self._kernel[(self.blocks,)](
            tensor,
            out,
            views[self.rank],
            *peers,
            self._flag_table,
            self._own_flags,
            self._counters,
            self._status.data_ptr(),
            count,
            -(-count // tile),
            half_elems,
            self.rank,
            max_spins,
            W=self.world_size,
            TILE=tile,
            MAXB=self._max_blocks,
            num_warps=self.num_warps,
        )

    def _warm_up(self) -> None:
        """Collective, at creation: compile and load every kernel variant this communicator
        launches, then meet the peers on the CPU, so that no rank's first call waits in a
        barrier kernel for a peer still busy on the host (a first-use compile or module load
        took longer than the spin budget with 3 and 8 ranks on one GPU).

        Variants: per dtype, an element count that is a multiple of 16 and one that is not
        (Triton specialises `n` on that). Each launch has a spin budget of one read, so no rank
        waits for another: its barriers give up at once, and since every rank makes the same
        launches the epochs and flags still end in step (the sums are not used). The timeout
        word they leave is cleared after the GPU is synchronised. A rank that fails here
        still meets the others, then raises (the creation's agreement names it)."""
        failed = None
        try:
            for dtype in _DTYPES:
                size = torch.empty((), dtype=dtype).element_size()
                for count in (256, 256 + _ALIGNMENT // size):
                    scratch = torch.zeros(count, dtype=dtype, device=self.device)
                    self._launch(scratch, scratch, max_spins=1)
            torch.cuda.synchronize(self.device)
        except Exception as exc:  # a compile error, out of memory
            failed = exc
        self._status.zero_()
        dist.barrier(group=self._cpu_group)
        if failed is not None:
            raise failed

    def check(self) -> None:
        """Synchronise this rank's current stream, then raise if a barrier timed out."""
        torch.cuda.current_stream(self.device).synchronize()
        self._raise_if_failed()

    def knobs(self) -> dict[str, int]:
        return {
            "blocks": self.blocks,
            "num_warps": self.num_warps,
            "vec_bytes": self.vec_bytes,
            "chunk": self.chunk,
        }

    def _data_views(self, dtype: torch.dtype) -> list[torch.Tensor]:
        views = self._views.get(dtype)
        if views is None:
            start, end = self._flag_bytes, self._flag_bytes + 2 * self._half_bytes
            views = [t[start:end].view(dtype) for t in self._buffer.tensors]
            self._views[dtype] = views
        return views

    def _raise_if_failed(self) -> None:
        if self._failure is None:
            word = int(self._status_np[0])
            if not word:
                return
            info = self._decode(word)
            self._failure = (
                f"{self.name}: rank {self.rank} timed out after {self.max_spins} spins waiting "
                f"for peer {info['peer']}'s flag (barrier {info['phase']}, program "
                f"{info['block']}, epoch {info['epoch']}); the communicator is unusable: "
                "release it"
            )
        raise TimeoutError(self._failure)


def _meet(group, timeout_s: float) -> bool:
    """A barrier of the CPU group that gives up after `timeout_s` (a peer gone, or busy in
    another collective on an error path); True when every rank came."""
    try:
        dist.barrier(group=group, async_op=True).wait(timeout=datetime.timedelta(seconds=timeout_s))
    except Exception:
        return False
    return True


def _spec(algorithm: str) -> BackendSpec:
    return BackendSpec(
        name=f"custom_{algorithm}",
        device="cuda",
        probe=probe,
        create=lambda ctx, max_bytes, **params: CustomAllReduce(
            ctx, max_bytes, algorithm=algorithm, **params
        ),
        knobs=KNOBS,
        dtypes=_DTYPES,
        alignment=_ALIGNMENT,
    )


# one_shot: copy in, one flag barrier, every rank reads all buffers;
# two_shot: reduce-scatter and all-gather between two flag barriers
register(_spec("one_shot"))
register(_spec("two_shot"))
