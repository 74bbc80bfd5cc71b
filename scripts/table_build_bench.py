"""How long a large thresholds.json takes to load and to build its dispatcher (one rank, CPU).

    python scripts/table_build_bench.py --rules 10000

Writes a valid table of --rules rules for this node (alternating gloo and shm_one_shot, two
knob settings, so every chain has several backends to fall through), then prints the seconds
of `schema.load` (parse + validate) and of `Dispatcher.from_file` (load + routes) on a one-rank
gloo group. A figure, not a test: machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch.distributed as dist

from bench.launch.launcher import free_port
from bench.run.hardware import fingerprint
from tuner.runtime.dispatch import Dispatcher
from tuner.runtime.schema import load

_ALGORITHMS = (
    ("gloo", {}),
    ("shm_one_shot", {"threads": 1}),
    ("gloo", {}),
    ("shm_one_shot", {"threads": 2}),
)


def table_document(hardware_key: str, rules: int, step_bytes: int = 64) -> dict:
    """A valid one-table document of `rules` rules (the last the catch-all)."""
    out = []
    for i in range(rules):
        name, params = _ALGORITHMS[i % len(_ALGORITHMS)]
        rule: dict = {"max_bytes": (i + 1) * step_bytes, "algorithm": name}
        if params:
            rule["params"] = params
        out.append(rule)
    out[-1]["max_bytes"] = None
    out[-1]["algorithm"] = "gloo"
    out[-1].pop("params", None)
    table = {
        "hardware_key": hardware_key,
        "world_size": 1,
        "dtype": "float32",
        "mode": "eager",
        "rules": out,
        "max_size": {"shm_one_shot": rules * step_bytes},
        "evidence": {
            "run_id": "bench",
            "points": rules,
            "regret_vs_oracle": 0.0,
            "gain_vs_nccl_geomean": None,
        },
    }
    return {"schema_version": 1, "generated_by": {"tool": "table_build_bench"}, "tables": [table]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=10_000)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port("127.0.0.1")))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "thresholds.json"
            document = table_document(fingerprint("cpu")["hardware_key"], args.rules)
            path.write_text(json.dumps(document))
            start = time.perf_counter()
            load(path)
            load_s = time.perf_counter() - start
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dispatcher = Dispatcher.from_file(path)
            build_s = time.perf_counter() - start
            dispatcher.release()
            print(
                f"{args.rules} rules, {path.stat().st_size} bytes: load {load_s:.3f} s, "
                f"Dispatcher.from_file {build_s:.3f} s (load + routes, one rank, {os.cpu_count()} "
                "cores)"
            )
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
