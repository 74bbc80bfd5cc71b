"""Why shm_one_shot / shm_two_shot set torch's intra-op threads inside the call, measured side
by side: 2 ranks over gloo on this host, float32 sums of 64 KiB-4 MiB, three ways per round,
interleaved:

- `per-call`: the `threads` knob's default (cores // local ranks): set for the call's sums
  and restored after (what the backend does);
- `torch's`: `threads=0`, the sums on torch's own setting (the process's other work keeps it);
- `at build`: the process set to the knob's count once, before (what deciding it when the
  backend is built would do to the whole process).

Prints the median per-call latency of each and the ratios to `per-call`.

    python scripts/shm_threads.py [--world-size 2] [--iters 30] [--rounds 5]
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

SIZES = (64 << 10, 512 << 10, 1 << 20, 4 << 20)
WAYS = ("per-call", "torch's", "at build")


def _time_us(backend, tensor: torch.Tensor, iters: int) -> float:
    for _ in range(3):
        backend.all_reduce(tensor)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        backend.all_reduce(tensor)
    return (time.perf_counter() - start) / iters * 1e6


def _rank(rank: int, world_size: int, port: int, args, name: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    ctx = make_context()
    own = torch.get_num_threads()  # torch's setting in this rank
    built = {}
    for way, threads in (("per-call", -1), ("torch's", 0), ("at build", 0)):
        built[way], reason = build_backend(name, {"threads": threads}, max(SIZES), ctx, way[:3])
        assert reason is None, reason
    knob = built["per-call"].threads
    times = {(way, n): [] for way in WAYS for n in SIZES}
    for _ in range(args.rounds):
        for nbytes in SIZES:
            tensor = torch.ones(nbytes // 4)
            for way in WAYS:
                torch.set_num_threads(knob if way == "at build" else own)
                times[way, nbytes].append(_time_us(built[way], tensor, args.iters))
    torch.set_num_threads(own)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, times)
    if rank == 0:
        print(
            f"{name}, {world_size} ranks, {os.cpu_count()} cores: torch's {own} threads, "
            f"knob {knob}; median us per call (slowest rank), ratio to per-call"
        )
        print(f"{'bytes':>9} " + " ".join(f"{w:>18}" for w in WAYS))
        for nbytes in SIZES:
            med = {w: max(statistics.median(g[w, nbytes]) for g in gathered) for w in WAYS}
            cells = [f"{med[w]:9.1f} ({med[w] / med['per-call']:5.2f}x)" for w in WAYS]
            print(f"{nbytes:>9} " + " ".join(f"{c:>18}" for c in cells))
    for backend in built.values():
        backend.release()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="shm_one_shot")
    args = parser.parse_args()
    port = free_port("127.0.0.1")
    mp.spawn(_rank, (args.world_size, port, args, args.backend), nprocs=args.world_size)


if __name__ == "__main__":
    main()
