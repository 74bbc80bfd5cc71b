"""One rank's sweep loop. Rank 0 gathers, writes the table and shows progress.

Runs under `bench sweep` (which launches it through torchrun's launcher API), under the user's
own `torchrun ... -m bench.run.worker <sweep flags>`, or under SLURM `srun python -m bench.run.worker`.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from bench.analysis.report import measured_rows, print_summary
from bench.analysis.results import (
    META_FILE,
    RESULTS_FILE,
    ROUND_COLUMNS,
    ROUNDS_FILE,
    ResultsWriter,
    RunDirLocked,
    TableRemoved,
    completed_points,
    completed_rounds,
    point_key,
    read_meta,
    write_meta,
)
from bench.backends import CommContext
from bench.dtypes import DTYPES
from bench.launch.config import RUNS_ROOT, SweepConfig, parse_sweep_config
from bench.launch.flags import run_command
from bench.launch.paths import os_error
from bench.run.hardware import fingerprint
from bench.run.noise import noise_after, noise_before
from bench.run.point import PointRunner, check_numerics
from bench.run.rounds import RoundPlan, held_groups, per_round
from bench.run.session import rank_session, shared_tag, sweep_context
from bench.run.watchdog import Watchdog

__all__ = ["run_worker", "RankMismatch", "SweepStopped", "point_plan", "new_run_id", "main"]


class RankMismatch(RuntimeError):
    """Ranks disagree on which point they are about to measure."""


class SweepStopped(RuntimeError):
    """Every rank ends the sweep together: rank 0 cannot write the table (the message says
    why, in one line); `code` is the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


BLOCK_FIELDS = "the next block (backend, dtype, mode, bytes, round)"


def point_plan(cfg: SweepConfig) -> Iterator[tuple[str, str, str, int]]:
    """Every point (backend, dtype, mode, bytes) of the sweep, in the order of its first round:
    per (dtype, mode, size), every backend (`bench.run.rounds.round_order` rotates them)."""
    for dtype, mode, nbytes in size_plan(cfg):
        for backend in cfg.backends:
            yield backend, dtype, mode, nbytes


def size_plan(cfg: SweepConfig) -> list[tuple[str, str, int]]:
    """(dtype, mode, bytes) in the order a round visits them."""
    return [(d, m, n) for d in cfg.dtypes for m in cfg.modes for n in cfg.sizes]


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
    noise = noise_before(cfg, ctx) if rank == 0 else None  # warns in one line where it is due
    out, run_id = _open_run(cfg, ctx, fp or {})
    table, failed = _Table.open(cfg, ctx, fp, out, run_id, noise) if rank == 0 else (None, None)
    shared: list = [(fp or {}).get("hardware_key"), _rounds_left(cfg, table), failed]
    dist.broadcast_object_list(shared, src=0)
    hardware_key, left, failed = shared
    if failed:
        raise SweepStopped(*failed)
    plan = RoundPlan(cfg, size_plan(cfg), left, table.rounds if table else {}, rank == 0)
    base = {"run_id": run_id, "hardware_key": hardware_key, "world_size": ctx.world_size}
    progress = _progress(cfg, ctx, plan) if rank == 0 else None
    runner = PointRunner(
        ctx,
        iters=per_round(cfg.iters, cfg.rounds),
        warmup=per_round(cfg.warmup, cfg.rounds),
        graph_calls=cfg.graph_calls,
        l2_flush=cfg.l2_flush,
        block_us=cfg.block_ms * 1e3,
    )
    stop = None  # rank 0: why the table cannot be written any more
    groups = held_groups(plan.backends(), cfg, ctx)  # closed below: the last group released
    try:
        for row in plan.rows_from_rounds(base):
            stop = _write(table, row, stop)
        for group, reasons in groups:
            for name, reason in reasons.items():  # not built here: a skipped row per point
                for row, blocks in plan.skip_backend(name, reason, base):
                    stop = _write(table, row, stop)
                    _advance(progress, blocks)
            if table is not None and group:
                table.note_group(list(group))
            for block in plan.blocks(list(group)):
                watchdog.beat(block.where)
                _agree(block.what, ctx.cpu_group, BLOCK_FIELDS, stop)
                outcome = runner.run(
                    group[block.backend],
                    DTYPES[block.dtype],
                    block.mode,
                    block.nbytes,
                    seed=block.seed,
                )
                if outcome[0] is None and outcome[2] and plan.wants_numerics(block):
                    dtype = DTYPES[block.dtype]
                    backend = group[block.backend]
                    numerics = check_numerics(backend, ctx, dtype, block.mode, block.nbytes)
                    plan.note_numerics(block, numerics)
                rows, blocks = plan.record(block, outcome, base)
                for row in rows:
                    stop = _write(table, row, stop)
                _advance(progress, blocks, f"round {block.round} {block.backend}")
        _agree("end", ctx.cpu_group, "the end of the sweep", stop)
    finally:
        groups.close()  # every rank, on every path: IPC buffers are freed in order
        if progress is not None:
            progress.close()
        if table is not None:
            table.close(noise)
    return _finish(out) if rank == 0 else 0


