"""One rank's sweep loop. Rank 0 gathers, writes the table and shows progress.

Runs under `bench sweep` (which launches it through torchrun's launcher API), under the user's
own `torchrun ... -m bench.run.worker <sweep flags>`, or under SLURM `srun python -m bench.run.worker`.
"""

from __future__ import annotations

import datetime
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from bench.analysis.results import (
    META_FILE,
    RESULTS_FILE,
    ResultsWriter,
    RunDirLocked,
    TableRemoved,
    completed_points,
    point_key,
    read_meta,
    write_meta,
)
from bench.backends import CommContext
from bench.launch.config import DTYPES, RUNS_ROOT, SweepConfig, parse_sweep_config
from bench.launch.flags import run_command
from bench.launch.paths import os_error
from bench.launch.watchdog import Watchdog
from bench.run.hardware import fingerprint
from bench.run.point import PointRunner
from bench.run.session import create_backend, rank_session, shared_tag, sweep_context

__all__ = ["run_worker", "RankMismatch", "SweepStopped", "point_plan", "new_run_id", "main"]


class RankMismatch(RuntimeError):
    """Ranks disagree on which point they are about to measure."""


class SweepStopped(RuntimeError):
    """Every rank ends the sweep together: rank 0 cannot write the table (the message says
    why, in one line); `code` is the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def point_plan(cfg: SweepConfig) -> Iterator[tuple[str, str, str, int]]:
    """(backend, dtype, mode, bytes) in sweep order: backend-major, then dtype, mode, size."""
    for backend in cfg.backends:
        for dtype in cfg.dtypes:
            for mode in cfg.modes:
                for nbytes in cfg.sizes:
                    yield backend, dtype, mode, nbytes


def new_run_id() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{uuid.uuid4().hex[:6]}"


def _agree(value, group, what: str, stop: str | None = None):
    """All-gather `value` (and rank 0's `stop`: why the table cannot be written); raise
    SweepStopped on every rank when rank 0 stops, RankMismatch naming the ranks that differ."""
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (value, stop), group=group)
    stops = [s for _, s in gathered if s]
    if stops:
        raise SweepStopped(stops[0])
    if any(v != gathered[0][0] for v, _ in gathered):
        detail = "; ".join(f"rank {r}: {v}" for r, (v, _) in enumerate(gathered))
        raise RankMismatch(f"ranks disagree on {what}: {detail}")
    return [v for v, _ in gathered]


def _open_run(cfg: SweepConfig, ctx: CommContext, fp: dict) -> tuple[str, str]:
    """Rank 0 picks the run directory and id (new or resumed); all ranks learn them."""
    payload: list = [None]
    if ctx.rank == 0:
        if cfg.resume:
            meta = read_meta(cfg.out)
            run_id = meta.get("run_id") or Path(cfg.out).name
            out = cfg.out
        else:
            run_id = cfg.run_id or new_run_id()
            out = cfg.out or str(Path(RUNS_ROOT) / fp["hardware_key"] / run_id)
        payload = [(out, run_id)]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _skip_row(base: dict, nbytes: int, itemsize: int, reason: str) -> dict:
    return {
        **base,
        "bytes": nbytes,
        "count": nbytes // itemsize,
        "iters": 0,
        "latency_us": None,
        "p10_us": None,
        "p90_us": None,
        "algbw_gbps": None,
        "busbw_gbps": None,
        "correct": None,
        "max_abs_err": None,
        "skipped_reason": reason.replace("\n", " ")[:300],
    }


def run_worker(cfg: SweepConfig) -> int:
    with rank_session(cfg.timeout_s) as (layout, watchdog):
        try:
            return _sweep(cfg, layout, watchdog)
        except (RankMismatch, SweepStopped) as exc:
            # every rank saw the same gathered values; one line, from rank 0
            if layout["rank"] == 0:
                print(f"bench: error: {exc}", file=sys.stderr, flush=True)
            return getattr(exc, "code", 1)
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
    table, failed = _Table.open(cfg, ctx, fp, out, run_id) if rank == 0 else (None, None)
    shared: list = [(fp or {}).get("hardware_key"), table.done if table else set(), failed]
    dist.broadcast_object_list(shared, src=0)
    hardware_key, done, failed = shared
    if failed:
        raise SweepStopped(*failed)
    plan = [
        p
        for p in point_plan(cfg)
        if point_key(backend=p[0], world_size=ctx.world_size, dtype=p[1], bytes=p[3], mode=p[2])
        not in done
    ]
    progress = None
    if rank == 0 and not cfg.quiet:
        import threading

        from tqdm import tqdm

        # a thread lock: tqdm's default also makes a multiprocessing one, which a rank ended
        # by Ctrl-C leaves behind ("leaked semaphore objects" at exit)
        tqdm.set_lock(threading.RLock())
        progress = tqdm(
            total=len(plan),
            unit="pt",
            desc=f"sweep ws={ctx.world_size}",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    runner = PointRunner(
        ctx, iters=cfg.iters, warmup=cfg.warmup, graph_calls=cfg.graph_calls, l2_flush=cfg.l2_flush
    )
    held = _Held()
    try:
        stop = None  # rank 0: why the table cannot be written any more
        for index, (name, dtype_name, mode, nbytes) in enumerate(plan):
            watchdog.beat(f"{name} {dtype_name} {mode} {nbytes}B")
            _agree(
                (name, dtype_name, mode, nbytes),
                ctx.cpu_group,
                "the next point (backend, dtype, mode, bytes)",
                stop,
            )
            backend, backend_reason = held.get(name, cfg, ctx)
            base = {
                "run_id": run_id,
                "hardware_key": hardware_key,
                "backend": name,
                "world_size": ctx.world_size,
                "nnodes": ctx.nnodes,
                "dtype": dtype_name,
                "mode": mode,
            }
            row = _point_row(runner, backend, backend_reason, base, nbytes, seed=1 + index)
            if table is not None:
                stop = table.append(row)
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"{name} {dtype_name} {mode}", refresh=False)
        _agree("end", ctx.cpu_group, "the end of the sweep", stop)
    finally:
        held.release()  # every rank, on every path: IPC buffers are freed in order
        if progress is not None:
            progress.close()
        if table is not None:
            table.close()
    return _finish(out) if rank == 0 else 0


class _Held:
    """The backend the sweep measures now: built when the plan reaches it, released when
    the plan moves on and when the sweep ends, on every path (an error included)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.backend, self.reason = None, None

    def get(self, name: str, cfg: SweepConfig, ctx: CommContext):
        if name != self.name:
            self.release()
            self.backend, self.reason = create_backend(name, cfg, ctx)
            self.name = name
        return self.backend, self.reason

    def release(self) -> None:
        backend, self.backend, self.name = self.backend, None, None
        if backend is not None:
            backend.release()


class _Table:
    """Rank 0's side of the run directory: the table's writer, meta.json, the points already
    done; a write that fails becomes the one-line reason every rank stops with."""

    def __init__(self, writer: ResultsWriter, meta: dict, done: set) -> None:
        self.writer, self.meta, self.done = writer, meta, done

    @classmethod
    def open(
        cls, cfg: SweepConfig, ctx: CommContext, fp: dict, out: str, run_id: str
    ) -> tuple[_Table | None, tuple[str, int] | None]:
        """(the table, None), or (None, (why it cannot be written, exit code))."""
        try:
            writer = ResultsWriter(out)
        except RunDirLocked as exc:  # another sweep took the directory since the check
            return None, (f"--out: {exc}", 2)
        except OSError as exc:
            return None, (f"cannot write the run directory {out}: {os_error(exc)}", 1)
        try:
            done = completed_points(out) if cfg.resume else set()
            meta = read_meta(out) if cfg.resume else {}
            meta.update(
                {
                    "run_id": run_id,
                    "hardware_key": fp["hardware_key"],
                    "fingerprint": fp,
                    "arguments": cfg.to_json(),
                    "nnodes": ctx.nnodes,
                    "hosts": len(set(ctx.extra["hosts"])),
                    "l2_flush": cfg.l2_flush,
                    "timer": "cuda-events" if cfg.device == "cuda" else "perf_counter",
                }
            )
            meta.setdefault("started", datetime.datetime.now().isoformat(timespec="seconds"))
            write_meta(out, meta)
        except OSError as exc:
            writer.close()
            return None, (f"cannot write {Path(out) / META_FILE}: {os_error(exc)}", 1)
        return cls(writer, meta, done), None

    def append(self, row: dict) -> str | None:
        """Write `row`; None, or why the sweep must stop (the rows kept, how to go on)."""
        writer = self.writer
        resume = f"continue with --resume {writer.run_dir}"
        try:
            writer.append(row)
            return None
        except TableRemoved:
            try:
                writer.restore()
                write_meta(writer.run_dir, self.meta)
            except OSError as exc:
                return (
                    f"{writer.path} was removed during the sweep; writing its "
                    f"{writer.rows} rows again failed: {os_error(exc)}"
                )
            return (
                f"{writer.path} was removed during the sweep; its {writer.rows} rows "
                f"were written again; {resume}"
            )
        except OSError as exc:
            return (
                f"cannot append to {writer.path}: {os_error(exc)}; its {writer.rows} "
                f"rows are kept; {resume} once it can be written"
            )

    def close(self) -> None:
        self.writer.close()


def _point_row(
    runner: PointRunner, backend, backend_reason: str | None, base: dict, nbytes: int, seed: int
) -> dict:
    """One row of the table: measured and checked, or skipped with the reason."""
    dtype_name = base["dtype"]
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if backend_reason:
        return _skip_row(base, nbytes, itemsize, backend_reason)
    if nbytes % itemsize:
        return _skip_row(
            base, nbytes, itemsize, f"{nbytes} bytes is not a whole number of {dtype_name} elements"
        )
    reason, stats, correct, err = runner.run(backend, dtype, base["mode"], nbytes, seed=seed)
    if reason:
        return _skip_row(base, nbytes, itemsize, reason)
    return {
        **base,
        "bytes": nbytes,
        "count": nbytes // itemsize,
        "iters": runner.iters,
        "latency_us": stats.latency_us,
        "p10_us": stats.p10_us,
        "p90_us": stats.p90_us,
        "algbw_gbps": stats.algbw_gbps,
        "busbw_gbps": stats.busbw_gbps,
        "correct": correct,
        "max_abs_err": err,
        "skipped_reason": None,
    }


def _finish(out: str) -> int:
    """Rank 0: the finish time in meta.json, and the summary; 1 when a sum was wrong."""
    try:
        meta = read_meta(out)
        meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_meta(out, meta)
    except OSError as exc:
        print(
            f"bench: error: cannot write {Path(out) / META_FILE}: {os_error(exc)}; the "
            f"rows are in {Path(out) / RESULTS_FILE}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    from bench.analysis.report import measured_rows, print_summary

    if print_summary(out):
        return 1  # wrong sums: the summary said so loudly, the exit code says so too
    if not measured_rows(out):  # every point skipped: nothing a fit or a figure can use
        print(
            f"bench: error: no point was measured in {out} (every row is skipped, reasons "
            "above); `bench doctor` says what can run here",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.run.worker <bench sweep flags>` under torchrun or srun."""
    return run_command("bench", lambda: run_worker(parse_sweep_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
