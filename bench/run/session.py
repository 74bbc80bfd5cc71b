"""One rank's set-up, the same for the sweep, `bench doctor`, `bench soak` and `tuner live`:
the rank layout (torchrun's variables or SLURM's), a watchdog, the gloo world group, a tag all
ranks share, and the CommContext and backends built from a SweepConfig."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import gc
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.backends import CommContext
from bench.environment import get, launched_rank
from bench.launch.config import SweepConfig
from bench.launch.launcher import PIDS_DIR_ENV, remove_shm_leftovers
from bench.launch.mpirun import export_layout, mpi_layout
from bench.run.context import broadcast_object, build_backend, make_context
from bench.run.watchdog import Watchdog

__all__ = [
    "dist_env",
    "collect_at_exit",
    "rank_session",
    "shared_tag",
    "sweep_context",
    "create_backend",
]

# the layout of a one-rank group in this process (`rank_session(..., alone=True)`)
_ALONE = {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1}


def dist_env() -> dict[str, int]:
    """Rank layout from torchrun's variables, mpirun's (`--launcher mpirun`), or SLURM's
    when started by srun."""
    if launched_rank():
        return {
            "rank": int(get("RANK")),
            "world_size": int(get("WORLD_SIZE")),
            "local_rank": int(get("LOCAL_RANK") or 0),
            "local_world_size": int(get("LOCAL_WORLD_SIZE") or get("WORLD_SIZE")),
        }
    layout = mpi_layout()
    if layout is not None:  # the gloo group is then MPI_COMM_WORLD's processes, rank for rank
        export_layout(layout)
        return layout
    if get("SLURM_PROCID") is not None:
        layout = {
            "rank": int(get("SLURM_PROCID")),
            "world_size": int(get("SLURM_NTASKS")),
            "local_rank": int(get("SLURM_LOCALID") or 0),
            "local_world_size": int((get("SLURM_NTASKS_PER_NODE") or "1").split("(")[0]),
        }
        os.environ.setdefault("MASTER_ADDR", get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = (
            str(layout["rank"]),
            str(layout["world_size"]),
        )
        return layout
    raise RuntimeError("no rank layout: run through `bench sweep`, torchrun or srun")


@functools.cache
def collect_at_exit() -> None:
    """Collect garbage once more at interpreter exit, while the interpreter is still whole.
    A gloo group that only a reference cycle still holds (vLLM's communicators make such
    cycles) is otherwise freed during finalization, where its worker threads abort the
    process (SIGABRT, "terminate called without an active exception"): 11 of 20 two-rank
    exits here, 0 of 20 with this. Call it once a group exists; repeated calls do nothing."""
    atexit.register(gc.collect)


@contextlib.contextmanager
def rank_session(
    timeout_s: float, alone: bool = False
) -> Iterator[tuple[dict[str, int], Watchdog]]:
    """This rank's layout and a running watchdog, inside the gloo world group; torn down on
    exit. gloo's own timeout is set past the watchdog's, so that the watchdog, which names the
    silent peers, acts first. `alone`: a one-rank group in this process, no launcher."""
    layout = dict(_ALONE) if alone else dist_env()
    if not alone:
        _leave_nothing_behind()
    watchdog = Watchdog(layout["rank"], timeout_s)
    gloo_timeout = datetime.timedelta(seconds=timeout_s + 30)
    if alone:
        dist.init_process_group(
            "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=gloo_timeout
        )
    else:
        dist.init_process_group("gloo", timeout=gloo_timeout)
    collect_at_exit()
    try:
        yield layout, watchdog
    finally:
        watchdog.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def _leave_nothing_behind() -> None:
    """A rank stopped by its launcher (SIGTERM) or by Ctrl-C (SIGINT reaches every process of
    the terminal) ends at once, without a traceback per rank: the launcher prints the one
    line. Its files in /dev/shm go with it; a row being written is whole (one write call).
    Under `bench`'s launcher the rank also leaves its pid where the launcher looks after the
    launch, for what a rank killed outright (SIGKILL) could not remove itself."""
    pids = get(PIDS_DIR_ENV)
    if pids:
        with contextlib.suppress(OSError):
            (Path(pids) / str(os.getpid())).touch()

    def end(signum: int, _frame) -> None:
        remove_shm_leftovers([os.getpid()])
        os._exit(128 + signum)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, end)


def shared_tag(prefix: str = "") -> str:
    """A fresh tag of 10 characters that every rank of the world group shares (rank 0's):
    names of shm segments, IPC handles and heartbeat keys."""
    mine = prefix + uuid.uuid4().hex[: 10 - len(prefix)] if dist.get_rank() == 0 else None
    return broadcast_object(mine, dist.group.WORLD)


def sweep_context(cfg: SweepConfig, layout: dict[str, int], tag: str) -> CommContext:
    """The world group's context on cfg.device: on CUDA, this rank's GPU is its local rank
    (modulo the visible GPUs) and becomes the current device."""
    device = torch.device("cpu")
    if cfg.device == "cuda":
        device = torch.device("cuda", layout["local_rank"] % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    return make_context(dist.group.WORLD, device, cfg.timeout_s, run_tag=tag)


def create_backend(name: str, cfg: SweepConfig, ctx: CommContext) -> tuple[Any, str | None]:
    """Probe and build on every rank with cfg's knobs, sized for its largest point; any
    rank's reason skips the backend everywhere."""
    return build_backend(name, cfg.params.get(name, {}), max(cfg.sizes), ctx)