def _progress(cfg: SweepConfig, ctx: CommContext, plan: RoundPlan):
    if cfg.quiet:
        return None
    import threading

    from tqdm import tqdm

    # a thread lock: tqdm's default also makes a multiprocessing one, which a rank ended
    # by Ctrl-C leaves behind ("leaked semaphore objects" at exit)
    tqdm.set_lock(threading.RLock())
    return tqdm(
        total=plan.blocks_left,
        unit="blk",
        desc=f"sweep ws={ctx.world_size}, {cfg.rounds} rounds",
        dynamic_ncols=True,
        file=sys.stderr,
    )


def _advance(progress, blocks: int, what: str | None = None) -> None:
    if progress is not None and blocks:
        progress.update(blocks)
        if what:
            progress.set_postfix_str(what, refresh=False)


def _write(table: _Table | None, row: dict, stop: str | None) -> str | None:
    """Rank 0 writes `row` to its table (results.csv, or rounds.csv for a round's row); the
    first failure is the reason every rank stops with at the next agreement."""
    if table is not None and stop is None:
        stop = table.append(row)
    return stop


def _rounds_left(cfg: SweepConfig, table: _Table | None) -> dict[tuple, list[int]] | None:
    """Rank 0: per point still to measure, the rounds it lacks (a resumed run's rounds.csv
    holds the others); a point in results.csv is done."""
    if table is None:
        return None
    left = {}
    for b, d, m, n in point_plan(cfg):
        key = point_key(backend=b, world_size=cfg.world_size, dtype=d, bytes=n, mode=m)
        if key not in table.done:
            left[key] = [r for r in range(cfg.rounds) if r not in table.rounds.get(key, {})]
    return left


