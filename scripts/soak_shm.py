"""Soak the shared-memory all-reduce: 100,000 verified all-reduces across 2 ranks.

Both shm algorithms live side by side (two segments) and take turns; sizes cycle from 4 B to
1 MiB (odd element counts included) in float32 and bfloat16, and every result is compared with
the exact sum of known inputs. Reports errors (must be 0), resident memory of each rank at the
start (after set-up and a warm-up) and at the end, descriptors and /dev/shm entries before and
after. Ranks are started through the sweep's launcher (torchrun's launcher API).

    python scripts/soak_shm.py [--iters 100000] [--world-size 2] [--out results/soak.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ALGORITHMS = ("shm_one_shot", "shm_two_shot")
SIZES_BYTES = (4, 252, 4096, 4100, 32768, 131072, 1 << 20)
DTYPES = ("float32", "bfloat16")
SEEDS = 5  # inputs cycle through this many seeds per (size, dtype)
WARMUP = 200


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def shm_entries() -> int:
    from bench.backends.shm_segment import NAME_PREFIX

    return sum(name.startswith(NAME_PREFIX) for name in os.listdir("/dev/shm"))


def _cases(rank: int, world_size: int):
    """(dtype, input, expected) per (size, dtype, seed), built once: the loop only copies."""
    import torch

    from bench.launch.config import DTYPES as TORCH_DTYPES
    from bench.run.inputs import fill_input, reference_sum

    cases = []
    for nbytes in SIZES_BYTES:
        for dtype_name in DTYPES:
            dtype = TORCH_DTYPES[dtype_name]
            count = nbytes // torch.empty((), dtype=dtype).element_size()
            for seed in range(1, SEEDS + 1):
                data = fill_input(torch.empty(count, dtype=dtype), rank, seed)
                expected = reference_sum(count, world_size, seed, torch.device("cpu")).to(dtype)
                cases.append((data, expected))
    return cases


def soak_rank(cfg, iters: int, out: str | None) -> int:
    import torch
    import torch.distributed as dist

    from bench.run.worker import _make_context, create_backend, dist_env

    layout = dist_env()
    # the verification's own torch ops get this rank's share of the cores: with torch's default
    # (every core per process) their OpenMP threads spin against the peer rank's reduction
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // layout["local_world_size"]))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg.timeout_s + 30))
    try:
        tag = ["soak" + os.urandom(4).hex() if layout["rank"] == 0 else None]
        dist.broadcast_object_list(tag, src=0)
        ctx = _make_context(cfg, layout, tag[0])
        fds_before, shm_before = len(os.listdir("/proc/self/fd")), shm_entries()
        backends = []
        for name in ALGORITHMS:
            backend, reason = create_backend(name, cfg, ctx)
            if backend is None:
                raise SystemExit(f"soak: {name} cannot run here: {reason}")
            backends.append(backend)
        cases = _cases(ctx.rank, ctx.world_size)
        work = [torch.empty_like(data) for data, _ in cases]
        errors = {name: 0 for name in ALGORITHMS}
        calls = {name: 0 for name in ALGORITHMS}
        first_error = None

        def step(i: int) -> None:
            nonlocal first_error
            index = i % len(cases)
            backend = backends[(i // len(cases)) % len(backends)]
            data, expected = cases[index]
            buf = work[index]
            buf.copy_(data)
            result = backend.all_reduce(buf)
            calls[backend.name] += 1
            if not torch.equal(result, expected):
                errors[backend.name] += 1
                if first_error is None:
                    first_error = (f"iteration {i}: {backend.name} {expected.dtype} "
                                   f"{expected.numel()} elements")

        for i in range(WARMUP):
            step(i)
        errors = dict.fromkeys(ALGORITHMS, 0)
        calls = dict.fromkeys(ALGORITHMS, 0)
        dist.barrier()
        rss_start = rss_kib()
        start = time.perf_counter()
        for i in range(iters):
            step(i)
        elapsed_s = time.perf_counter() - start
        rss_end = rss_kib()
        for backend in backends:
            backend.release()
        dist.barrier()
        fds_after, shm_after = len(os.listdir("/proc/self/fd")), shm_entries()
        mine = {"rank": ctx.rank, "errors": errors, "calls": calls, "first_error": first_error,
                "rss_start_kib": rss_start, "rss_end_kib": rss_end, "elapsed_s": elapsed_s,
                "fds": (fds_before, fds_after), "shm": (shm_before, shm_after)}
        gathered: list = [None] * ctx.world_size
        dist.all_gather_object(gathered, mine)
        total = sum(sum(r["errors"].values()) for r in gathered)
        if ctx.rank == 0:
            text = report(gathered, iters, ctx.world_size)
            print(text)
            if out:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                Path(out).write_text(text + "\n")
        return 1 if total else 0
    finally:
        dist.destroy_process_group()


def report(ranks: list[dict], iters: int, world_size: int) -> str:
    import torch

    from bench.run.hardware import _cpu_model

    elapsed = max(r["elapsed_s"] for r in ranks)
    total_errors = sum(sum(r["errors"].values()) for r in ranks)
    calls = ranks[0]["calls"]
    lines = [
        "# shm all-reduce soak",
        "",
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}.",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}. Command: "
        f"`python scripts/soak_shm.py --iters {iters} --world-size {world_size}`.",
        "",
        f"{iters:,} verified all-reduces per rank across {world_size} ranks "
        f"({', '.join(f'{n} {c:,}' for n, c in calls.items())}), after {WARMUP} warm-up calls; "
        f"sizes {', '.join(map(str, SIZES_BYTES))} bytes x {', '.join(DTYPES)}, inputs cycling "
        f"through {SEEDS} seeds, every result compared with the exact sum.",
        f"Wall time {elapsed:.1f} s ({iters / elapsed:,.0f} all-reduces/s, verification "
        "included).",
        "",
        f"**Errors: {total_errors}**" + (" (must be 0)" if total_errors else ""),
        "",
        "| rank | errors | RSS start (MiB) | RSS end (MiB) | growth (KiB) | fds before/after | "
        "/dev/shm entries before/after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ranks:
        lines.append(
            f"| {r['rank']} | {sum(r['errors'].values())} | {r['rss_start_kib'] / 1024:.1f} | "
            f"{r['rss_end_kib'] / 1024:.1f} | {r['rss_end_kib'] - r['rss_start_kib']:+d} | "
            f"{r['fds'][0]}/{r['fds'][1]} | {r['shm'][0]}/{r['shm'][1]} |")
        if r["first_error"]:
            lines.append(f"\nrank {r['rank']} first error: {r['first_error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100_000)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--out", default=None, help="also write the report here (markdown)")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.world_size < 2:
        parser.error("need --iters >= 1 and --world-size >= 2")

    from bench.cli import launch
    from bench.launch.config import SweepConfig

    cfg = SweepConfig(world_size=args.world_size, backends=list(ALGORITHMS),
                      sizes=[max(SIZES_BYTES)], dtypes=list(DTYPES), modes=["eager"],
                      device="cpu", timeout_s=args.timeout, quiet=True)
    return launch(cfg, soak_rank, (cfg, args.iters, args.out))


if __name__ == "__main__":
    sys.exit(main())
