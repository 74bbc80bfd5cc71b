"""`bench sweep | report | doctor | kernels`.

`bench sweep` checks every argument, then launches the ranks through torchrun's launcher API
(`torch.distributed.launcher.api.elastic_launch`, c10d rendezvous). Bad input exits 2 with one
line naming the flag, before anything starts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path

from bench.launch.config import SweepConfig, UsageError, add_sweep_arguments, config_from_args
from bench.launch.watchdog import EXIT_WATCHDOG

__all__ = ["main", "parse_sweep_config", "launch"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bench", description="Measure every all-reduce this node offers.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sweep = sub.add_parser("sweep", help="measure backends x sizes x dtypes x modes")
    add_sweep_arguments(sweep)
    report = sub.add_parser("report", help="nccl-tests-style table of a run")
    report.add_argument("run_dir")
    report.add_argument("--plots", action="store_true", help="also write PNG figures beside it")
    doctor = sub.add_parser("doctor", help="what this node offers, and why a backend cannot run")
    doctor.add_argument("--world-size", "-g", dest="world_size", default="1")
    doctor.add_argument("--device", default="auto")
    doctor.add_argument("--nnodes", default="1")
    doctor.add_argument("--node-rank", dest="node_rank", default="0")
    doctor.add_argument("--master-addr", dest="master_addr", default=None)
    doctor.add_argument("--master-port", dest="master_port", default=None)
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    kernels = sub.add_parser("kernels", help="own reduction kernels vs copy bandwidth (one GPU)")
    kernels.add_argument("--max-bytes", "-e", dest="max_bytes", default="64M")
    kernels.add_argument("--inputs", default="2,4,8", help="comma list of input counts")
    kernels.add_argument("--dtype", default="bfloat16")
    kernels.add_argument("--out", default=None, help="write a CSV of the figures here")
    return parser


def parse_sweep_config(argv: list[str] | None = None) -> SweepConfig:
    parser = _Parser(prog="bench sweep")
    add_sweep_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def launch(cfg: SweepConfig, entrypoint=None, args: tuple | None = None) -> int:
    """Start cfg.world_size / nnodes local ranks through torchrun's launcher API, each running
    `entrypoint(*args)` (default: the sweep worker on cfg)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from bench.run.worker import run_worker

    nproc = cfg.world_size // cfg.nnodes
    port = cfg.master_port or _free_port(cfg.master_addr)
    extra = {}
    if "shutdown_timeout" in getattr(LaunchConfig, "__dataclass_fields__", {}):
        # a stopped (SIGSTOP) rank ignores SIGTERM: SIGKILL it after 5 s, not torch's 30 s
        # (the field is new in torch 2.12; torch 2.11's launcher has no such argument)
        extra["shutdown_timeout"] = 5
    # the agent's per-rank error files go here and are removed after the launch (its default,
    # a fresh /tmp/torchelastic_* directory per launch, is never cleaned up)
    log_dir = tempfile.mkdtemp(prefix="bench-launch-")
    config = LaunchConfig(
        min_nodes=cfg.nnodes, max_nodes=cfg.nnodes, nproc_per_node=nproc,
        run_id=f"bench-{uuid.uuid4().hex[:8]}" if cfg.nnodes == 1 else "bench-sweep",
        rdzv_backend="c10d", rdzv_endpoint=f"{cfg.master_addr}:{port}",
        rdzv_configs={"is_host": cfg.node_rank == 0, "join_timeout": cfg.timeout_s},
        max_restarts=0, monitor_interval=0.5, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=log_dir), **extra,
    )
    try:
        results = elastic_launch(config, entrypoint or run_worker)(*(args or (cfg,)))
    except ChildFailedError as exc:
        for rank, failure in sorted(exc.failures.items()):
            why = (f"signal {failure.signal_name()}" if failure.signal_name() != "<N/A>"
                   else f"exit code {failure.exitcode}")
            if failure.exitcode == EXIT_WATCHDOG:
                why = f"no progress for --timeout {cfg.timeout_s:g} s; its line above names " \
                      "the silent ranks"
            print(f"bench: rank {rank} failed ({why}); finished rows are kept"
                  + (f" in {cfg.out}" if cfg.out else ""), file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    codes = [c for c in (results or {}).values() if c]
    return max(codes) if codes else 0


def _cmd_sweep(argv: list[str]) -> int:
    cfg = parse_sweep_config(argv)
    if cfg.out is not None and cfg.node_rank == 0:  # only node 0's rank 0 writes (shared FS)
        from bench.analysis.results import LOCK_FILE

        _refuse_if_locked(Path(cfg.out) / LOCK_FILE)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from bench.run.worker import run_worker  # already one rank of the user's torchrun

        return run_worker(cfg)
    return launch(cfg)


def _refuse_if_locked(lock: Path) -> None:
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


def _cmd_report(args: argparse.Namespace) -> int:
    from bench.analysis.report import print_summary
    from bench.analysis.results import SchemaError

    run = Path(args.run_dir)
    if not run.is_dir():
        raise UsageError(f"report: {run} is not a directory")
    try:
        wrong = print_summary(run)
        if args.plots:
            from bench.analysis.plots import write_run_plots

            for path in write_run_plots(run):
                print(f"# figure: {path}")
    except (FileNotFoundError, SchemaError) as exc:
        raise UsageError(f"report: {exc}") from None
    return 1 if wrong else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["sweep"]:
            return _cmd_sweep(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "doctor":
            from bench.doctor.checks import run_doctor

            return run_doctor(args)
        if args.command == "kernels":
            from bench.kernels.benchmark import run_kernels

            return run_kernels(args)
        build_parser().print_help()
        return EXIT_USAGE
    except UsageError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
