#!/usr/bin/env python
"""The CPU benchmark of issue 3: shm_one_shot, shm_two_shot and gloo side by side.

One `bench sweep` per world size (2 and 4 by default) over 1 KiB..64 MiB, each into its own run
directory under results/<hardware_key>/, then the ratios the issue sets targets for. With
`--repeats R` the sweeps run R times, alternating world sizes, and each point keeps its fastest
repeat (on a shared machine other jobs come and go; the minimum over full side-by-side sweeps is
the least disturbed figure, and the spread is printed beside it):

- latency shm / gloo per size (target <= 0.1 up to 64 KiB),
- algbw shm / gloo at the largest size (target >= 2 at 64 MiB).

Nothing here asserts: the figures are printed (and with --markdown written to a file).
    python scripts/bench_cpu.py [--world-sizes 2,4] [-e 64M] [--dtype float32] [--markdown F]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.analysis.results import read_results  # noqa: E402
from bench.run.hardware import fingerprint  # noqa: E402
from bench.sizes import format_size, parse_size  # noqa: E402

SHM = ("shm_one_shot", "shm_two_shot")
BACKENDS = ("gloo", *SHM)
SMALL_BYTES = 64 << 10
LATENCY_TARGET, BANDWIDTH_TARGET = 0.1, 2.0


def sweep(world_size: int, out: Path, args: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "bench.cli", "sweep", "--world-size", str(world_size),
           "--backends", ",".join(BACKENDS), "-b", args.min_bytes, "-e", args.max_bytes,
           "--dtypes", args.dtype, "--device", "cpu", "-n", str(args.iters),
           "-w", str(args.warmup), "--out", str(out), "-q", *args.extra]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (world size, bytes): latency of each backend (fastest repeat) and
    shm/gloo ratios."""
    ok = frame[frame["latency_us"].notna() & (frame["correct"] == True)]  # noqa: E712
    wide = ok.pivot_table(index=["world_size", "bytes"], columns="backend",
                          values="latency_us", aggfunc="min").reset_index()
    worst = ok.pivot_table(index=["world_size", "bytes"], columns="backend",
                           values="latency_us", aggfunc="max").reset_index()
    for name in BACKENDS:
        wide[f"{name}_max"] = worst[name]
    for name in SHM:
        wide[f"{name}/gloo"] = wide[name] / wide["gloo"]
    wide["best_shm/gloo"] = wide[list(SHM)].min(axis=1) / wide["gloo"]
    return wide


def table(wide: pd.DataFrame, repeats: int) -> list[str]:
    """Latency per backend (the slowest repeat in brackets when there are several)."""
    def cell(r, name: str) -> str:
        text = f"{r[name]:.1f}"
        return text + (f" ({r[name + '_max']:.0f})" if repeats > 1 else "")

    lines = ["| ws | size | gloo (us) | one-shot (us) | two-shot (us) | one/gloo | two/gloo |",
             "| --: | --: | --: | --: | --: | --: | --: |"]
    for _, r in wide.iterrows():
        lines.append(f"| {int(r.world_size)} | {format_size(int(r.bytes))} | {cell(r, 'gloo')} | "
                     f"{cell(r, 'shm_one_shot')} | {cell(r, 'shm_two_shot')} | "
                     f"{r['shm_one_shot/gloo']:.3f} | {r['shm_two_shot/gloo']:.3f} |")
    return lines


def verdicts(wide: pd.DataFrame) -> list[str]:
    lines = []
    for ws, group in wide.groupby("world_size"):
        small = group[group["bytes"] <= SMALL_BYTES]
        worst = small["best_shm/gloo"].max()
        top = group[group["bytes"] == group["bytes"].max()].iloc[0]
        bw = 1.0 / top["best_shm/gloo"]  # same bytes: algbw ratio = inverse latency ratio
        nbytes = int(top.bytes)
        algbw = {n: nbytes / top[n] / 1e3 for n in BACKENDS}
        lines.append(
            f"- world size {ws}: worst best-shm/gloo latency up to {format_size(SMALL_BYTES)} = "
            f"{worst:.3f} (target <= {LATENCY_TARGET}: {'met' if worst <= LATENCY_TARGET else 'MISSED'}); "
            f"at {format_size(nbytes)} algbw gloo {algbw['gloo']:.2f}, one-shot "
            f"{algbw['shm_one_shot']:.2f}, two-shot {algbw['shm_two_shot']:.2f} GB/s, best shm = "
            f"{bw:.2f}x gloo (target >= {BANDWIDTH_TARGET}: "
            f"{'met' if bw >= BANDWIDTH_TARGET else 'MISSED'})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", default="2,4")
    p.add_argument("-b", "--min-bytes", default="1K")
    p.add_argument("-e", "--max-bytes", default="64M")
    p.add_argument("--dtype", default="float32")
    p.add_argument("-n", "--iters", type=int, default=20)
    p.add_argument("-w", "--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="full sweeps per world size")
    p.add_argument("--runs", nargs="*", default=None,
                   help="report existing run directories instead of measuring")
    p.add_argument("--markdown", default=None, help="also write the figures to this file")
    p.add_argument("extra", nargs="*", help="more `bench sweep` flags after --")
    args = p.parse_args(argv)
    parse_size(args.min_bytes), parse_size(args.max_bytes)  # fail early on a bad size

    fp = fingerprint("cpu")
    if args.runs:
        runs = [Path(r) for r in args.runs]
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        runs = []
        for repeat in range(args.repeats):
            for ws in (int(w) for w in args.world_sizes.split(",")):
                name = f"{stamp}-shm-vs-gloo-ws{ws}" + (f"-r{repeat}" if args.repeats > 1 else "")
                out = REPO / "results" / fp["hardware_key"] / name
                sweep(ws, out, args)
                runs.append(out)
    frame = pd.concat([read_results(r) for r in runs], ignore_index=True)
    wide = ratios(frame)
    cores = os.cpu_count()
    cpu, versions = fp.get("cpu", {}), fp.get("versions", {})
    head = [f"machine: {cpu.get('model')}, {cpu.get('cores', cores)} cores, "
            f"{cpu.get('memory_gib')} GiB; hardware_key {fp['hardware_key']}; torch "
            f"{versions.get('torch')}, Python {versions.get('python')}; dtype {args.dtype}",
            "runs: " + ", ".join(str(Path(r).relative_to(REPO)) if Path(r).is_absolute()
                                  and REPO in Path(r).parents else str(r) for r in runs), ""]
    repeats = max(1, len(runs) // max(1, frame["world_size"].nunique()))
    if repeats > 1:
        head.append(f"fastest of {repeats} full sweeps per world size (slowest in brackets)")
    lines = head + table(wide, repeats) + [""] + verdicts(wide)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
