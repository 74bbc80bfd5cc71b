"""`bench soak`: soak the shared-memory all-reduce, 100,000 verified all-reduces across 2 ranks.

Both shm algorithms live side by side (two segments) and take turns; sizes cycle from 4 B to
1 MiB (odd element counts included) in float32 and bfloat16, and every result is compared with
the exact sum of known inputs. Reports errors (must be 0), resident memory of each rank at the
start (after set-up and a warm-up) and at the end, descriptors and /dev/shm entries before and
after. Ranks are started through the sweep's launcher (torchrun's launcher API).

    bench soak [--iters 100000] [--world-size 2] [--timeout 60] [--out results/soak.md]
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time

import torch
import torch.distributed as dist

from bench.backends.shm_segment import NAME_PREFIX
from bench.dtypes import DTYPES as TORCH_DTYPES
from bench.launch.config import SweepConfig
from bench.launch.flags import OutputError, UsageParser, int_flag, seconds_flag
from bench.launch.launcher import launch
from bench.launch.paths import writable_file, write_output
from bench.run.hardware import cpu_model
from bench.run.inputs import fill_input, reference_sum
from bench.run.session import create_backend, rank_session, shared_tag, sweep_context

__all__ = ["main"]

ALGORITHMS = ("shm_one_shot", "shm_two_shot")
SIZES_BYTES = (4, 252, 4096, 4100, 32768, 131072, 1 << 20)
DTYPES = ("float32", "bfloat16")
SEEDS = 5  # inputs cycle through this many seeds per (size, dtype)
WARMUP = 200


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def _shm_entries() -> int:
    return sum(name.startswith(NAME_PREFIX) for name in os.listdir("/dev/shm"))


def _cases(rank: int, world_size: int) -> list[tuple]:
    """(input, expected) per (size, dtype, seed), built once: the loop only copies."""
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


class _Soak:
    """The backends taking turns over the cases, counting calls and wrong results."""

    def __init__(self, backends: list, cases: list[tuple], watchdog) -> None:
        self.backends, self.cases, self.watchdog = backends, cases, watchdog
        self.work = [torch.empty_like(data) for data, _ in cases]
        self.first_error: str | None = None
        self.reset()

    def reset(self) -> None:
        self.errors = dict.fromkeys(ALGORITHMS, 0)
        self.calls = dict.fromkeys(ALGORITHMS, 0)

    def step(self, i: int) -> None:
        index = i % len(self.cases)
        if index == 0:
            self.watchdog.beat(f"soak iteration {i}")
        backend = self.backends[(i // len(self.cases)) % len(self.backends)]
        data, expected = self.cases[index]
        buf = self.work[index]
        buf.copy_(data)
        result = backend.all_reduce(buf)
        self.calls[backend.name] += 1
        if not torch.equal(result, expected):
            self.errors[backend.name] += 1
            if self.first_error is None:
                self.first_error = (
                    f"iteration {i}: {backend.name} {expected.dtype} {expected.numel()} elements"
                )


def _soak_rank(cfg, iters: int, out: str | None) -> int:
    """One launched rank: set up, warm up, soak, then rank 0 prints (and writes) the report."""
    with rank_session(cfg.timeout_s) as (layout, watchdog):
        # the verification's own torch ops get this rank's share of the cores: with torch's
        # default (every core per process) their OpenMP threads spin against the peer's reduction
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // layout["local_world_size"]))
        ctx = sweep_context(cfg, layout, shared_tag("soak"))
        fds_before, shm_before = len(os.listdir("/proc/self/fd")), _shm_entries()
        backends = []
        try:  # released on every path (idempotent)
            for name in ALGORITHMS:
                backend, reason = create_backend(name, cfg, ctx)
                if backend is None:
                    raise SystemExit(f"soak: {name} cannot run here: {reason}")
                backends.append(backend)
            soak = _Soak(backends, _cases(ctx.rank, ctx.world_size), watchdog)
            for i in range(WARMUP):
                soak.step(i)
            soak.reset()
            dist.barrier()
            rss_start, start = _rss_kib(), time.perf_counter()
            for i in range(iters):
                soak.step(i)
            elapsed_s, rss_end = time.perf_counter() - start, _rss_kib()
        finally:
            for backend in backends:
                backend.release()
        dist.barrier()
        mine = {
            "rank": ctx.rank,
            "errors": soak.errors,
            "calls": soak.calls,
            "first_error": soak.first_error,
            "rss_start_kib": rss_start,
            "rss_end_kib": rss_end,
            "elapsed_s": elapsed_s,
            "fds": (fds_before, len(os.listdir("/proc/self/fd"))),
            "shm": (shm_before, _shm_entries()),
        }
        gathered: list = [None] * ctx.world_size
        dist.all_gather_object(gathered, mine)
        if ctx.rank == 0:
            text = _report(gathered, iters, ctx.world_size)
            print(text)
            if out and not _write_report(out, text):
                return 1
        return 1 if sum(sum(r["errors"].values()) for r in gathered) else 0


def _write_report(out: str, text: str) -> bool:
    """Rank 0: the report into --out; False (and one line) when it cannot be written."""
    try:
        write_output("--out", out, text + "\n")
    except OutputError as exc:
        print(f"bench: error: {exc}", flush=True, file=sys.stderr)
        return False
    return True


def _report(ranks: list[dict], iters: int, world_size: int) -> str:
    """The markdown report of every rank's figures."""
    elapsed = max(r["elapsed_s"] for r in ranks)
    total_errors = sum(sum(r["errors"].values()) for r in ranks)
    calls = ranks[0]["calls"]
    lines = [
        "# shm all-reduce soak",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}.",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}. Command: "
        f"`bench soak --iters {iters} --world-size {world_size}`.",
        "",
        f"{iters:,} verified all-reduces per rank across {world_size} ranks "
        f"({', '.join(f'{n} {c:,}' for n, c in calls.items())}), after {WARMUP} warm-up calls; "
        f"sizes {', '.join(map(str, SIZES_BYTES))} bytes x {', '.join(DTYPES)}, inputs cycling "
        f"through {SEEDS} seeds, every result compared with the exact sum.",
        f"Wall time {elapsed:.1f} s ({iters / elapsed:,.0f} all-reduces/s, verification included).",
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
            f"{r['fds'][0]}/{r['fds'][1]} | {r['shm'][0]}/{r['shm'][1]} |"
        )
        if r["first_error"]:
            lines.append(f"\nrank {r['rank']} first error: {r['first_error']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = UsageParser(prog="bench soak", description=__doc__.splitlines()[0])
    parser.add_argument("--iters", default="100000", help="verified all-reduces per rank")
    parser.add_argument("--world-size", dest="world_size", default="2", help="ranks (>= 2)")
    parser.add_argument(
        "--timeout", default="60", help="seconds without progress before a rank is ended"
    )
    parser.add_argument("--out", default=None, help="also write the report here (markdown)")
    args = parser.parse_args(argv)
    cfg = SweepConfig(
        world_size=int_flag("--world-size", args.world_size, minimum=2),
        backends=list(ALGORITHMS),
        sizes=[max(SIZES_BYTES)],
        dtypes=list(DTYPES),
        modes=["eager"],
        device="cpu",
        timeout_s=seconds_flag("--timeout", args.timeout),
        quiet=True,
    )
    iters = int_flag("--iters", args.iters)
    if args.out:
        writable_file("--out", args.out)
    return launch(cfg, _soak_rank, (cfg, iters, args.out))
