"""Timers and statistics, one code path for CPU clocks, CUDA events and CUDA graphs.

A *step* is a zero-argument callable doing `calls_per_step` all-reduces (1 in eager mode, K in
graph mode where the step replays a graph of K captured calls). `measure` returns this rank's
per-call times; `slowest_rank` takes, per iteration, the slowest rank's time (what a
collective costs the job); `summarize` gives median / p10 / p90 and nccl-tests' bandwidths.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist

from bench.analysis.results import busbw_factor

__all__ = [
    "Clock",
    "CpuClock",
    "CudaEventClock",
    "Stats",
    "measure",
    "slowest_rank",
    "summarize",
    "bandwidths_gbps",
    "capture_graph",
    "flush_l2",
]

Step = Callable[[], object]


class Clock(Protocol):
    def time_steps(self, step: Step, iters: int) -> list[float]:
        """Run `step` `iters` times; return each run's duration in microseconds."""
        ...


class CpuClock:
    """Host wall clock around each step (the step is synchronous on CPU)."""

    def time_steps(self, step: Step, iters: int) -> list[float]:
        out = []
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            step()
            out.append((time.perf_counter_ns() - t0) / 1e3)
        return out


class CudaEventClock:
    """CUDA events around each step on the current stream; one synchronisation at the end.

    `between` runs untimed between steps (the optional L2 flush).
    """

    def __init__(self, between: Step | None = None) -> None:
        self.between = between

    def time_steps(self, step: Step, iters: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            if self.between is not None:
                self.between()
            starts[i].record()
            step()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)]


def measure(
    clock: Clock,
    step: Step,
    *,
    iters: int,
    warmup: int,
    calls_per_step: int = 1,
    before: Step | None = None,
) -> list[float]:
    """Warm up, then time `iters` steps; per-call microseconds for this rank.

    `before` runs once after warm-up (a cross-rank barrier, so every rank starts together).
    """
    for _ in range(warmup):
        step()
    if before is not None:
        before()
    return [t / calls_per_step for t in clock.time_steps(step, iters)]


def slowest_rank(per_call_us: list[float], group) -> list[float]:
    """Per iteration, the maximum over ranks (all ranks get the same list)."""
    times = torch.tensor(per_call_us, dtype=torch.float64)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    return times.tolist()


@dataclasses.dataclass(frozen=True)
class Stats:
    latency_us: float  # median of the per-iteration slowest-rank times
    p10_us: float
    p90_us: float
    algbw_gbps: float
    busbw_gbps: float


def bandwidths_gbps(nbytes: int, latency_us: float, world_size: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (1e9 bytes), as nccl-tests defines them for all-reduce."""
    if latency_us <= 0:
        return float("nan"), float("nan")
    algbw = nbytes / latency_us / 1e3
    return algbw, algbw * busbw_factor(world_size)


def summarize(per_call_us: list[float], nbytes: int, world_size: int) -> Stats:
    t = torch.tensor(per_call_us, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)).tolist()
    algbw, busbw = bandwidths_gbps(nbytes, q[0], world_size)
    return Stats(latency_us=q[0], p10_us=q[1], p90_us=q[2], algbw_gbps=algbw, busbw_gbps=busbw)


def capture_graph(fn: Step, calls: int, warmup_stream_iters: int = 3):
    """Capture `calls` invocations of `fn` in one CUDA graph; return the replay step.

    Warm-up runs on a side stream first, as torch.cuda.graphs recommends, so lazy
    initialisation (handles, workspace) happens outside capture.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_stream_iters):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    return graph.replay, graph


def flush_l2(device: torch.device, nbytes: int = 256 << 20) -> Step:
    """A step that evicts L2 by writing a buffer larger than it (recorded in meta.json)."""
    scratch = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def _flush() -> None:
        scratch.zero_()

    return _flush
