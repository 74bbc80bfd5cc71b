#!/usr/bin/env python
"""How close does `tuner live` get to the best of the full grid, and with how many trials?

1. The grid: `tuner live --grid` measures every configuration (every backend x every value
   of every knob in the registry) at every size, with the same launched ranks and the same
   measurement code as the search, into its own study.
2. `tuner live` over the same backends, sizes and dtype, from an empty study.
3. Per size: the configuration live found best, its latency *in the grid* over the grid's best
   (regret; both numbers from the grid run, so run-to-run drift does not count), and live's
   measurements against the grid's size.

Nothing asserts; the figures are printed and, with --markdown, written to a file. The grid's
latencies are kept as grid_latency.csv and live's summary as live.json in --out.
    python scripts/tuner_live_vs_grid.py --world-size 2 -b 1K -e 1M -f 4 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.sizes import format_size  # noqa: E402
from tuner.data import params_key  # noqa: E402
from tuner.study import measurements, storage_url  # noqa: E402

BACKENDS = ("gloo", "shm_one_shot", "shm_two_shot")


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, check=True)


def live(args, out: Path, grid: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run(["tuner.cli", "live", "--world-size", str(args.world_size), "-b", args.min_bytes,
         "-e", args.max_bytes, "-f", str(args.factor), "--dtypes", args.dtype, "--device",
         "cpu", "-n", str(args.iters), "-w", str(args.warmup), "--backends", ",".join(BACKENDS),
         "-o", str(out / "thresholds.json"), "--study-db", str(out / "study.db"),
         "--seed", str(args.seed), *(["--grid", "--cache-backends", "512"] if grid else [])])


def compare(out: Path, grid_dir: Path, live_dir: Path) -> list[str]:
    data = measurements(storage_url(str(grid_dir / "study.db")))
    latency: dict[int, dict[tuple[str, str], float]] = {}
    for by_size in data.values():
        for nbytes, points in by_size.items():
            for p in points:
                latency.setdefault(nbytes, {})[(p.algorithm, params_key(p.params))] = p.latency_us
    with open(out / "grid_latency.csv", "w") as fh:
        fh.write("bytes,backend,params,latency_us\n")
        for nbytes in sorted(latency):
            for (backend, params), value in sorted(latency[nbytes].items()):
                quoted = params.replace('"', '""')
                fh.write(f'{nbytes},{backend},"{quoted}",{value:.6g}\n')
    summary = json.loads((live_dir / "thresholds.live.json").read_text())
    (out / "live.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| size | grid best (us) | grid best config | live's pick, in the grid (us) | "
             "live's pick | regret | measured / grid |",
             "| --: | --: | --- | --: | --- | --: | --: |"]
    from tuner.builder import config_label

    regrets, used, total = [], 0, 0
    for group in summary["groups"]:
        for point in group["points"]:
            nbytes, grid_here = point["nbytes"], latency.get(point["nbytes"], {})
            if not grid_here or point["best"] is None:
                continue
            (best_alg, best_key), best = min(grid_here.items(), key=lambda kv: kv[1])
            algorithm, params = point["best"]
            picked = grid_here.get((algorithm, params_key(params)), float("nan"))
            regret = picked / best - 1
            regrets.append(regret)
            used += point["measured"]
            total += point["grid"]
            lines.append(f"| {format_size(nbytes)} | {best:.1f} | "
                         f"{config_label(best_alg, json.loads(best_key))} | {picked:.1f} | "
                         f"{config_label(algorithm, params)} | {100 * regret:.1f}% | "
                         f"{point['measured']} / {point['grid']} |")
    lines.append(f"| all | | | | | mean {100 * statistics.fmean(regrets):.1f}%, median "
                 f"{100 * statistics.median(regrets):.1f}%, worst {100 * max(regrets):.1f}% | "
                 f"{used} / {total} ({100 * used / total:.0f}%) |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("-b", "--min-bytes", default="1K")
    p.add_argument("-e", "--max-bytes", default="1M")
    p.add_argument("-f", "--factor", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("-n", "--iters", type=int, default=20)
    p.add_argument("-w", "--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="work directory (grid and live studies); a "
                   "finished step found there is not run again")
    p.add_argument("--markdown", default=None, help="also write the table here")
    args = p.parse_args()
    out = Path(args.out)
    grid_dir, live_dir = out / "grid", out / "live"
    if not (grid_dir / "thresholds.live.json").is_file():
        live(args, grid_dir, grid=True)
    if not (live_dir / "thresholds.live.json").is_file():
        live(args, live_dir, grid=False)
    lines = compare(out, grid_dir, live_dir)
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