class _Table:
    """Rank 0's side of the run directory: the writers of results.csv and rounds.csv,
    meta.json, the points and rounds already done; a write that fails becomes the one-line
    reason every rank stops with."""

    def __init__(
        self, writers: dict[str, ResultsWriter], meta: dict, done: set, rounds: dict
    ) -> None:
        self.writers, self.meta, self.done, self.rounds = writers, meta, done, rounds

    @classmethod
    def open(
        cls,
        cfg: SweepConfig,
        ctx: CommContext,
        fp: dict,
        out: str,
        run_id: str,
        noise: dict | None = None,
    ) -> tuple[_Table | None, tuple[str, int] | None]:
        """(the table, None), or (None, (why it cannot be written, exit code))."""
        try:
            meta = read_meta(out) if cfg.resume else {}
        except OSError as exc:
            return None, (f"cannot read {Path(out) / META_FILE}: {os_error(exc)}", 1)
        measured_on = meta.get("hardware_key")
        if measured_on and measured_on != fp["hardware_key"]:
            # before any writer opens the table (a resume rewrites rows cut short, legacy
            # columns): rows of two machines under one run id would read as one machine's
            return None, (
                f"--resume: {out} was measured on {measured_on}, this node is "
                f"{fp['hardware_key']}; resume it there, or start a new --out here",
                2,
            )
        try:
            writer = ResultsWriter(out, claim=not cfg.resume)  # a new run: the first here
        except RunDirLocked as exc:  # another sweep took the directory since the check
            return None, (f"--out: {exc}", 2)
        except OSError as exc:
            return None, (f"cannot write the run directory {out}: {os_error(exc)}", 1)
        writers = {RESULTS_FILE: writer}
        try:
            writers[ROUNDS_FILE] = ResultsWriter(
                out, file_name=ROUNDS_FILE, columns=ROUND_COLUMNS, lock=False
            )
            done = completed_points(out) if cfg.resume else set()
            rounds = completed_rounds(out) if cfg.resume else {}
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
                    "rounds": cfg.rounds,
                    "backend_groups": [],
                }
            )
            if noise is not None:
                meta["noise"] = noise
            meta.setdefault("started", datetime.datetime.now().isoformat(timespec="seconds"))
            write_meta(out, meta)
        except OSError as exc:
            for w in writers.values():
                w.close()
            return None, (f"cannot write {Path(out) / META_FILE}: {os_error(exc)}", 1)
        return cls(writers, meta, done, rounds), None

    def append(self, row: dict) -> str | None:
        """Write `row` (a round's row to rounds.csv, a point's to results.csv); None, or why
        the sweep must stop (the rows kept, how to go on)."""
        writer = self.writers[ROUNDS_FILE if "round" in row else RESULTS_FILE]
        resume = f"continue with --resume {writer.run_dir}"
        try:
            writer.append(row)
            return None
        except TableRemoved:
            try:
                for each in self.writers.values():  # the folder went: every table goes back
                    if each.removed():
                        each.restore()
                write_meta(writer.run_dir, self.meta)
            except OSError as exc:
                return (
                    f"{writer.path} was removed during the sweep; writing its {self.kept()} "
                    f"again failed: {os_error(exc)}"
                )
            return (
                f"{writer.path} was removed during the sweep; its {self.kept()} were written "
                f"again; {resume}"
            )
        except OSError as exc:
            return (
                f"cannot append to {writer.path}: {os_error(exc)}; its {self.kept()} are "
                f"kept; {resume} once it can be written"
            )

    def note_group(self, names: list[str]) -> None:
        """A group of backends held together; from the second on, said in one line."""
        groups = self.meta.setdefault("backend_groups", [])
        groups.append(names)
        if len(groups) > 1:
            print(
                f"bench: the backends' buffers do not fit at once: measuring {','.join(names)} "
                f"after {' then '.join(','.join(g) for g in groups[:-1])} (rounds pair backends "
                "of one group only)",
                file=sys.stderr,
                flush=True,
            )

    def kept(self) -> str:
        """The rows of both tables: a point's row comes with its last round."""
        rows, rounds = self.writers[RESULTS_FILE].rows, self.writers[ROUNDS_FILE].rows
        return f"{rows} rows ({RESULTS_FILE}) and {rounds} rounds ({ROUNDS_FILE})"

    def close(self, noise: dict | None = None) -> None:
        """meta.json gets the load after the sweep and the A/A figure (while the directory
        is still this sweep's); then the writers are closed."""
        run_dir = self.writers[RESULTS_FILE].run_dir
        if noise is not None:
            self.meta["noise"] = noise_after(noise, run_dir)
            with contextlib.suppress(OSError):  # the rows are kept; _finish reports a bad meta
                write_meta(run_dir, self.meta)
        for writer in self.writers.values():
            writer.close()


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
