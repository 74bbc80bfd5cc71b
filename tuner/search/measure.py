"""One live trial on every rank: the sweep's measurement, in rounds that can be cut short.

The sweep's `bench.run.point.prepare_point` (the same gates, inputs, correctness check on fresh
inputs, CUDA-graph capture in graph mode) and its timers, with the timed iterations split into
rounds: after each round rank 0 reports the median so far to
the Optuna trial and every rank learns whether the pruner stops it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import OrderedDict
from collections.abc import Callable

import torch

from bench.backends import params_key
from bench.run.context import broadcast_object, build_backend
from bench.run.point import barrier, prepare_point
from bench.run.timing import CpuClock, CudaEventClock, measure, slowest_rank, summarize

__all__ = ["Outcome", "TrialRunner", "BackendCache"]


@dataclasses.dataclass
class Outcome:
    status: str  # "ok", "pruned", "skip" (cannot take it: reason), "wrong" (bad sum)
    latency_us: float | None = None
    p10_us: float | None = None
    p90_us: float | None = None
    iters: int = 0
    reason: str | None = None
    max_abs_err: float | None = None


class BackendCache:
    """Built backends per (algorithm, knobs), at most `capacity` alive (least recently used
    released first). Every rank sees the same sequence of requests, so every rank builds and
    releases in the same order (building is collective)."""

    def __init__(self, ctx, max_bytes: int, capacity: int = 6) -> None:
        self.ctx, self.max_bytes, self.capacity = ctx, max_bytes, max(1, capacity)
        self._alive: OrderedDict[tuple, object] = OrderedDict()
        self._failed: dict[tuple, str] = {}
        self._built = 0

    def get(self, name: str, params: dict) -> tuple[object | None, str | None]:
        key = (name, params_key(params))
        if key in self._failed:
            return None, self._failed[key]
        if key in self._alive:
            self._alive.move_to_end(key)
            return self._alive[key], None
        while len(self._alive) >= self.capacity:
            _, old = self._alive.popitem(last=False)
            old.release()
        self._built += 1
        backend, reason = build_backend(
            name, params, self.max_bytes, self.ctx, instance=f"t{self._built}"
        )
        if backend is None:
            self._failed[key] = reason or "unavailable"
            return None, self._failed[key]
        self._alive[key] = backend
        return backend, None

    def release(self) -> None:
        while self._alive:
            _, backend = self._alive.popitem(last=False)
            backend.release()


class TrialRunner:
    def __init__(
        self, ctx, *, iters: int, warmup: int, rounds: int = 4, graph_calls: int = 10
    ) -> None:
        self.ctx = ctx
        self.iters, self.warmup = iters, warmup
        self.rounds = max(1, min(rounds, iters))
        self.graph_calls = graph_calls
        self.is_cuda = ctx.device.type == "cuda"
        self.clock = CudaEventClock() if self.is_cuda else CpuClock()

    def _barrier(self) -> None:
        barrier(self.ctx)

    def run(
        self,
        backend,
        dtype: torch.dtype,
        mode: str,
        nbytes: int,
        seed: int,
        prunable: bool = False,
        on_round: Callable[[int, float], bool] | None = None,
    ) -> Outcome:
        """Collective. With `prunable` (the same on every rank), rank 0 calls
        `on_round(step, median_us)` after each round but the last; True prunes everywhere."""
        ctx = self.ctx
        point = prepare_point(
            backend,
            ctx,
            dtype,
            mode,
            nbytes,
            seed,
            graph_calls=self.graph_calls,
            warmup=self.warmup,
        )
        if point.reason:
            return Outcome("skip", reason=point.reason)
        if not point.correct:
            return Outcome("wrong", reason="wrong sum", max_abs_err=point.max_abs_err)
        step, calls = point.step, point.calls_per_step
        per_round = math.ceil(self.iters / self.rounds)
        times: list[float] = []
        for index in range(self.rounds):
            warm = point.warmup if index == 0 else 0
            part = measure(
                self.clock,
                step,
                iters=per_round,
                warmup=warm,
                calls_per_step=calls,
                before=self._barrier,
            )
            times += slowest_rank(part, ctx.cpu_group)
            if not prunable or index == self.rounds - 1:
                continue
            stop = None
            if ctx.rank == 0:
                stop = bool(on_round(index, statistics.median(times))) if on_round else False
            if broadcast_object(stop, ctx.cpu_group):
                median = statistics.median(times)
                return Outcome("pruned", latency_us=median, iters=len(times))
        stats = summarize(times, nbytes, ctx.world_size)
        return Outcome(
            "ok",
            latency_us=stats.latency_us,
            p10_us=stats.p10_us,
            p90_us=stats.p90_us,
            iters=len(times),
            max_abs_err=0.0,
        )
