"""What the shm backends' exact arithmetic costs, measured side by side (issue 23 item 2).

World size W ranks over gloo on this host; per round, per size, both backends (shm_one_shot,
shm_two_shot) with `exact=1` (rank order, 16-bit types accumulated in float32 and rounded
once: the default) and `exact=0` (every add rounded to the dtype), interleaved in one process
group, so the two see the same machine. Prints the median per-call latency of each and the
ratio exact / not exact, per backend, dtype and size. Messages up to 256 KiB of shm_one_shot go
through the C short path, which is exact either way (the same code: ratio ~1 there).

    python scripts/shm_exact_cost.py [--world-size 4] [--iters 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.launch.launcher import free_port
from bench.run.context import build_backend, make_context

SIZES = (64 << 10, 512 << 10, 2 << 20, 8 << 20)
DTYPES = (torch.bfloat16, torch.float32)
BACKENDS = ("shm_one_shot", "shm_two_shot")


def _time_us(backend, tensor: torch.Tensor, iters: int) -> float:
    for _ in range(2):
        backend.all_reduce(tensor)
    dist.barrier()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        backend.all_reduce(tensor)
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def _rank(rank: int, world_size: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    ctx = make_context()
    built = {}
    for name in BACKENDS:
        for exact in (1, 0):
            built[name, exact], reason = build_backend(
                name, {"exact": exact}, max(SIZES), ctx, f"x{exact}"
            )
            assert reason is None, reason
    times: dict[tuple, list[float]] = {}
    for r in range(args.rounds):
        for dtype in DTYPES:
            for nbytes in SIZES:
                tensor = torch.ones(
                    nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype
                )
                order = [(n, e) for n in BACKENDS for e in (1, 0)]
                if r % 2:
                    order.reverse()  # neither setting always goes first
                for name, exact in order:
                    key = (name, str(dtype).removeprefix("torch."), nbytes, exact)
                    times.setdefault(key, []).append(
                        _time_us(built[name, exact], tensor, args.iters)
                    )
    if rank == 0:
        print(
            f"# world size {world_size}, median over {args.rounds} rounds of {args.iters}-call medians"
        )
        print(
            f"{'backend':<14} {'dtype':<9} {'bytes':>9} {'exact us':>10} {'not exact us':>13} {'ratio':>6}"
        )
        for name in BACKENDS:
            for dtype in DTYPES:
                label = str(dtype).removeprefix("torch.")
                for nbytes in SIZES:
                    on = statistics.median(times[name, label, nbytes, 1])
                    off = statistics.median(times[name, label, nbytes, 0])
                    print(
                        f"{name:<14} {label:<9} {nbytes:>9} {on:>10.1f} {off:>13.1f} {on / off:>6.2f}"
                    )
    for backend in built.values():
        backend.release()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    mp.start_processes(
        _rank,
        args=(args.world_size, free_port("127.0.0.1"), args),
        nprocs=args.world_size,
        join=True,
        start_method="spawn",
    )


if __name__ == "__main__":
    main()
