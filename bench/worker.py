"""One rank's sweep loop. Rank 0 gathers, writes the table and shows progress.

Runs under `bench sweep` (which launches it through torchrun's launcher API), under the user's
own `torchrun ... -m bench.worker <sweep flags>`, or under SLURM `srun python -m bench.worker`.
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

from .backends import CommContext
from .config import DTYPES, SweepConfig
from .group import agreed_reason, build_backend, make_context
from .hardware import fingerprint
from .inputs import check_result, fill_input
from .results import ResultsWriter, RunDirLocked, completed_points, read_meta, write_meta
from .timing import CpuClock, CudaEventClock, capture_graph, flush_l2, measure, slowest_rank
from .timing import summarize as summarize_times
from .watchdog import Watchdog

__all__ = ["run_worker", "RankMismatch", "dist_env", "point_plan", "PointRunner", "create_backend"]


class RankMismatch(RuntimeError):
    """Ranks disagree on which point they are about to measure."""


def dist_env() -> dict[str, int]:
    """Rank layout from torchrun's variables, or SLURM's when started by srun."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", 0)),
                "local_world_size": int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))}
    if "SLURM_PROCID" in env:
        layout = {"rank": int(env["SLURM_PROCID"]), "world_size": int(env["SLURM_NTASKS"]),
                  "local_rank": int(env.get("SLURM_LOCALID", 0)),
                  "local_world_size": int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])}
        os.environ.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(layout["rank"]), str(layout["world_size"])
        return layout
    raise RuntimeError("no rank layout: run through `bench sweep`, torchrun or srun")


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


