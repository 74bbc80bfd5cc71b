"""Runs the custom all-reduce kernels under Triton's CPU interpreter, one process per rank,
over POSIX shared memory standing in for CUDA IPC buffers (what the flag barriers, epochs,
double buffering and tile ownership do does not depend on the device). Used by
tests/test_custom_allreduce.py; prints one line per check and exits non-zero on a failure.

    TRITON_INTERPRET=1 python tests/custom_interp_ranks.py --world-size 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from multiprocessing import shared_memory

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.kernels import reduce as K  # noqa: E402


def _patch_interpreter() -> None:
    """Triton 3.6's interpreter turns a program id (a 1-element array) into a loop bound with
    int(array), which numpy >= 2.3 refuses; take the element instead."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(
            tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
        )

    interp._patch_lang_tensor = patched


_patch_interpreter()

HALF_BYTES = 4096
TILE = 32
BLOCKS = 3
# element counts per call: one tile, partial tiles, more tiles than programs, several per rank
COUNTS = (1, 7, 32, 100, 257, 640)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inputs(rank: int, count: int, call: int) -> torch.Tensor:
    idx = torch.arange(count, dtype=torch.int64)
    return ((idx * (call % 3 + 1) + rank * 5 + call) % 7 - 3).to(torch.float32)


def _launch(
    kernel, inp, views, rank, world, flag_table, own_flags, counters, status, max_spins, out=None
):
    count = inp.numel()
    peers = views + [views[0]] * (K.MAX_RANKS - world)
    half_elems = HALF_BYTES // inp.element_size()
    kernel[(BLOCKS,)](
        inp,
        inp if out is None else out,
        views[rank],
        *peers,
        flag_table,
        own_flags,
        counters,
        status.data_ptr(),
        count,
        -(-count // TILE),
        half_elems,
        rank,
        max_spins,
        W=world,
        TILE=TILE,
        MAXB=K.MAX_BLOCKS,
    )


def _warm_up(rank: int, world: int, buffers, flag_table, own_flags, counters, status, meet) -> None:
    """What `CustomAllReduce._warm_up` does at creation: every kernel variant launched with a
    spin budget of one read (ranks arrive at different times), the timeout word cleared, then
    the ranks meet on the CPU. The checks that follow must all hold: epochs stayed in step."""
    import time

    time.sleep(0.3 * rank)  # a rank still busy on the host while its peers launch
    for kernel in (K.one_shot_kernel, K.two_shot_kernel):
        for dtype in DTYPES:
            views = [b[K.FLAG_BYTES :].view(dtype) for b in buffers]
            size = torch.empty((), dtype=dtype).element_size()
            for count in (256, 256 + 16 // size):
                _launch(
                    kernel,
                    torch.zeros(count, dtype=dtype),
                    views,
                    rank,
                    world,
                    flag_table,
                    own_flags,
                    counters,
                    status,
                    max_spins=1,
                )
    status.zero_()
    meet.wait(timeout=600)


def _rank(rank: int, world: int, names: list[str], mode: str, queue, meet) -> None:
    segments = [shared_memory.SharedMemory(name=name) for name in names]
    buffers = [
        torch.from_numpy(np.ndarray((K.FLAG_BYTES + 2 * HALF_BYTES,), dtype=np.uint8, buffer=s.buf))
        for s in segments
    ]
    flag_table = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    own_flags = buffers[rank][: K.FLAG_BYTES].view(torch.int32)
    counters = torch.zeros(K.MAX_BLOCKS, dtype=torch.int32)
    status = torch.zeros(1, dtype=torch.int64)
    lines = []
    try:
        if mode == "timeout":
            if rank == 0:
                views = [b[K.FLAG_BYTES :].view(torch.float32) for b in buffers]
                inp = _inputs(rank, 64, 0)
                _launch(
                    K.one_shot_kernel,
                    inp,
                    views,
                    rank,
                    world,
                    flag_table,
                    own_flags,
                    counters,
                    status,
                    max_spins=20,
                )
                info = K.decode_status(int(status[0]))
                ok = info is not None and info["peer"] == 1 and info["epoch"] == 1
                lines.append(f"{'ok' if ok else 'FAIL'} timeout rank 0 status={info}")
            return
        if mode == "warmup":
            _warm_up(rank, world, buffers, flag_table, own_flags, counters, status, meet)
        call = 0
        for kernel in (K.one_shot_kernel, K.two_shot_kernel):
            for dtype in DTYPES:
                views = [b[K.FLAG_BYTES :].view(dtype) for b in buffers]
                for count in COUNTS:
                    inp = _inputs(rank, count, call).to(dtype)
                    # every other call out of place (all_reduce_into): the input must stay
                    out = None if call % 2 == 0 else torch.full_like(inp, 99)
                    _launch(
                        kernel,
                        inp,
                        views,
                        rank,
                        world,
                        flag_table,
                        own_flags,
                        counters,
                        status,
                        max_spins=2_000_000,
                        out=out,
                    )
                    ref = sum(_inputs(r, count, call) for r in range(world))
                    result = inp if out is None else out
                    err = (result.to(torch.float32) - ref).abs().max().item()
                    kept = out is None or torch.equal(inp, _inputs(rank, count, call).to(dtype))
                    name = kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel)
                    ok = err == 0 and kept and int(status[0]) == 0
                    where = (
                        "in place"
                        if out is None
                        else "into out, input kept"
                        if kept
                        else "into out, INPUT CHANGED"
                    )
                    lines.append(
                        f"{'ok' if ok else 'FAIL'} {name} {dtype} count={count} "
                        f"call={call} {where} err={err}"
                    )
                    call += 1
        lines.append(f"counters={counters[:BLOCKS].tolist()}")
    except Exception as exc:  # report, never hang the parent
        lines.append(f"FAIL exception {type(exc).__name__}: {exc}")
    finally:
        queue.put((rank, lines))
        for s in segments:
            s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--mode", choices=("sum", "timeout", "warmup"), default="sum")
    args = parser.parse_args(argv)
    size = K.FLAG_BYTES + 2 * HALF_BYTES
    segments = [shared_memory.SharedMemory(create=True, size=size) for _ in range(args.world_size)]
    for s in segments:
        s.buf[: K.FLAG_BYTES] = bytes(K.FLAG_BYTES)
    ctx = mp.get_context("fork")
    queue, meet = ctx.Queue(), ctx.Barrier(args.world_size)
    procs = [
        ctx.Process(
            target=_rank,
            args=(r, args.world_size, [s.name for s in segments], args.mode, queue, meet),
        )
        for r in range(args.world_size)
    ]
    for p in procs:
        p.start()
    failed = False
    try:
        for _ in procs:
            rank, lines = queue.get(timeout=600)
            for line in lines:
                print(f"rank {rank}: {line}")
                failed |= line.startswith("FAIL")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        for s in segments:
            s.close()
            s.unlink()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
