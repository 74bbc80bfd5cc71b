"""The ranks: started through the sweep's launcher (or one in this process), every rank's
fingerprint gathered and compared, and each backend probed, created and checked in that group
exactly as a sweep does it (`bench.run.session.create_backend`): one 4 KiB float32 all-reduce
against the exact sum. Every rank returns the same report, so every node can print it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from bench import __version__
from bench import backends as registry
from bench.backends import CommContext
from bench.doctor.node import nccl_library
from bench.launch.config import SweepConfig
from bench.launch.flags import UsageError
from bench.launch.launcher import failure_reason, start_ranks
from bench.run.context import agreed_reason
from bench.run.hardware import gpu_fingerprint, host_id, versions
from bench.run.inputs import check_result, fill_input
from bench.run.session import create_backend, rank_session, shared_tag, sweep_context

__all__ = [
    "rank_fingerprint",
    "compare_fingerprints",
    "ranks_in_process",
    "ranks_launched",
    "COMPARED",
    "CHECK_BYTES",
    "Fingerprint",
]

CHECK_BYTES = 4096
# fingerprint fields that must be equal on every rank of one sweep
COMPARED = (
    "python",
    "torch",
    "cuda",
    "nccl",
    "libnccl",
    "triton",
    "driver",
    "gpu",
    "cc",
    "arch",
    "bench",
)
# what a rank reports about itself; `rank_fingerprint` unless a caller passes another
Fingerprint = Callable[[CommContext], dict[str, Any]]


def rank_fingerprint(ctx: CommContext) -> dict[str, Any]:
    """What must agree across the ranks of one sweep, as this rank (on ctx.device) sees it."""
    import platform

    import torch

    v = versions()
    fp: dict[str, Any] = {
        "host": host_id(),
        "python": v["python"],
        "torch": v["torch"],
        "cuda": v["cuda"],
        "nccl": v["nccl"],
        "triton": v["triton"],
        "arch": platform.machine(),
        "bench": __version__,
        "libnccl": nccl_library().get("version"),
        "driver": None,
        "gpu": None,
        "cc": None,
    }
    if ctx.device.type == "cuda":
        fp["driver"] = gpu_fingerprint().get("driver")
        props = torch.cuda.get_device_properties(ctx.device)
        fp["gpu"], fp["cc"] = props.name, f"{props.major}.{props.minor}"
    return fp


def compare_fingerprints(fps: list[dict[str, Any]]) -> list[str]:
    """One line per field on which ranks differ: `torch: 2.5.1 on ranks 0,1; 2.4.0 on rank 2`."""
    lines = []
    for field in COMPARED:
        groups: dict[str, list[int]] = {}
        for rank, fp in enumerate(fps):
            groups.setdefault(str(fp.get(field)), []).append(rank)
        if len(groups) > 1:
            parts = [
                f"{value} on rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}"
                for value, ranks in groups.items()
            ]
            lines.append(f"{field}: {'; '.join(parts)}")
    return lines


def _check_backend(name: str, cfg: SweepConfig, ctx: CommContext) -> dict[str, Any]:
    """Probe and create as a sweep does, then one verified all-reduce; agreed on all ranks."""

    backend, reason = create_backend(name, cfg, ctx)
    if backend is None:
        return {"backend": name, "status": "unavailable", "reason": reason}
    try:
        status, reason = _checked_sum(backend, ctx)
        return {"backend": name, "status": status, "reason": reason}
    finally:
        try:
            backend.release()
        except Exception as exc:  # reported, not fatal: the other backends still get checked
            print(
                f"bench: doctor: {name}.release() failed: {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )


def _checked_sum(backend, ctx: CommContext) -> tuple[str, str | None]:
    """(status, reason) of one 4 KiB float32 all-reduce checked against the exact sum."""
    import torch
    import torch.distributed as dist

    tensor = fill_input(
        torch.empty(CHECK_BYTES // 4, dtype=torch.float32, device=ctx.device), ctx.rank, seed=7
    )
    error = float("inf")
    try:
        local = backend.can_take(tensor)
    except Exception as exc:
        local = f"can_take failed: {type(exc).__name__}: {exc}"
    if agreed_reason(local, ctx) is None:
        try:
            out = backend.all_reduce(tensor)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            error = check_result(out, ctx.rank, ctx.world_size, seed=7)
        except Exception as exc:
            local = f"all_reduce failed: {type(exc).__name__}: {exc}"
    reason = agreed_reason(local, ctx)
    if reason:
        return "unavailable", reason
    worst = torch.tensor([error], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
    if worst.item() != 0.0:
        return "WRONG", f"4 KiB float32 sum off by {worst.item():g}"
    return "ok", None


def _ranks_report(
    cfg: SweepConfig, layout: dict[str, int], watchdog, fingerprint: Fingerprint = rank_fingerprint
) -> dict[str, Any]:
    """Runs on every rank inside an initialised gloo world group: fingerprints all-gathered
    and compared, every backend's verdict agreed."""
    import torch.distributed as dist

    ctx = sweep_context(cfg, layout, shared_tag("doc"))
    fps: list = [None] * ctx.world_size
    dist.all_gather_object(fps, fingerprint(ctx), group=ctx.cpu_group)
    results = []
    for name in registry.known_names():
        watchdog.beat(f"doctor {name}")
        results.append(_check_backend(name, cfg, ctx))
    return {
        "world_size": ctx.world_size,
        "hosts": ctx.nnodes,
        "device": str(ctx.device),
        "fingerprints": fps,
        "differences": compare_fingerprints(fps),
        "backends": results,
    }


def _rank_main(cfg: SweepConfig, fingerprint: Fingerprint, alone: bool = False) -> dict[str, Any]:
    """One rank: launched, or (`alone`) the only rank, in this process."""

    with rank_session(cfg.timeout_s, alone=alone) as (layout, watchdog):
        return _ranks_report(cfg, layout, watchdog, fingerprint)


def ranks_in_process(
    cfg: SweepConfig, fingerprint: Fingerprint = rank_fingerprint
) -> dict[str, Any]:
    """World size 1: a one-rank gloo group in this process, no launcher needed."""
    return _rank_main(cfg, fingerprint, alone=True)


def ranks_launched(
    cfg: SweepConfig, fingerprint: Fingerprint = rank_fingerprint
) -> tuple[dict[str, Any] | None, str | None]:
    """Start this node's ranks through the sweep's launcher; (report or None, failure)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        results = start_ranks(cfg, _rank_main, (cfg, fingerprint), name="doctor")
    except UsageError:  # the rendezvous port, tried before any rank starts
        raise
    except SignalException as exc:  # Ctrl-C: the ranks are ended, one line from the CLI
        raise KeyboardInterrupt from exc
    except ChildFailedError as exc:
        ranks = ", ".join(
            f"rank {r} ({failure_reason(f)})" for r, f in sorted(exc.failures.items())
        )
        return None, f"failed: {ranks}"
    except Exception as exc:  # rendezvous timeout, unreachable store
        return None, f"launch failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    reports = [report for _, report in sorted(results.items()) if report]
    return (reports[0] if reports else None), None
