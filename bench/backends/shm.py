"""`shm_one_shot`, `shm_two_shot`: the project's own all-reduce for CPU ranks on one host.

All ranks map one POSIX shared-memory segment (see `shm_segment`): a slot per rank, plus a
result area for two-shot, each `chunk_bytes` long; a message larger than a slot goes through
in pieces of one slot. Per piece:

- one-shot: every rank copies its input into its slot, meets the others at a flag barrier,
  then adds every other slot into its own tensor. Slots are double-buffered by the barrier's
  parity, so one barrier per piece is enough: a rank can only overwrite slot set p again after
  the next barrier, which every rank reaches only when it has finished reading set p.
- two-shot: reduce-scatter then all-gather. Every rank copies its input into its slot (all but
  the part it owns), barrier, rank r sums part r of every slot into part r of the result area,
  barrier, every rank copies the whole result into its tensor. The two barriers already keep
  the next piece's writes behind every rank's reads, so no double buffering is needed.

Waiting never holds a core a peer needs: a rank spins briefly only when every local rank has a
core, then checks between `sched_yield()` calls for up to `yield_us` (a peer on the same core
runs at once), then sleeps on the barrier's futex until the last rank to arrive wakes it, all
bounded by `ctx.timeout_s`; a timeout names the rank and epoch it waited for and leaves the
backend unusable (its peers are out of step).
Copies are memmoves between the caller's tensor and the segment (no per-call allocation);
sums are torch ops on cached views of the segment, with torch limited to `threads` threads
for messages large enough for torch to split (`_PARALLEL_ELEMENTS`; below that torch runs
one thread whatever its setting, and switching costs more than the call).
The thread count is decided when the backend is built (the `threads` knob) but applied per
call, set before the sums and restored after: a process-wide setting changed on the call
path, on purpose. torch has no per-op thread count; setting it once at build would set the
whole process (a model's own CPU ops between calls, and other shm backends of the process:
`tuner live` keeps several alive with different `threads`). Measured side by side
(scripts/shm_threads.py, results/cpu-intel-xeon-processor-2c/20261204-shm-threads-per-call):
the knob makes 512 KiB-4 MiB sums 8-150x faster at 2 ranks on 2 cores, and setting it per
call is indistinguishable from setting it once. Below `_PARALLEL_ELEMENTS` nothing is set.
A one-shot message that fits a slot takes a short path: up to 256 KiB in C (`shm_native`: one
ctypes call copies, waits on the same flags and sums; ~1.2 us at 1 KiB and 2 ranks, where the
Python below takes ~2.5 us), else in Python (`_one_shot_small`): one memmove, one barrier, one
sum (at world size > 2 a single `sum` over the slots seen as one strided tensor, for small
counts), and no per-piece bookkeeping. results/peers.md has the measurements.

The sum is written into the input (`in_place`, like torch.distributed). Every rank computes it
the same way from the same slots, so every rank gets the same bits: in rank order
(x0 + x1) + x2 + ... (at world size 2 each rank adds the other's input to its own, the same by
commutativity). With the `exact` knob (the default) every path follows the reference
arithmetic: rank order, bfloat16 and float16 accumulated in float32 and rounded once (the C
path always does; the Python paths' 16-bit pieces are summed by the same C sum, or through a
float32 buffer where it did not build), so an element gets the same bits whatever the message
size and path (batch invariance).
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any

import torch
import torch.distributed as dist

from bench.backends import get_spec, register, shm_native
from bench.backends.base import BackendSpec, CommContext
from bench.backends.shm_segment import (
    FLAG_STRIDE_BYTES,
    FlagBarrier,
    Segment,
    round_up,
    segment_bytes,
    shm_dir_reason,
    supported_isa,
    timeout_message,
)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN_BYTES = 64  # two-shot parts start on cache lines
_VIEW_CACHE_ENTRIES = 32

# knobs: the first value is the default
# bytes per slot: a larger message goes through in pieces of this size (memory: 2 * world
# size slots for one-shot, world size + 1 for two-shot)
_CHUNK_BYTES = (4 << 20, 1 << 20, 16 << 20, 64 << 20, 256 << 10)
# torch intra-op threads inside the call; -1: cores // local ranks (at least 1); 0: leave
# torch's setting. Ranks sharing cores with OpenMP threads that spin starve each other: at 2
# ranks x 2 threads on 2 cores a 64 MiB all-reduce took ~10x longer than with 1 thread.
_THREADS = (-1, 0, 1, 2, 4)
# flag checks before yielding; -1: when every local rank has a core, 50 in Python (~15 us) and
# 20000 in C (~0.5 ms, cut short when the late rank last ran on this cpu: see shm_native.c),
# else 0. Python spins lose as soon as anything else wants the cores: at world size 2 on 2
# busy cores, 1000 Python checks (before yielding existed) made a 64 KiB call ~3x slower than
# sleeping at once; the peers spin purely (DeepSpeed always, Open MPI unless oversubscribed).
_SPIN = (-1, 0, 50, 1000, 20000)
_AUTO_SPIN = {"python": 50, "native": 20000}
# microseconds of checks between sched_yield() calls before sleeping; -1: 1000. 0: sleep right
# after the spin (the policy before yielding: ~40 us per call at 2 ranks on 2 busy cores,
# ~115 us at 4 ranks on 2 cores, where Open MPI, which yields, took 2 and 12 us)
_YIELD_US = (-1, 0, 100, 10000)
_DEFAULT_YIELD_US = 1000
# torch splits an elementwise op over threads from this many elements (at::internal::GRAIN_SIZE)
_PARALLEL_ELEMENTS = 32768
# a one-shot sum over slots as one strided tensor up to this many elements (one torch call
# instead of world size - 1; beyond, torch's dim-0 reduction is slower than the adds)
_STACKED_SUM_ELEMENTS = 4096
# the C short path (shm_native) for one-shot messages up to _NATIVE_BYTES; -1: when every
# rank could build it, else the Python path; 0: never; 1: required (create fails without it)
_NATIVE = (-1, 0, 1)
_NATIVE_BYTES = 256 << 10
# 1: every path sums in rank order and 16-bit types accumulate in float32 and round once, the
# reference arithmetic the C path always follows (the same bits for an element whatever the
# message size: tables from `tuner fit --numerics exact`); 0: the Python paths round to the
# dtype after every add at world size > 2, and sum small slots with one torch.sum (not in rank
# order at 8 ranks). Cost: none (results/cpu-intel-xeon-processor-2c/20261204-shm-exact-cost).
_EXACT = (1, 0)
_ACC_DTYPES = (torch.bfloat16, torch.float16)


def _slot_bytes(max_bytes: int, chunk_bytes: int) -> int:
    return round_up(max(min(max_bytes, chunk_bytes), 1))


def _slots(algorithm: str, world_size: int) -> int:
    """One-shot: a slot per rank, twice (double-buffered); two-shot: a slot per rank + result."""
    return 2 * world_size if algorithm == "one_shot" else world_size + 1


class ShmAllReduce:
    """One segment, one algorithm ("one_shot" or "two_shot")."""

    in_place = True

    def __init__(
        self,
        ctx: CommContext,
        max_bytes: int,
        *,
        algorithm: str,
        chunk_bytes: int = _CHUNK_BYTES[0],
        threads: int = _THREADS[0],
        spin: int = _SPIN[0],
        yield_us: int = _YIELD_US[0],
        native: int = _NATIVE[0],
        exact: int = _EXACT[0],
    ) -> None:
        self.name = f"shm_{algorithm}"
        self.algorithm = algorithm
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.slot_bytes = _slot_bytes(max_bytes, chunk_bytes)
        slots = _slots(algorithm, ctx.world_size)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        if threads < 0:
            threads = max(1, cores // max(1, ctx.local_world_size))
        self.threads = threads
        self.exact = bool(exact)
        self._acc: torch.Tensor | None = None  # float32 sums of 16-bit pieces (exact, ws > 2)
        self._c_sum: shm_native.ExactSum | None = None  # the same sum in C, one pass
        self._broken: str | None = None
        self._gate = get_spec(self.name).gate()
        self._views: dict[tuple[torch.dtype, int], Any] = {}
        self._small: dict[tuple[torch.dtype, int], Any] = {}
        self._small_bytes = 0  # the short path's largest message; 0: never (see all_reduce)
        self._native_bytes, self._native_codes = 0, {}  # the C short path's (see all_reduce)
        self._segment: Segment | None = None
        if ctx.world_size == 1:
            return
        self._segment = Segment.open(
            ctx.cpu_group,
            ctx.rank,
            ctx.world_size,
            slots * self.slot_bytes,
            f"{ctx.run_tag}-{self.name}",
        )
        has_core = ctx.local_world_size <= cores
        python_spin = (_AUTO_SPIN["python"] if has_core else 0) if spin < 0 else spin
        if yield_us < 0:
            yield_us = _DEFAULT_YIELD_US
        self._barrier = FlagBarrier(
            self._segment.flags,
            ctx.rank,
            ctx.world_size,
            timeout_s=ctx.timeout_s,
            spin=python_spin,
            label=self.name,
            yield_s=yield_us * 1e-6,
        )
        if self.exact and ctx.world_size > 2:
            # the exact 16-bit sums of the Python paths in C where it builds, else through
            # torch and a float32 buffer: the same arithmetic, ranks may differ in which
            self._c_sum = shm_native.ExactSum.load()
        # the short path: this rank's slot of each parity, and the largest message it takes
        self._my_slots = (self._slot_ptr(ctx.rank), self._slot_ptr(ctx.world_size + ctx.rank))
        self._small_bytes = self.slot_bytes if algorithm == "one_shot" else 0
        if algorithm == "one_shot" and native:
            native_spin = (_AUTO_SPIN["native"] if has_core else 0) if spin < 0 else spin
            self._start_native(ctx, native == 1, native_spin, yield_us)

    def _start_native(self, ctx: CommContext, required: bool, spin: int, yield_us: int) -> None:
        """Collective: the C short path when every rank loaded it (else said, or raised when
        `required`)."""
        lib, reason = shm_native.load()
        every: list = [None] * ctx.world_size
        dist.all_gather_object(every, reason, group=ctx.cpu_group)
        reason = next((f"rank {r}: {why}" for r, why in enumerate(every) if why), None)
        if reason:
            if required:
                raise RuntimeError(f"{self.name}.native=1: {reason}")
            return
        self._call = shm_native.Call(
            world_size=ctx.world_size,
            slots=self._segment.data_ptr,
            slot_bytes=self.slot_bytes,
            flags=ctypes.addressof(self._segment.flags),
            rank=ctx.rank,
            stride=FLAG_STRIDE_BYTES // 8,
            spin=spin,
            yield_ns=int(yield_us * 1e3),
            timeout_ns=int(ctx.timeout_s * 1e9),
            nap_ns=int(self._barrier.nap_s * 1e9),
        )
        self._call_ref = ctypes.byref(self._call)
        self._native_one_shot = lib.aat_one_shot
        self._native_codes = shm_native.dtype_codes(lib)
        self._native_bytes = min(self.slot_bytes, _NATIVE_BYTES)

    # -- the three verbs ------------------------------------------------------------------

    def can_take(self, tensor: torch.Tensor) -> str | None:
        return self._gate(tensor)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; returns `tensor`."""
        nbytes = tensor.nbytes
        if 0 < nbytes <= self._small_bytes and tensor.is_contiguous():
            # _small_bytes and _native_bytes are 0 at world size 1, once broken, once released
            if nbytes <= self._native_bytes and tensor.dtype in self._native_codes:
                return self._one_shot_native(tensor, nbytes)
            return self._one_shot_small(tensor, nbytes)
        if self._broken:
            raise RuntimeError(self._broken)
        if self._segment is None:
            if self.world_size == 1:
                return tensor
            raise RuntimeError(f"{self.name} was released")
        count = tensor.numel()
        if count == 0:
            return tensor
        flat = tensor if tensor.dim() == 1 else tensor.view(-1)
        if flat.requires_grad:
            flat = flat.detach()
        previous = self._set_threads(count)
        try:
            piece = self.slot_bytes // flat.element_size()
            step = self._one_shot_piece if self.algorithm == "one_shot" else self._two_shot_piece
            for offset in range(0, count, piece):
                step(flat, offset, min(piece, count - offset), count)
        except TimeoutError as exc:
            self._break(exc)
            raise
        finally:
            if previous:
                torch.set_num_threads(previous)
        return tensor

    def _set_threads(self, count: int) -> int:
        """torch's intra-op threads set to the `threads` knob for an op of `count` elements
        that torch would split over threads (below its grain it runs on one anyway, and the
        two calls would cost more than the sum); returns the setting to restore, 0: none."""
        if not self.threads or count < _PARALLEL_ELEMENTS:
            return 0
        previous = torch.get_num_threads()
        if previous == self.threads:
            return 0
        torch.set_num_threads(self.threads)
        return previous

    def _one_shot_native(self, tensor: torch.Tensor, nbytes: int) -> torch.Tensor:
        """The short path in C (shm_native.c): one ctypes call, the epoch handed over."""
        call, barrier = self._call, self._barrier
        call.tensor, call.nbytes = tensor.data_ptr(), nbytes
        call.dtype = self._native_codes[tensor.dtype]
        call.epoch = barrier.epoch
        code = self._native_one_shot(self._call_ref)
        barrier.epoch = call.epoch
        if code != shm_native.OK:
            exc = TimeoutError(
                timeout_message(
                    self.name,
                    self.rank,
                    barrier.timeout_s,
                    call.late_rank,
                    call.epoch,
                    call.late_seen,
                )
            )
            self._break(exc)
            raise exc
        return tensor

    def _one_shot_small(self, tensor: torch.Tensor, nbytes: int) -> torch.Tensor:
        """The whole message in one slot: copy in, one barrier, sum (see the module doc)."""
        barrier = self._barrier
        parity = (barrier.epoch + 1) & 1
        ctypes.memmove(self._my_slots[parity], tensor.data_ptr(), nbytes)
        try:
            barrier.arrive_and_wait()
        except TimeoutError as exc:
            self._break(exc)
            raise
        flat = tensor if tensor.dim() == 1 else tensor.view(-1)
        if flat.requires_grad:
            flat = flat.detach()
        views = self._small.get((flat.dtype, nbytes)) or self._small_views(flat.dtype, nbytes)
        slots = views[parity]
        # the same thread policy as the pieces: one slot holds up to chunk_bytes (4 MiB), and
        # at 2 ranks x torch's 2 threads on 2 cores a 512 KiB sum took ~8 ms instead of ~0.2
        previous = self._set_threads(flat.numel())
        try:
            if self.world_size == 2:
                flat.add_(slots)
            elif isinstance(slots, torch.Tensor):  # every slot as one strided tensor
                torch.sum(slots, dim=0, out=flat)
            else:
                self._sum_into(flat, slots)
        finally:
            if previous:
                torch.set_num_threads(previous)
        return tensor

    def _small_views(self, dtype: torch.dtype, nbytes: int):
        """Per parity, what the short path sums: the other slot (world size 2), every slot as
        one [world size, count] strided tensor (small counts), or the slots in rank order;
        cached under (dtype, bytes) in a dict of their own."""
        typed = self._segment.data.view(dtype)
        slot_elems = self.slot_bytes // typed.element_size()
        count = nbytes // typed.element_size()
        ws, me = self.world_size, self.rank
        if ws == 2:
            views = [typed.narrow(0, (p * ws + 1 - me) * slot_elems, count) for p in (0, 1)]
        elif count <= _STACKED_SUM_ELEMENTS and not self.exact:
            views = [
                typed.as_strided(
                    (ws, count), (slot_elems, 1), typed.storage_offset() + p * ws * slot_elems
                )
                for p in (0, 1)
            ]
        else:
            views = self._piece_views(dtype, count)
        if len(self._small) >= _VIEW_CACHE_ENTRIES:
            self._small.clear()
        self._small[(dtype, nbytes)] = views
        return views

    def _break(self, exc: TimeoutError) -> None:
        """After a timeout the ranks are out of step: every later call raises."""
        self._broken = f"{self.name} is unusable after a timeout: {exc}"
        self._small_bytes = self._native_bytes = 0

    def release(self) -> None:
        self._small_bytes = self._native_bytes = 0
        self._views.clear()
        self._small.clear()
        self._barrier = None
        if self._segment is not None:
            self._segment.close()
            self._segment = None

    # -- pieces ---------------------------------------------------------------------------

    def _slot_ptr(self, index: int) -> int:
        return self._segment.data_ptr + index * self.slot_bytes

    def _piece_views(self, dtype: torch.dtype, count: int):
        """Typed views of the segment for a piece of `count` elements (cached: building views
        costs microseconds, which matters at small sizes)."""
        key = (dtype, count)
        views = self._views.get(key)
        if views is not None:
            return views
        if len(self._views) >= _VIEW_CACHE_ENTRIES:
            self._views.clear()
        typed = self._segment.data.view(dtype)
        slot_elems = self.slot_bytes // typed.element_size()
        ws, me = self.world_size, self.rank
        if self.algorithm == "one_shot":
            views = [
                [typed.narrow(0, (p * ws + j) * slot_elems, count) for j in range(ws)]
                for p in (0, 1)
            ]
        else:
            align = max(1, _ALIGN_BYTES // typed.element_size())
            part = -(-count // ws)
            part = -(-part // align) * align
            lo, hi = min(me * part, count), min((me + 1) * part, count)
            slots = [typed.narrow(0, j * slot_elems + lo, hi - lo) for j in range(ws)]
            result = typed.narrow(0, ws * slot_elems + lo, hi - lo)
            views = (lo, hi, slots, result)
        self._views[key] = views
        return views

    def _one_shot_piece(self, flat: torch.Tensor, offset: int, count: int, total: int) -> None:
        size = flat.element_size()
        ws, me = self.world_size, self.rank
        parity = (self._barrier.epoch + 1) & 1
        ctypes.memmove(
            self._slot_ptr(parity * ws + me), flat.data_ptr() + offset * size, count * size
        )
        self._barrier.arrive_and_wait()
        slots = self._piece_views(flat.dtype, count)[parity]
        dest = flat if count == total else flat.narrow(0, offset, count)
        if ws == 2:
            dest.add_(slots[1 - me])  # x0 + x1 on either rank: one add, rounded once
        else:
            self._sum_into(dest, slots)

    def _sum_into(self, dest: torch.Tensor, terms) -> None:
        """dest = terms[0] + terms[1] + ... in rank order. With `exact`, 16-bit types add in
        float32 and round to the dtype once, as the reference arithmetic and the C path do: in
        C (`aat_sum`) where the library built, else in a float32 buffer of the backend's (made
        once); otherwise every add rounds to the dtype. `dest` is never one of the terms."""
        if self.exact and dest.dtype in _ACC_DTYPES and len(terms) > 2:
            if self._c_sum is not None and self._c_sum(dest, terms):
                return
            count = dest.numel()
            if self._acc is None or self._acc.numel() < count:
                self._acc = torch.empty(self.slot_bytes // 2, dtype=torch.float32)
            acc = self._acc[:count]
            acc.copy_(terms[0])
            for term in terms[1:]:
                acc.add_(term)
            dest.copy_(acc)
            return
        torch.add(terms[0], terms[1], out=dest)
        for term in terms[2:]:
            dest.add_(term)

    def _two_shot_piece(self, flat: torch.Tensor, offset: int, count: int, total: int) -> None:
        size = flat.element_size()
        ws, me = self.world_size, self.rank
        lo, hi, slots, result = self._piece_views(flat.dtype, count)
        src = flat.data_ptr() + offset * size
        mine = self._slot_ptr(me)
        # the part this rank reduces is read from its own tensor, not copied
        if lo:
            ctypes.memmove(mine, src, lo * size)
        if hi < count:
            ctypes.memmove(mine + hi * size, src + hi * size, (count - hi) * size)
        self._barrier.arrive_and_wait()
        if hi > lo:
            own = flat.narrow(0, offset + lo, hi - lo)
            self._sum_into(result, [own if j == me else slots[j] for j in range(ws)])
        self._barrier.arrive_and_wait()
        ctypes.memmove(src, self._slot_ptr(ws), count * size)


def _probe(ctx: CommContext) -> str | None:
    if ctx.device.type != "cpu":
        return "shared-memory all-reduce runs on CPU tensors only (use --device cpu)"
    if not ctx.same_host:
        return f"ranks span {ctx.nnodes} hosts; shared memory needs one host"
    if not supported_isa():
        return (
            f"needs x86-64 store ordering to publish flags without fences; this is "
            f"{platform.machine()}"
        )
    return shm_dir_reason()


def _shared(algorithm: str):
    def shared_bytes(ranks: int, max_bytes: int, params) -> int:  # the segment __init__ opens
        chunk = int(params.get("chunk_bytes", _CHUNK_BYTES[0]))
        return segment_bytes(ranks, _slots(algorithm, ranks) * _slot_bytes(max_bytes, chunk))

    return shared_bytes


def _creator(algorithm: str):
    def create(ctx: CommContext, max_bytes: int, **params: Any) -> ShmAllReduce:
        return ShmAllReduce(ctx, max_bytes, algorithm=algorithm, **params)

    return create


_KNOBS = {
    "chunk_bytes": _CHUNK_BYTES,
    "threads": _THREADS,
    "spin": _SPIN,
    "yield_us": _YIELD_US,
    "native": _NATIVE,
    "exact": _EXACT,
}

for _algorithm in ("one_shot", "two_shot"):
    register(
        BackendSpec(
            name=f"shm_{_algorithm}",
            device="cpu",
            probe=_probe,
            create=_creator(_algorithm),
            knobs=_KNOBS,
            dtypes=_DTYPES,
            alignment=1,
            shared_bytes=_shared(_algorithm),
        )
    )
