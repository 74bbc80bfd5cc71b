"""`bench sweep`: every flag checked, the run directory's lock tried, then the ranks started
through the launcher (or, under the user's own torchrun, this process is one of them)."""

from __future__ import annotations

import os
from pathlib import Path

from bench.launch.config import parse_sweep_config
from bench.launch.flags import UsageError
from bench.launch.mpirun import launch_mpirun, mpi_layout, mpirun_reason

__all__ = ["main"]


def main(argv: list[str]) -> int:
    from bench.run.worker import run_worker

    cfg = parse_sweep_config(argv)
    if cfg.out is not None and cfg.node_rank == 0:  # only node 0's rank 0 writes (shared FS)
        from bench.analysis.results import LOCK_FILE

        _refuse_if_locked(Path(cfg.out) / LOCK_FILE)
    if ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or mpi_layout() is not None:
        return run_worker(cfg)  # already one rank of the user's torchrun (or mpirun)
    if cfg.launcher == "mpirun":
        reason = mpirun_reason()
        if reason:
            raise UsageError(f"--launcher mpirun: {reason}")
        return launch_mpirun(cfg, argv)
    from bench.launch.launcher import launch

    return launch(cfg, run_worker, (cfg,))


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
