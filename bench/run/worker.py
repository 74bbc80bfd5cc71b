"""One rank's sweep loop. Rank 0 gathers, writes the table and shows progress.

Runs under `bench sweep` (which launches it through torchrun's launcher API), under the user's
own `torchrun ... -m bench.run.worker <sweep flags>`, or under SLURM `srun python -m bench.run.worker`.
"""

from __future__ import annotations

import datetime
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from bench.analysis.results import (
    ResultsWriter,
    RunDirLocked,
    completed_points,
    point_key,
    read_meta,
    write_meta,
)
from bench.backends import CommContext
from bench.launch.config import DTYPES, SweepConfig, parse_sweep_config
from bench.launch.flags import run_command
from bench.launch.watchdog import Watchdog
from bench.run.hardware import fingerprint
from bench.run.point import PointRunner
from bench.run.session import create_backend, rank_session, shared_tag, sweep_context

__all__ = ["run_worker", "RankMismatch", "point_plan", "main"]


class RankMismatch(RuntimeError):
    """Ranks disagree on which point they are about to measure."""


def point_plan(cfg: SweepConfig) -> Iterator[tuple[str, str, str, int]]:
    """(backend, dtype, mode, bytes) in sweep order: backend-major, then dtype, mode, size."""
    for backend in cfg.backends:
        for dtype in cfg.dtypes:
            for mode in cfg.modes:
                for nbytes in cfg.sizes:
                    yield backend, dtype, mode, nbytes


def _agree(value, group, what: str):
    """All-gather `value`; raise RankMismatch naming the ranks that differ."""
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, value, group=group)
    if any(v != gathered[0] for v in gathered):
        detail = "; ".join(f"rank {r}: {v}" for r, v in enumerate(gathered))
        raise RankMismatch(f"ranks disagree on {what}: {detail}")
    return gathered


def _open_run(cfg: SweepConfig, ctx: CommContext, fp: dict) -> tuple[str, str]:
    """Rank 0 picks the run directory and id (new or resumed); all ranks learn them."""
    payload: list = [None]
    if ctx.rank == 0:
        if cfg.resume:
            meta = read_meta(cfg.out)
            run_id = meta.get("run_id") or Path(cfg.out).name
            out = cfg.out
        else:
            run_id = cfg.run_id or (datetime.datetime.now().strftime("%Y%m%d-%H%M%S") +
                                    f"-{uuid.uuid4().hex[:6]}")
            out = cfg.out or str(Path("results") / fp["hardware_key"] / run_id)
        payload = [(out, run_id)]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _skip_row(base: dict, nbytes: int, itemsize: int, reason: str) -> dict:
    return {**base, "bytes": nbytes, "count": nbytes // itemsize, "iters": 0,
            "latency_us": None, "p10_us": None, "p90_us": None, "algbw_gbps": None,
            "busbw_gbps": None, "correct": None, "max_abs_err": None,
            "skipped_reason": reason.replace("\n", " ")[:300]}


def run_worker(cfg: SweepConfig) -> int:
    with rank_session(cfg.timeout_s) as (layout, watchdog):
        try:
            return _sweep(cfg, layout, watchdog)
        except RankMismatch as exc:
            # every rank saw the same gathered values; one line, from rank 0
            if layout["rank"] == 0:
                print(f"bench: error: {exc}", file=sys.stderr, flush=True)
            return 1
        except RunDirLocked as exc:  # another sweep took the directory between check and start
            print(f"bench: error: --out: {exc}", file=sys.stderr, flush=True)
            os._exit(2)  # the launcher ends the other ranks, which wait for this one
        except Exception:
            watchdog.end_silent_peers()  # a peer-side timeout: name (and end) the stopped peers
            raise


