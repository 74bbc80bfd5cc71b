"""Triton kernels: the N-input reduction, and one-shot / two-shot all-reduce over IPC buffers.

Buffers. Every rank owns one allocation shared with its peers through CUDA IPC
(`bench.kernels.ipc`): a flag area of `FLAG_BYTES`, then two data halves of `half_elems`
elements each. A call uses the half given by its epoch's parity, so a rank can start writing
call k+2's input while a slow peer still reads call k+1 from the other half, and no barrier is
needed at the end of a call (a rank reaches call k+2's first barrier only after every peer
started call k+1, that is finished call k: calls on one communicator are stream-ordered).

Epochs. Each program (block) keeps its own counter in device memory (`counters[b]`), read at
the start and stored +1 at the end of every launch, so the kernel needs no host-side argument
per call and replays correctly inside a CUDA graph. Every launch uses the whole grid (`blocks`
programs, even those with no tile), so all ranks' counters advance together.

Barriers. Program b of rank r writes its epoch into slot (phase, b, r) of every peer's flag
area (a scalar atomic exchange, release, system scope, after a block-wide `debug_barrier` so
the whole block's stores are ordered before it), then spins on slots (phase, b, p) of its own
area, one peer after the other (scalar atomic add of 0, acquire, system scope) until each
peer's value has reached the epoch (compared as a wrapping int32 difference). Only program b
of each rank touches the tiles of program b, so per-program barriers are enough. Each wait is
bounded by `max_spins` reads; past it, the program stores one int64 word into `status` (a
pinned host word: the host reads it without synchronising) naming the peer, barrier phase,
program and epoch, and goes on; the Python side then raises `TimeoutError` instead of hanging.
(A first version waited on all peers at once with an 8-lane atomic; its per-lane results are
replicated across the block's threads by Triton, and once in a few thousand barriers under MPS
a program missed a flag that was set: the scalar form leaves no such room.)

Tiles. Tile t covers elements [t*TILE, (t+1)*TILE); program b takes tiles b, b+G, b+2G, ...
In two-shot, tile t = b + G*k belongs to rank k mod W: rank r reduces its tiles from every
peer into its own buffer, and after the second barrier every rank gathers tile t from its
owner. Sums run in float32 in rank order 0..W-1, so every rank gets the same bits.
Peer data is read with `.cg` (L2, not the non-coherent L1).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "FLAG_BYTES",
    "MAX_BLOCKS",
    "MAX_RANKS",
    "decode_status",
    "tile_elems",
    "reduce_n",
    "reduce_n_kernel",
    "one_shot_kernel",
    "two_shot_kernel",
]

MAX_RANKS = 8
MAX_BLOCKS = 128
PHASES = 2
# int32 slots: PHASES x MAX_BLOCKS x MAX_RANKS (8 KiB), rounded up to keep the data aligned
FLAG_BYTES = 16 << 10


def tile_elems(num_warps: int, vec_bytes: int, chunk: int, element_size: int) -> int:
    """Elements one program handles per loop step: every thread takes `chunk` runs of
    `vec_bytes` contiguous bytes (16 bytes: one 128-bit load per run)."""
    vec = max(1, vec_bytes // element_size)
    return num_warps * 32 * vec * chunk


def decode_status(word: int) -> dict[str, int] | None:
    """The timeout word a program stored, as fields; None when no program timed out."""
    if not word & 1:
        return None
    return {
        "peer": (word >> 4) & 0xFF,
        "phase": (word >> 12) & 0xF,
        "block": (word >> 16) & 0xFFFF,
        "epoch": (word >> 32) & 0x7FFFFFFF,
    }


@triton.jit
def _sum_tile(
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    offs,
    mask,
    N: tl.constexpr,
    CACHE: tl.constexpr,
    EVICT: tl.constexpr,
):
    """float32 sum of N inputs at `offs`, in input order (unrolled at compile time)."""
    ptrs = (p0, p1, p2, p3, p4, p5, p6, p7)
    acc = _load_f32(p0, offs, mask, CACHE, EVICT)
    for i in tl.static_range(1, N):
        acc += _load_f32(ptrs[i], offs, mask, CACHE, EVICT)
    return acc


@triton.jit
def _load_f32(ptr, offs, mask, CACHE: tl.constexpr, EVICT: tl.constexpr):
    return tl.load(
        ptr + offs, mask=mask, other=0.0, cache_modifier=CACHE, eviction_policy=EVICT
    ).to(tl.float32)


@triton.jit
def reduce_n_kernel(
    x0,
    x1,
    x2,
    x3,
    x4,
    x5,
    x6,
    x7,
    out,
    n,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    EVICT: tl.constexpr,
):
    """out = x0 + ... + x(N-1), one BLOCK per program (unused inputs may alias x0)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = _sum_tile(x0, x1, x2, x3, x4, x5, x6, x7, offs, mask, N, "", EVICT)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _barrier(
    flag_table,
    own_flags,
    status_addr,
    phase: tl.constexpr,
    b,
    rank,
    epoch,
    max_spins,
    W: tl.constexpr,
    MAXB: tl.constexpr,
):
    """Signal every peer that program b of this rank reached `phase` of `epoch`; wait for
    all peers' program b. Bounded: on timeout, record the late peer in the status word.

    Scalar atomics only (one thread performs each, the value is broadcast to the block), so
    every thread of the block sees the same flag value and leaves the spin together."""
    tl.debug_barrier()
    row = (phase * MAXB + b) * 8
    for p in tl.static_range(W):
        if p != rank:
            peer_flags = tl.load(flag_table + p).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(peer_flags + row + rank, epoch, sem="release", scope="sys")
    for p in tl.static_range(W):
        if p != rank:
            seen = tl.atomic_add(own_flags + row + p, 0, sem="acquire", scope="sys")
            spins = max_spins * 0
            while ((seen - epoch) < 0) & (spins < max_spins):
                seen = tl.atomic_add(own_flags + row + p, 0, sem="acquire", scope="sys")
                spins += 1
            if (seen - epoch) < 0:
                word = (
                    (epoch.to(tl.int64) << 32)
                    | (b.to(tl.int64) << 16)
                    | (phase << 12)
                    | (p << 4)
                    | 1
                )
                # an address that fits 32 bits comes in as int32 (Triton types small ints so):
                # widened first, or the pointer cast reads 4 bytes as 8
                tl.store(status_addr.to(tl.int64).to(tl.pointer_type(tl.int64)), word)
    tl.debug_barrier()


