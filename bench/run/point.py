"""One measured point, the same way for the sweep and for the tuner's live trials.

`prepare_point` gates the tensor, checks one call on fresh known inputs (inside a CUDA graph in
graph mode) against the exact sum, and returns the step to time: one call in eager mode, a
graph of `graph_calls` calls in graph mode. Every step is collective and every rank gets the
same answer. `PointRunner` times one block of that step (one round of the sweep); the tuner
times it in prunable rounds. `check_numerics` measures a point's arithmetic once (the sweep:
at its first round; `bench.run.numerics`): one more call, a hash of its bytes gathered on the
CPU group, and a reference computed on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from bench.backends import CommContext
from bench.run.context import agreed_reason
from bench.run.inputs import check_result, fill_input
from bench.run.numerics import Numerics, combine, local_numerics, random_input
from bench.run.timing import (
    CpuClock,
    CudaEventClock,
    capture_graph,
    flush_l2,
    measure,
    slowest_rank,
)

__all__ = ["PreparedPoint", "prepare_point", "PointRunner", "barrier", "check_numerics"]


@dataclasses.dataclass
class PreparedPoint:
    reason: str | None = None  # the point is skipped (agreed on every rank)
    max_abs_err: float | None = None  # of the checked call, the worst rank's
    step: Callable[[], object] | None = None  # what to time
    calls_per_step: int = 1
    warmup: int = 0  # warm-up steps for `warmup` calls
    step_us: float | None = None  # the checked call's time, the slowest rank's, per step

    @property
    def correct(self) -> bool:
        return self.max_abs_err == 0.0


def barrier(ctx: CommContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier(group=ctx.cpu_group)


def prepare_point(
    backend,
    ctx: CommContext,
    dtype: torch.dtype,
    mode: str,
    nbytes: int,
    seed: int,
    *,
    graph_calls: int = 10,
    warmup: int = 5,
) -> PreparedPoint:
    """Collective: gate, check one call, build the timing step (see the module doc)."""
    is_cuda = ctx.device.type == "cuda"
    itemsize = torch.empty((), dtype=dtype).element_size()
    reason = None
    if nbytes % itemsize:
        reason = (
            f"{nbytes} bytes is not a whole number of {str(dtype).removeprefix('torch.')} elements"
        )
    tensor = torch.empty(max(nbytes // itemsize, 1), dtype=dtype, device=ctx.device)
    fill_input(tensor, ctx.rank, seed)
    if reason is None:
        reason = backend.can_take(tensor)
    if reason is None and mode == "graph" and not is_cuda:
        reason = "graph mode needs a CUDA device"
    reason = agreed_reason(reason, ctx)
    if reason:
        return PreparedPoint(reason=reason)

    out_holder: list = [None]

    def once() -> None:
        out_holder[0] = backend.all_reduce(tensor)

    check_step = once
    if mode == "graph":
        local = None
        try:
            check_step, _check_graph = capture_graph(once, calls=1)
        except Exception as exc:
            local = f"graph capture failed: {type(exc).__name__}: {exc}"
        reason = agreed_reason(local, ctx)
        if reason:
            return PreparedPoint(reason=reason)
        fill_input(tensor, ctx.rank, seed)  # the capture's warm-up calls summed it already
    barrier(ctx)
    local = None
    start = time.perf_counter()
    try:
        check_step()
        if is_cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # a backend that raises is a skipped point, not a dead sweep
        local = f"all_reduce failed: {type(exc).__name__}: {exc}"
    check_us = (time.perf_counter() - start) * 1e6
    reason = agreed_reason(local, ctx)
    if reason:
        return PreparedPoint(reason=reason)
    # the worst rank's error and the slowest rank's checked call, in one exchange
    err = torch.tensor(
        [check_result(out_holder[0], ctx.rank, ctx.world_size, seed), check_us],
        dtype=torch.float64,
    )
    dist.all_reduce(err, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
    max_abs_err, check_us = float(err[0]), float(err[1])

    if mode == "graph":
        step, _graph = capture_graph(once, calls=graph_calls)
        return PreparedPoint(
            max_abs_err=max_abs_err,
            step=step,
            calls_per_step=graph_calls,
            warmup=max(1, warmup // graph_calls),
            step_us=check_us * graph_calls,  # a replay of one call, K calls to a step
        )
    return PreparedPoint(max_abs_err=max_abs_err, step=once, warmup=warmup, step_us=check_us)


def check_numerics(
    backend, ctx: CommContext, dtype: torch.dtype, mode: str, nbytes: int
) -> Numerics:
    """Collective: one call on random floats of mixed magnitude (a point `prepare_point`
    passed), agreed over every rank: same bits, the reference arithmetic, the error against
    float64. Once per point: a copy to the CPU, a hash and one exchange on the CPU group."""
    count = max(nbytes // torch.empty((), dtype=dtype).element_size(), 1)
    tensor = random_input(dtype, count, ctx.rank).to(ctx.device)
    source = tensor.clone()
    out_holder: list = [None]

    def once() -> None:
        out_holder[0] = backend.all_reduce(tensor)

    step = once
    if mode == "graph":  # the arithmetic of the step that is timed
        step, _graph = capture_graph(once, calls=1)
        tensor.copy_(source)  # the capture's warm-up calls reduced it
    barrier(ctx)
    local: tuple = (None, False, float("inf"))
    try:
        step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        local = local_numerics(out_holder[0], dtype, ctx.world_size, count)
    except Exception:  # said as rank-divergent, not a dead sweep (the exact check passed)
        pass
    per_rank: list = [None] * ctx.world_size
    dist.all_gather_object(per_rank, local, group=ctx.cpu_group)
    return combine(per_rank)


class PointRunner:
    """The sweep's measurement of one block of a (backend, dtype, mode, size) point on this
    rank: prepared and checked, warmed up, then timed for at least `iters` iterations and at
    least `block_us` of the slowest rank's time (at most `max_iters`): a block of a fast point
    holds enough iterations that its median means something (4 replays of a 15 us graph are
    mostly launch jitter), a slow point's block stays `iters` long."""

    def __init__(
        self,
        ctx: CommContext,
        *,
        iters: int,
        warmup: int,
        graph_calls: int = 10,
        l2_flush: bool = False,
        block_us: float = 0.0,
        max_iters: int = 200,
    ) -> None:
        self.ctx, self.iters, self.warmup, self.graph_calls = ctx, iters, warmup, graph_calls
        self.block_us, self.max_iters = block_us, max(max_iters, iters)
        is_cuda = ctx.device.type == "cuda"
        between = flush_l2(ctx.device) if (l2_flush and is_cuda) else None
        self.clock = CudaEventClock(between) if is_cuda else CpuClock()

    def run(
        self, backend, dtype: torch.dtype, mode: str, nbytes: int, seed: int
    ) -> tuple[str | None, list[float] | None, bool | None, float | None]:
        """(skip reason, the slowest rank's per-call microseconds per iteration, correct,
        max_abs_err); one of the first two is None."""
        point = prepare_point(
            backend,
            self.ctx,
            dtype,
            mode,
            nbytes,
            seed,
            graph_calls=self.graph_calls,
            warmup=self.warmup,
        )
        if point.reason:
            return point.reason, None, None, None
        iters = self._iters_for(point)
        per_call = measure(
            self.clock,
            point.step,
            iters=iters,
            warmup=point.warmup,
            calls_per_step=point.calls_per_step,
            before=lambda: barrier(self.ctx),
        )
        return None, slowest_rank(per_call, self.ctx.cpu_group), point.correct, point.max_abs_err

    def _iters_for(self, point: PreparedPoint) -> int:
        """Timed steps for this block. A slow point (the checked call's time, the slowest
        rank's, says `iters` steps already fill `block_us`) stays at `iters`: no extra call.
        A fast one times one step on every rank (a replay of K calls is not K times one
        call's host time), agrees on the slowest, and runs as many steps as fill `block_us`
        (every rank the same count: the steps are collective)."""
        if self.block_us <= 0 or not point.step_us:
            return self.iters
        if point.step_us * self.iters >= self.block_us:
            return self.iters
        barrier(self.ctx)
        step_us = slowest_rank(self.clock.time_steps(point.step, 1), self.ctx.cpu_group)[0]
        wanted = math.ceil(self.block_us / max(step_us, 1e-3))
        return min(self.max_iters, max(self.iters, wanted))
