"""Synthetic runs measured in rounds (results.csv, rounds.csv, meta.json) for the tuner's
tests: no rank is started, the figures are given."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.analysis.results import ResultsWriter, write_meta
from bench.analysis.rounds import ROUND_COLUMNS

HW = "cpu-test-2c"


def make_run(
    path: Path,
    figures: Mapping[tuple[str, int], Sequence[float]],
    *,
    run_id: str = "r1",
    hardware_key: str = HW,
    world_size: int = 2,
    dtype: str = "float32",
    mode: str = "eager",
    rounds: bool = True,
) -> Path:
    """figures: (backend, bytes) -> the latency of each round, in us. results.csv gets the
    median over rounds (p10/p90: min/max); rounds.csv each round (unless `rounds` is False:
    a run made before rounds)."""
    with ResultsWriter(path) as writer:
        for (backend, nbytes), values in sorted(figures.items()):
            latency = statistics.median(values)
            writer.append(
                {
                    "run_id": run_id,
                    "hardware_key": hardware_key,
                    "backend": backend,
                    "world_size": world_size,
                    "nnodes": 1,
                    "dtype": dtype,
                    "bytes": nbytes,
                    "count": nbytes // 4,
                    "mode": mode,
                    "iters": 10 * len(values),
                    "latency_us": latency,
                    "p10_us": min(values),
                    "p90_us": max(values),
                    "algbw_gbps": nbytes / latency / 1e3,
                    "busbw_gbps": nbytes / latency / 1e3,
                    "correct": True,
                    "max_abs_err": 0.0,
                    "skipped_reason": None,
                }
            )
    if rounds:
        with open(path / "rounds.csv", "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(ROUND_COLUMNS)
            for (backend, nbytes), values in sorted(figures.items()):
                for r, value in enumerate(values):
                    out.writerow(
                        [run_id, hardware_key, backend, world_size, dtype, mode, nbytes, r, 0, 10]
                        + [value]
                    )
    write_meta(path, {"run_id": run_id, "hardware_key": hardware_key, "rounds": 5})
    return path
