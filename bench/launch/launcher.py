"""Starting this node's ranks, the one way every command here does it: torchrun's launcher API
(`torch.distributed.launcher.api.elastic_launch`) with a c10d rendezvous at
`--master-addr:--master-port` (a free port on one node), never a home-made launcher.

`start_ranks` returns every local rank's return value or raises `ChildFailedError`; `launch`
is the sweep's form of it: an exit code, and one line per failed rank, or one line when this
process is stopped by a signal (SIGTERM, Ctrl-C): the ranks are ended first.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.backends.base import scoped_env
from bench.environment import get
from bench.launch.config import SweepConfig
from bench.launch.flags import UsageError
from bench.launch.paths import os_error
from bench.run.watchdog import EXIT_WATCHDOG

__all__ = [
    "free_port",
    "start_ranks",
    "launch",
    "failure_reason",
    "remove_shm_leftovers",
    "PIDS_DIR_ENV",
]


_AGENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
PIDS_DIR_ENV = "BENCH_RANK_PIDS_DIR"  # where a launched rank leaves its pid


def free_port(host: str) -> int:
    """A TCP port on `host` that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_ranks(
    cfg: SweepConfig, entrypoint: Callable[..., Any], args: tuple, name: str = "sweep"
) -> dict[int, Any]:
    """Run `entrypoint(*args)` in cfg.world_size / cfg.nnodes local ranks, one rendezvous over
    all nodes; {local rank: return value}. A failed rank raises ChildFailedError (the others
    are ended by the launcher). `name` names the rendezvous that every node's launch joins."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if cfg.master_port and cfg.node_rank == 0:
        _check_listen(cfg.master_addr, cfg.master_port)
    port = cfg.master_port or free_port(cfg.master_addr)
    extra = {}
    if "shutdown_timeout" in getattr(LaunchConfig, "__dataclass_fields__", {}):
        # a stopped (SIGSTOP) rank ignores SIGTERM: SIGKILL it after 5 s, not torch's 30 s
        # (the field is new in torch 2.12; torch 2.11's launcher has no such argument)
        extra["shutdown_timeout"] = 5
    # the agent's per-rank error files go here and are removed after the launch (its default,
    # a fresh /tmp/torchelastic_* directory per launch, is never cleaned up)
    log_dir = tempfile.mkdtemp(prefix="bench-launch-")
    config = LaunchConfig(
        min_nodes=cfg.nnodes,
        max_nodes=cfg.nnodes,
        nproc_per_node=cfg.world_size // cfg.nnodes,
        run_id=f"bench-{name}-{uuid.uuid4().hex[:8]}" if cfg.nnodes == 1 else f"bench-{name}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"{cfg.master_addr}:{port}",
        rdzv_configs={"is_host": cfg.node_rank == 0, "join_timeout": cfg.timeout_s},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        **extra,
    )
    # the agent turns SIGTERM, SIGINT, SIGHUP and SIGQUIT into an exception for the rest of
    # this process's life: ours again once the ranks are gone
    handlers = {number: signal.getsignal(number) for number in _AGENT_SIGNALS}
    pids = Path(log_dir) / "pids"  # each rank leaves its pid here (bench.run.session)
    pids.mkdir()
    # the agent's warnings ("Received 2 death signal", "Closing process N") repeat what
    # `launch` says in one line; its errors still show
    quiet = [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger)
    ]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(max(logger.level, logging.ERROR))
        with scoped_env({PIDS_DIR_ENV: str(pids), "OMP_NUM_THREADS": omp_threads(cfg)}):
            return elastic_launch(config, entrypoint)(*args) or {}
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
        remove_shm_leftovers(int(p.name) for p in pids.iterdir() if p.name.isdigit())
        shutil.rmtree(log_dir, ignore_errors=True)
        for number, handler in handlers.items():
            signal.signal(number, handler)


def omp_threads(cfg: SweepConfig) -> str:
    """OMP_NUM_THREADS for the ranks, set here on purpose (torchrun would set 1 and warn): the
    user's own value, else this node's cores shared by its ranks (at least 1), as the shm
    backends' `threads` knob does by default; ranks whose OpenMP threads outnumber the cores
    starve each other."""
    own = get("OMP_NUM_THREADS")
    if own:
        return own
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return str(max(1, (cores or 1) // max(1, cfg.world_size // cfg.nnodes)))


def _check_listen(host: str, port: int) -> None:
    """Node 0 hosts the rendezvous at --master-addr:--master-port: try listening there first
    (as the store does, address reuse allowed), so a port in use or an address of another
    host is one line before any rank starts."""

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen()
        except OSError as exc:
            raise UsageError(
                f"--master-port: cannot listen on {host}:{port} on node 0: {os_error(exc)}"
            ) from None


def failure_reason(failure) -> str:
    """`signal SIGKILL` or `exit code 1`, for one rank's ProcessFailure."""
    signal_name = failure.signal_name()
    return f"signal {signal_name}" if signal_name != "<N/A>" else f"exit code {failure.exitcode}"


def launch(
    cfg: SweepConfig,
    entrypoint: Callable[..., Any],
    args: tuple,
    kept: Callable[[], str] | None = None,
) -> int:
    """`start_ranks` as an exit code: the largest nonzero code a rank returned; 1 with one
    line per failed rank; 128 + N (130 for Ctrl-C) with one line when this process gets
    signal N (the launcher ends the ranks first). `kept()` ends those lines with what the run
    keeps (the sweep: the rows its table holds, counted then)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    try:
        results = start_ranks(cfg, entrypoint, args)
    except RendezvousError as exc:  # the nodes never met: nothing ran
        cause = exc.__cause__ or exc
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        print(
            f"bench: the ranks could not meet at {cfg.master_addr}:{cfg.master_port or '?'} "
            f"(--master-addr/--master-port): {detail}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except ChildFailedError as exc:
        tail = kept() if kept else ""
        for rank, failure in sorted(exc.failures.items()):
            why = failure_reason(failure)
            if failure.exitcode == EXIT_WATCHDOG:
                why = (
                    f"no progress for --timeout {cfg.timeout_s:g} s; its line above names "
                    "the silent ranks"
                )
            print(f"bench: rank {rank} failed ({why}){tail}", file=sys.stderr, flush=True)
        return 1
    except (SignalException, KeyboardInterrupt) as exc:
        number = getattr(exc, "sigval", signal.SIGINT)
        what = (
            "interrupted"
            if number == signal.SIGINT
            else f"stopped by {signal.Signals(number).name}"
        )
        tail = kept() if kept else ""
        print(f"bench: {what}; the ranks were ended{tail}", file=sys.stderr, flush=True)
        return 128 + int(number)
    codes = [c for c in results.values() if c]
    return max(codes) if codes else 0


def remove_shm_leftovers(pids: Iterable[int], shm_dir: str = "/dev/shm") -> list[str]:
    """Remove what ranks ended by a signal left in /dev/shm: torch's files of CUDA IPC
    reference counts, named torch_<pid>_<n> after the process that made them (a process that
    exits normally removes its own; one killed cannot). Processes still alive are left
    alone. Returns the names removed."""
    removed = []
    for pid in pids:
        if _alive(pid):
            continue
        for path in Path(shm_dir).glob(f"torch_{int(pid)}_*"):
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:
                continue
    return removed


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
