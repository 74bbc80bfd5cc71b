"""Starting this node's ranks, the one way every command here does it: torchrun's launcher API
(`torch.distributed.launcher.api.elastic_launch`) with a c10d rendezvous at
`--master-addr:--master-port` (a free port on one node), never a home-made launcher.

`start_ranks` returns every local rank's return value or raises `ChildFailedError`; `launch`
is the sweep's form of it: an exit code, and one line per failed rank.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

from bench.launch.config import SweepConfig
from bench.launch.watchdog import EXIT_WATCHDOG

__all__ = ["free_port", "start_ranks", "launch", "failure_reason"]


def free_port(host: str) -> int:
    """A TCP port on `host` that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_ranks(cfg: SweepConfig, entrypoint: Callable[..., Any], args: tuple,
                name: str = "sweep") -> dict[int, Any]:
    """Run `entrypoint(*args)` in cfg.world_size / cfg.nnodes local ranks, one rendezvous over
    all nodes; {local rank: return value}. A failed rank raises ChildFailedError (the others
    are ended by the launcher). `name` names the rendezvous that every node's launch joins."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

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
        min_nodes=cfg.nnodes, max_nodes=cfg.nnodes, nproc_per_node=cfg.world_size // cfg.nnodes,
        run_id=f"bench-{name}-{uuid.uuid4().hex[:8]}" if cfg.nnodes == 1 else f"bench-{name}",
        rdzv_backend="c10d", rdzv_endpoint=f"{cfg.master_addr}:{port}",
        rdzv_configs={"is_host": cfg.node_rank == 0, "join_timeout": cfg.timeout_s},
        max_restarts=0, monitor_interval=0.5, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=log_dir), **extra,
    )
    try:
        return elastic_launch(config, entrypoint)(*args) or {}
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def failure_reason(failure) -> str:
    """`signal SIGKILL` or `exit code 1`, for one rank's ProcessFailure."""
    signal_name = failure.signal_name()
    return f"signal {signal_name}" if signal_name != "<N/A>" else f"exit code {failure.exitcode}"


def launch(cfg: SweepConfig, entrypoint: Callable[..., Any], args: tuple) -> int:
    """`start_ranks` as an exit code: the largest nonzero code a rank returned, or 1 with one
    line per failed rank (finished rows are kept in cfg.out)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        results = start_ranks(cfg, entrypoint, args)
    except ChildFailedError as exc:
        for rank, failure in sorted(exc.failures.items()):
            why = failure_reason(failure)
            if failure.exitcode == EXIT_WATCHDOG:
                why = f"no progress for --timeout {cfg.timeout_s:g} s; its line above names " \
                      "the silent ranks"
            print(f"bench: rank {rank} failed ({why}); finished rows are kept"
                  + (f" in {cfg.out}" if cfg.out else ""), file=sys.stderr)
        return 1
    codes = [c for c in results.values() if c]
    return max(codes) if codes else 0