@triton.jit
def _copy_tiles(src, dst, first, step, n, num_tiles, TILE: tl.constexpr, CACHE: tl.constexpr):
    """dst[tile] = src[tile] for tiles first, first + step, ..."""
    lanes = tl.arange(0, TILE)
    for t in range(first, num_tiles, step):
        offs = t * TILE + lanes
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask, cache_modifier=CACHE), mask=mask)


# every rank runs the same compiled kernel, whatever its rank, size in tiles or spin budget
_RUNTIME_ONLY = ["num_tiles", "rank", "max_spins"]


@triton.jit
def _arrive(
    inp,
    own,
    flag_table,
    own_flags,
    counters,
    status_addr,
    n,
    num_tiles,
    half_elems,
    rank,
    max_spins,
    W: tl.constexpr,
    TILE: tl.constexpr,
    MAXB: tl.constexpr,
):
    """This call's epoch and buffer half; the input copied into this rank's buffer; met."""
    b = tl.program_id(0)
    epoch = tl.load(counters + b) + 1
    half = tl.multiple_of((epoch & 1) * half_elems, 16)
    _copy_tiles(inp, own + half, b, tl.num_programs(0), n, num_tiles, TILE, "")
    _barrier(flag_table, own_flags, status_addr, 0, b, rank, epoch, max_spins, W, MAXB)
    return epoch, half


