"""Helpers of the tests that start their own ranks (torch.multiprocessing, spawn): one rank's
gloo group over loopback TCP, and the report each rank leaves for the test to read."""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from bench.run.session import collect_at_exit


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int, timeout_s: float = 120) -> Iterator[None]:
    """This process as `rank` of a gloo group at 127.0.0.1:`port`, destroyed on leaving."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    collect_at_exit()  # no gloo group left to finalization (SIGABRT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def write_report(out_dir: str | Path, rank: int, report: object) -> None:
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


def read_reports(out_dir: str | Path, world: int) -> list:
    """Every rank's report, by rank (a missing one raises: that rank did not finish)."""
    return [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world)]


def subprocess_path() -> str:
    """The repository root, for a child process's PYTHONPATH (the CLI run from any folder)."""
    return str(Path(__file__).resolve().parents[1])
