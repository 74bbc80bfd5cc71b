"""`bench doctor [--world-size N] [--nnodes M ...] [--json]`: the node report, then the ranks'.

Exit code 0 when the ranks agree, 1 when they differ or a rank failed, 2 on bad flags.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench import backends as registry
from bench.doctor.format import format_report
from bench.doctor.node import node_report
from bench.doctor.ranks import (
    CHECK_BYTES,
    Fingerprint,
    rank_fingerprint,
    ranks_in_process,
    ranks_launched,
)
from bench.launch.config import SweepConfig, layout_from_args, resolve_device
from bench.launch.flags import UsageParser

__all__ = ["main"]

TIMEOUT_S = 120.0


def _parser() -> argparse.ArgumentParser:
    p = UsageParser(
        prog="bench doctor", description="What this node offers, and why a backend cannot run."
    )
    p.add_argument("--world-size", "-g", dest="world_size", default="1")
    p.add_argument("--device", default="auto")
    p.add_argument("--nnodes", default="1")
    p.add_argument("--node-rank", dest="node_rank", default="0")
    p.add_argument("--master-addr", dest="master_addr", default=None)
    p.add_argument("--master-port", dest="master_port", default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _config(args: argparse.Namespace) -> SweepConfig:
    """The doctor's flags as the config of a one-point sweep of every backend."""

    world_size, nnodes, node_rank, port = layout_from_args(args)
    return SweepConfig(
        world_size=world_size,
        backends=registry.known_names(),
        sizes=[CHECK_BYTES],
        dtypes=["float32"],
        modes=["eager"],
        device=resolve_device(args.device),
        timeout_s=TIMEOUT_S,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=args.master_addr or "127.0.0.1",
        master_port=port,
        quiet=True,
    )


def main(argv: list[str], fingerprint: Fingerprint = rank_fingerprint) -> int:
    """`fingerprint` is what each rank reports about itself (tests pass one that differs)."""
    args = _parser().parse_args(argv)
    cfg = _config(args)
    node = node_report(args.master_addr, cfg.master_port, cfg.node_rank)
    failure = None
    if cfg.world_size == 1 and cfg.nnodes == 1:
        ranks = ranks_in_process(cfg, fingerprint)
    else:
        ranks, failure = ranks_launched(cfg, fingerprint)
    if args.json:
        print(json.dumps({"node": node, "ranks": ranks, "failure": failure}, indent=2, default=str))
    else:
        print(format_report(node, ranks, failure, cfg))
    if failure:
        print(f"bench: doctor: {failure}", file=sys.stderr)
        return 1
    return 1 if ranks and ranks["differences"] else 0