def _sweep(cfg: SweepConfig, layout: dict[str, int], watchdog: Watchdog) -> int:
    rank = layout["rank"]
    fp = fingerprint(cfg.device) if rank == 0 else None
    tag = shared_tag()  # for shm segment and IPC names
    watchdog.attach_heartbeat(layout["world_size"], tag)
    ctx = sweep_context(cfg, layout, tag)
    out, run_id = _open_run(cfg, ctx, fp or {})
    writer, done = _start_table(cfg, ctx, fp, out, run_id) if rank == 0 else (None, set())
    shared: list = [(fp or {}).get("hardware_key"), done]
    dist.broadcast_object_list(shared, src=0)
    hardware_key, done = shared
    plan = [p for p in point_plan(cfg)
            if point_key(backend=p[0], world_size=ctx.world_size, dtype=p[1], bytes=p[3],
                         mode=p[2]) not in done]
    progress = None
    if rank == 0 and not cfg.quiet:
        from tqdm import tqdm

        progress = tqdm(total=len(plan), unit="pt", desc=f"sweep ws={ctx.world_size}",
                        dynamic_ncols=True, file=sys.stderr)
    runner = PointRunner(ctx, iters=cfg.iters, warmup=cfg.warmup, graph_calls=cfg.graph_calls,
                         l2_flush=cfg.l2_flush)
    try:
        current, backend, backend_reason = None, None, None
        for index, (name, dtype_name, mode, nbytes) in enumerate(plan):
            watchdog.beat(f"{name} {dtype_name} {mode} {nbytes}B")
            _agree((name, dtype_name, mode, nbytes), ctx.cpu_group,
                   "the next point (backend, dtype, mode, bytes)")
            if name != current:
                if backend is not None:
                    backend.release()
                backend, backend_reason = create_backend(name, cfg, ctx)
                current = name
            base = {"run_id": run_id, "hardware_key": hardware_key, "backend": name,
                    "world_size": ctx.world_size, "nnodes": ctx.nnodes, "dtype": dtype_name,
                    "mode": mode}
            row = _point_row(runner, backend, backend_reason, base, nbytes, seed=1 + index)
            if writer is not None:
                writer.append(row)
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"{name} {dtype_name} {mode}", refresh=False)
        if backend is not None:
            backend.release()
    finally:
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
    return _finish(out) if rank == 0 else 0


def _start_table(cfg: SweepConfig, ctx: CommContext, fp: dict, out: str,
                 run_id: str) -> tuple[ResultsWriter, set]:
    """Rank 0: the table's writer, the points already done (on --resume), meta.json."""
    writer = ResultsWriter(out)
    done = completed_points(out) if cfg.resume else set()
    meta = read_meta(out) if cfg.resume else {}
    meta.update({"run_id": run_id, "hardware_key": fp["hardware_key"], "fingerprint": fp,
                 "arguments": cfg.to_json(), "nnodes": ctx.nnodes,
                 "hosts": len(set(ctx.extra["hosts"])), "l2_flush": cfg.l2_flush,
                 "timer": "cuda-events" if cfg.device == "cuda" else "perf_counter"})
    meta.setdefault("started", datetime.datetime.now().isoformat(timespec="seconds"))
    write_meta(out, meta)
    return writer, done


def _point_row(runner: PointRunner, backend, backend_reason: str | None, base: dict,
               nbytes: int, seed: int) -> dict:
    """One row of the table: measured and checked, or skipped with the reason."""
    dtype_name = base["dtype"]
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if backend_reason:
        return _skip_row(base, nbytes, itemsize, backend_reason)
    if nbytes % itemsize:
        return _skip_row(base, nbytes, itemsize, f"{nbytes} bytes is not a whole number "
                         f"of {dtype_name} elements")
    reason, stats, correct, err = runner.run(backend, dtype, base["mode"], nbytes, seed=seed)
    if reason:
        return _skip_row(base, nbytes, itemsize, reason)
    return {**base, "bytes": nbytes, "count": nbytes // itemsize, "iters": runner.iters,
            "latency_us": stats.latency_us, "p10_us": stats.p10_us, "p90_us": stats.p90_us,
            "algbw_gbps": stats.algbw_gbps, "busbw_gbps": stats.busbw_gbps,
            "correct": correct, "max_abs_err": err, "skipped_reason": None}


def _finish(out: str) -> int:
    """Rank 0: the finish time in meta.json, and the summary; 1 when a sum was wrong."""
    meta = read_meta(out)
    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    write_meta(out, meta)
    from bench.analysis.report import print_summary

    if print_summary(out):
        return 1  # wrong sums: the summary said so loudly, the exit code says so too
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.run.worker <bench sweep flags>` under torchrun or srun."""
    return run_command("bench", lambda: run_worker(parse_sweep_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
