#!/usr/bin/env python
"""A/A noise floor of live_vs_grid.py's side-by-side regret.

Per size, the grid's best configuration is measured against itself (the same backend under two
labels, interleaved, `repeats` rounds, `tuner.search.live.confirm_worker`) and the ratio of the two
medians is printed: a regret smaller than this cannot be resolved on the machine.
Run from the repository root:
    python results/cpu-intel-xeon-processor-2c/20261129-live-vs-grid/aa_noise.py \
        WORLD_SIZE GRID_LATENCY_CSV OUT_JSON [REPEATS]
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]  # results/<hardware_key>/<run_id>/this file
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))


def main() -> int:
    from live_vs_grid import launcher

    from bench.launch.config import SweepConfig
    from tuner.search.live import confirm_worker

    world_size, latency_csv, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 7
    best: dict[int, tuple[str, dict, float]] = {}
    with open(latency_csv) as fh:
        for row in csv.DictReader(fh):
            nbytes, latency_us = int(row["bytes"]), float(row["latency_us"])
            if nbytes not in best or latency_us < best[nbytes][2]:
                best[nbytes] = (row["backend"], json.loads(row["params"]), latency_us)
    jobs = [
        {"bytes": nbytes, "configs": {"A": [alg, params], "A_again": [alg, params]}}
        for nbytes, (alg, params, _) in sorted(best.items())
    ]
    cfg = SweepConfig(
        world_size=world_size,
        backends=["gloo", "shm_one_shot", "shm_two_shot"],
        sizes=sorted(best),
        dtypes=["float32"],
        modes=["eager"],
        device="cpu",
        iters=20,
        warmup=5,
        quiet=True,
    )
    launcher()(cfg, confirm_worker, (cfg, jobs, out, repeats))
    for job in json.loads(Path(out).read_text()):
        a, b = (statistics.median(job["latency_us"][k]) for k in ("A", "A_again"))
        print(
            f"{job['bytes']} {job['configs']['A'][0]} {a:.1f} / {b:.1f} us  "
            f"{100 * (b / a - 1):+.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