def _make_context(cfg: SweepConfig, layout: dict[str, int], run_tag: str) -> CommContext:
    device = torch.device("cpu")
    if cfg.device == "cuda":
        device = torch.device("cuda", layout["local_rank"] % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    ctx = make_context(dist.group.WORLD, device, cfg.timeout_s, run_tag=run_tag)
    ctx.extra["launch_nnodes"] = cfg.nnodes
    return ctx


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


class PointRunner:
    """Measures one (backend, dtype, mode, size) point on this rank."""

    def __init__(self, cfg: SweepConfig, ctx: CommContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.is_cuda = ctx.device.type == "cuda"
        between = flush_l2(ctx.device) if (cfg.l2_flush and self.is_cuda) else None
        self.clock = CudaEventClock(between) if self.is_cuda else CpuClock()

    def _sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize()

    def _barrier(self) -> None:
        self._sync()
        dist.barrier(group=self.ctx.cpu_group)

    def run(self, backend, dtype: torch.dtype, mode: str, nbytes: int, seed: int):
        """Returns (skip reason, stats, correct, max_abs_err); one of the first two is None."""
        ctx = self.ctx
        count = nbytes // torch.empty((), dtype=dtype).element_size()
        tensor = torch.empty(count, dtype=dtype, device=ctx.device)
        fill_input(tensor, ctx.rank, seed)
        reason = backend.can_take(tensor)
        if mode == "graph" and not self.is_cuda:
            reason = reason or "graph mode needs a CUDA device"
        reason = agreed_reason(reason, ctx)
        if reason:
            return reason, None, None, None

        # correctness on fresh inputs, the way the mode runs it (inside a graph in graph mode)
        out_holder: list = [None]

        def _once() -> None:
            out_holder[0] = backend.all_reduce(tensor)

        check_step = _once
        if mode == "graph":
            local = None
            try:
                check_step, _check_graph = capture_graph(_once, calls=1)
            except Exception as exc:
                local = f"graph capture failed: {type(exc).__name__}: {exc}"
            reason = agreed_reason(local, ctx)
            if reason:
                return reason, None, None, None
        fill_input(tensor, ctx.rank, seed)
        self._barrier()
        local = None
        try:
            check_step()
            self._sync()
        except Exception as exc:  # a backend that raises is a skipped point, not a dead sweep
            local = f"all_reduce failed: {type(exc).__name__}: {exc}"
        reason = agreed_reason(local, ctx)
        if reason:
            return reason, None, None, None
        result = out_holder[0]
        max_abs_err = check_result(result, ctx.rank, ctx.world_size, seed)
        err_all = torch.tensor([max_abs_err], dtype=torch.float64)
        dist.all_reduce(err_all, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
        max_abs_err = float(err_all.item())
        correct = max_abs_err == 0.0

        if mode == "graph":
            step, _graph = capture_graph(_once, calls=self.cfg.graph_calls)
            calls = self.cfg.graph_calls
        else:
            step, calls = _once, 1
        warmup = self.cfg.warmup if mode == "eager" else max(1, self.cfg.warmup // calls)
        per_call = measure(self.clock, step, iters=self.cfg.iters, warmup=warmup,
                           calls_per_step=calls, before=self._barrier)
        per_call = slowest_rank(per_call, ctx.cpu_group)
        return None, summarize_times(per_call, nbytes, ctx.world_size), correct, max_abs_err


def create_backend(name: str, cfg: SweepConfig, ctx: CommContext):
    """Probe and build on every rank; any rank's reason skips the backend everywhere."""
    return build_backend(name, cfg.params.get(name, {}), max(cfg.sizes), ctx)


def run_worker(cfg: SweepConfig) -> int:
    layout = dist_env()
    watchdog = Watchdog(layout["rank"], cfg.timeout_s)
    # the watchdog (which names silent peers) must act before gloo's own timeout does
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg.timeout_s + 30))
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
    finally:
        watchdog.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def _sweep(cfg: SweepConfig, layout: dict[str, int], watchdog: Watchdog) -> int:
    rank = layout["rank"]
    fp = fingerprint(cfg.device) if rank == 0 else None
    # a tag all ranks share, for shm segment and IPC names
    tag = [uuid.uuid4().hex[:10] if rank == 0 else None]
    dist.broadcast_object_list(tag, src=0)
    watchdog.attach_heartbeat(layout["world_size"], tag[0])
    ctx = _make_context(cfg, layout, tag[0])
    out, run_id = _open_run(cfg, ctx, fp or {})
    writer = None
    done: set = set()
    if rank == 0:
        writer = ResultsWriter(out)
        done = completed_points(out) if cfg.resume else set()
        meta = read_meta(out) if cfg.resume else {}
        meta.update({"run_id": run_id, "hardware_key": fp["hardware_key"], "fingerprint": fp,
                     "arguments": cfg.to_json(), "nnodes": ctx.nnodes, "hosts": len(set(
                         ctx.extra["hosts"])), "l2_flush": cfg.l2_flush,
                     "timer": "cuda-events" if cfg.device == "cuda" else "perf_counter"})
        meta.setdefault("started", datetime.datetime.now().isoformat(timespec="seconds"))
        write_meta(out, meta)
    shared: list = [(fp or {}).get("hardware_key"), done]
    dist.broadcast_object_list(shared, src=0)
    hardware_key, done = shared
    plan = [p for p in point_plan(cfg)
            if (p[0], ctx.world_size, p[1], p[3], p[2]) not in done]
    progress = None
    if rank == 0 and not cfg.quiet:
        from tqdm import tqdm

        progress = tqdm(total=len(plan), unit="pt", desc=f"sweep ws={ctx.world_size}",
                        dynamic_ncols=True, file=sys.stderr)
    runner = PointRunner(cfg, ctx)
    try:
        current, backend, backend_reason = None, None, None
        for index, (name, dtype_name, mode, nbytes) in enumerate(plan):
            key = (name, dtype_name, mode, nbytes)
            watchdog.beat(f"{name} {dtype_name} {mode} {nbytes}B")
            _agree(key, ctx.cpu_group, "the next point (backend, dtype, mode, bytes)")
            if name != current:
                if backend is not None:
                    backend.release()
                backend, backend_reason = create_backend(name, cfg, ctx)
                current = name
            dtype = DTYPES[dtype_name]
            itemsize = torch.empty((), dtype=dtype).element_size()
            base = {"run_id": run_id, "hardware_key": hardware_key, "backend": name,
                    "world_size": ctx.world_size, "nnodes": ctx.nnodes, "dtype": dtype_name,
                    "mode": mode}
            if backend_reason:
                row = _skip_row(base, nbytes, itemsize, backend_reason)
            elif nbytes % itemsize:
                row = _skip_row(base, nbytes, itemsize, f"{nbytes} bytes is not a whole number "
                                f"of {dtype_name} elements")
            else:
                reason, stats, correct, err = runner.run(backend, dtype, mode, nbytes,
                                                         seed=1 + index)
                if reason:
                    row = _skip_row(base, nbytes, itemsize, reason)
                else:
                    row = {**base, "bytes": nbytes, "count": nbytes // itemsize,
                           "iters": cfg.iters, "latency_us": stats.latency_us,
                           "p10_us": stats.p10_us, "p90_us": stats.p90_us,
                           "algbw_gbps": stats.algbw_gbps, "busbw_gbps": stats.busbw_gbps,
                           "correct": correct, "max_abs_err": err, "skipped_reason": None}
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
    if rank == 0:
        meta = read_meta(out)
        meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_meta(out, meta)
        from .report import print_summary

        if print_summary(out):
            return 1  # wrong sums: the summary said so loudly, the exit code says so too
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.worker <bench sweep flags>` under torchrun or srun."""
    from .cli import parse_sweep_config

    cfg = parse_sweep_config(argv)
    return run_worker(cfg)


if __name__ == "__main__":
    sys.exit(main())
