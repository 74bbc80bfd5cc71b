#!/usr/bin/env python
"""The dispatcher's per-call decision (rule lookup + the chosen backend's gates), side by side
with what it is made of and with the cheapest all-reduce there is, on this machine's CPU.

Median over batches of 1000 calls (the per-call figure is the batch time / 1000, which keeps the
timer's own cost out). Target: decision <= 1 us median on CPU. Nothing asserts; the figures are
printed (and with --markdown written to a file).
    python scripts/dispatch_overhead.py [--batches 300] [--markdown F]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.run.hardware import fingerprint  # noqa: E402
from tuner.runtime.dispatch import Dispatcher  # noqa: E402
from tuner.runtime.schema import Rule, Table, Thresholds  # noqa: E402


def per_call_ns(fn, batches: int, calls: int = 1000) -> float:
    times = []
    for _ in range(batches):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter_ns() - t0) / calls)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--markdown", default=None)
    args = p.parse_args()
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    fp = fingerprint("cpu")
    rules = (Rule(4096, "shm_one_shot"), Rule(65536, "shm_two_shot"), Rule(None, "gloo"))
    evidence = {"run_id": "overhead", "points": 0, "regret_vs_oracle": 0.0,
                "gain_vs_nccl_geomean": None}
    tables = tuple(Table(fp["hardware_key"], 1, dtype, "eager", rules,
                         {"shm_one_shot": 4096, "shm_two_shot": 65536}, evidence)
                   for dtype in ("float32", "bfloat16"))
    d = Dispatcher.from_thresholds(Thresholds(tables=tables))
    lines = [f"machine: {fp['cpu']['model']}, {fp['cpu']['cores']} cores "
             f"({fp['hardware_key']}); torch {torch.__version__}; python "
             f"{sys.version.split()[0]}; load average {os.getloadavg()[0]:.2f}",
             "", "| call | tensor | median per call (ns) | / decision |", "| --- | --- | --: | --: |"]
    rows = []
    for nbytes in (2048, 32768, 4 << 20):
        t = torch.ones(nbytes // 4)
        backend = d.decide(t)
        decision = per_call_ns(lambda t=t: d.decide(t), args.batches)
        gate = per_call_ns(lambda t=t, b=backend: b.can_take(t), args.batches)
        rows.append((f"decide -> {backend.name}", nbytes, decision, decision))
        rows.append((f"{backend.name}.can_take alone", nbytes, gate, decision))
    t = torch.ones(256)
    floor = per_call_ns(lambda: dist.all_reduce(t), max(20, args.batches // 10), calls=100)
    rows.append(("dist.all_reduce (gloo, 1 rank)", 1024, floor, rows[0][2]))
    for name, nbytes, value, ref in rows:
        lines.append(f"| {name} | {nbytes} B float32 | {value:.0f} | {value / ref:.2f} |")
    d.release()
    dist.destroy_process_group()
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
