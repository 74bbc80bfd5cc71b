"""`bench sweep`: every flag checked, the run directory's lock tried, then the ranks started
through the launcher (or, under the user's own torchrun, this process is one of them)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.analysis.results import LOCK_FILE, ROUNDS_FILE, count_rows
from bench.environment import get, launched_rank
from bench.launch.config import RUNS_ROOT, SweepConfig, left_out_line, parse_sweep_config
from bench.launch.flags import UsageError
from bench.launch.launcher import launch
from bench.launch.mpirun import launch_mpirun, mpi_layout, mpirun_reason
from bench.launch.paths import writable_dir
from bench.run.worker import new_run_id, run_worker

__all__ = ["main", "rows_kept"]


def main(argv: list[str]) -> int:
    cfg = parse_sweep_config(argv)
    if cfg.left_out and (get("RANK") or "0") == "0" and not cfg.quiet:
        print(left_out_line(cfg.left_out), file=sys.stderr, flush=True)
    if cfg.out is not None and cfg.node_rank == 0:  # only node 0's rank 0 writes (shared FS)
        _refuse_if_locked(Path(cfg.out) / LOCK_FILE)
    if cfg.out is None and cfg.node_rank == 0:
        # the default run directory goes below runs/ (made again by rank 0)
        writable_dir(f"--out (default {RUNS_ROOT}/)", RUNS_ROOT)
    if launched_rank() or mpi_layout() is not None:
        return run_worker(cfg)  # already one rank of the user's torchrun (or mpirun)
    if cfg.launcher == "mpirun":
        reason = mpirun_reason()
        if reason:
            raise UsageError(f"--launcher mpirun: {reason}")
        return launch_mpirun(cfg, argv)

    if cfg.out is None and cfg.run_id is None:
        cfg.run_id = new_run_id()  # chosen here, so that a failure can name the directory
    before = (count_rows(cfg.out) or 0) if cfg.out else 0
    return launch(cfg, run_worker, (cfg,), kept=lambda: rows_kept(cfg, before))


def rows_kept(cfg: SweepConfig, before: int = 0) -> str:
    """What a sweep that failed or was stopped leaves, for the launcher's last line: the
    rows its results.csv holds now (counted, never assumed), or that none were written."""

    if cfg.node_rank != 0:
        return "; node 0 keeps the rows written so far"
    run_dir = (
        Path(cfg.out)
        if cfg.out
        else next(iter(sorted(Path(RUNS_ROOT).glob(f"*/{cfg.run_id}"))), None)
    )
    rows = (count_rows(run_dir) or 0) if run_dir is not None else 0
    rounds = (count_rows(run_dir, ROUNDS_FILE) or 0) if run_dir is not None else 0
    if not rows and not rounds:
        return "; no row was written"
    # a point's row is written with its last round; the rounds before it are kept apart
    held = f" and {rounds} rounds in {ROUNDS_FILE}" if rounds else ""
    table = run_dir / "results.csv"
    new = f", {rows - before} of them by this sweep" if cfg.resume else ""
    return f"; {rows} rows are kept in {table}{new}{held} (continue with --resume {run_dir})"


def _refuse_if_locked(lock: Path) -> None:
    """UsageError when another sweep holds `lock` (the run directory's) now."""
    import fcntl

    if not lock.exists():
        return
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise UsageError(f"--out: {lock.parent} is being written by another sweep") from None
    finally:
        os.close(fd)