@triton.jit
def _reduce_tiles(
    d0,
    d1,
    d2,
    d3,
    d4,
    d5,
    d6,
    d7,
    half,
    dst,
    first,
    step,
    n,
    num_tiles,
    W: tl.constexpr,
    TILE: tl.constexpr,
):
    """dst[tile] = the sum over ranks of tile, for tiles first, first + step, ..."""
    lanes = tl.arange(0, TILE)
    for t in range(first, num_tiles, step):
        offs = t * TILE + lanes
        mask = offs < n
        acc = _sum_tile(
            d0 + half,
            d1 + half,
            d2 + half,
            d3 + half,
            d4 + half,
            d5 + half,
            d6 + half,
            d7 + half,
            offs,
            mask,
            W,
            ".cg",
            "",
        )
        tl.store(dst + offs, acc.to(dst.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_ONLY)
def one_shot_kernel(
    inp,
    out,
    own,
    d0,
    d1,
    d2,
    d3,
    d4,
    d5,
    d6,
    d7,
    flag_table,
    own_flags,
    counters,
    status_addr,
    n,
    num_tiles,
    half_elems,
    rank,
    max_spins,
    W: tl.constexpr,
    TILE: tl.constexpr,
    MAXB: tl.constexpr,
):
    """Copy the input into this rank's buffer, meet, then sum every rank's buffer."""
    b = tl.program_id(0)
    epoch, half = _arrive(
        inp,
        own,
        flag_table,
        own_flags,
        counters,
        status_addr,
        n,
        num_tiles,
        half_elems,
        rank,
        max_spins,
        W,
        TILE,
        MAXB,
    )
    _reduce_tiles(
        d0, d1, d2, d3, d4, d5, d6, d7, half, out, b, tl.num_programs(0), n, num_tiles, W, TILE
    )
    tl.store(counters + b, epoch)


@triton.jit(do_not_specialize=_RUNTIME_ONLY)
def two_shot_kernel(
    inp,
    out,
    own,
    d0,
    d1,
    d2,
    d3,
    d4,
    d5,
    d6,
    d7,
    flag_table,
    own_flags,
    counters,
    status_addr,
    n,
    num_tiles,
    half_elems,
    rank,
    max_spins,
    W: tl.constexpr,
    TILE: tl.constexpr,
    MAXB: tl.constexpr,
):
    """Copy in, meet, reduce the tiles this rank owns into its buffer, meet, gather."""
    b = tl.program_id(0)
    G = tl.num_programs(0)
    epoch, half = _arrive(
        inp,
        own,
        flag_table,
        own_flags,
        counters,
        status_addr,
        n,
        num_tiles,
        half_elems,
        rank,
        max_spins,
        W,
        TILE,
        MAXB,
    )
    _reduce_tiles(
        d0, d1, d2, d3, d4, d5, d6, d7, half, own + half, b + G * rank, G * W, n, num_tiles, W, TILE
    )
    _barrier(flag_table, own_flags, status_addr, 1, b, rank, epoch, max_spins, W, MAXB)
    peers = (d0, d1, d2, d3, d4, d5, d6, d7)
    for r in tl.static_range(W):  # every rank's reduced tiles, from its buffer
        _copy_tiles(peers[r] + half, out, b + r * G, G * W, n, num_tiles, TILE, ".cg")
    tl.store(counters + b, epoch)


def reduce_n(xs, out, *, block: int = 4096, num_warps: int = 8, evict: str = "") -> None:
    """out = sum(xs) with `reduce_n_kernel` (2..8 same-shape contiguous inputs)."""
    count = out.numel()
    if not 2 <= len(xs) <= MAX_RANKS:
        raise ValueError(f"reduce_n: expected 2..{MAX_RANKS} inputs, got {len(xs)}")
    ptrs = list(xs) + [xs[0]] * (MAX_RANKS - len(xs))
    reduce_n_kernel[(triton.cdiv(count, block),)](
        *ptrs, out, count, N=len(xs), BLOCK=block, EVICT=evict, num_warps=num_warps
    )
