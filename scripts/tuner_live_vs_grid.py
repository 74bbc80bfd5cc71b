#!/usr/bin/env python
"""How close does `tuner live` get to the best of the full grid, and with how many trials?

1. The grid: one `bench sweep` per knob setting of the shm backends (every value of every knob
   in the registry; shm_one_shot and shm_two_shot share their knobs, so one sweep measures both
   at that setting) plus one gloo sweep: every configuration at every size.
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
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.backends import get_spec  # noqa: E402
from bench.sizes import format_size  # noqa: E402
from tuner.data import find_run_dirs, load_rows, params_key  # noqa: E402

SHM = ("shm_one_shot", "shm_two_shot")


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, check=True)


def common(args) -> list[str]:
    return ["--world-size", str(args.world_size), "-b", args.min_bytes, "-e", args.max_bytes,
            "-f", str(args.factor), "--dtypes", args.dtype, "--device", "cpu",
            "-n", str(args.iters), "-w", str(args.warmup)]


def grid(args, out: Path) -> None:
    knobs = get_spec(SHM[0]).knobs
    assert all(get_spec(n).knobs == knobs for n in SHM), "shm backends no longer share knobs"
    combos = list(itertools.product(*knobs.values()))
    if not (out / "gloo" / "results.csv").is_file():
        run(["bench.cli", "sweep", *common(args), "--backends", "gloo", "--out",
             str(out / "gloo"), "-q"])
    for index, combo in enumerate(combos):
        target = out / f"shm-{index:02d}"
        if (target / "results.csv").is_file():
            continue
        params = [f"--param={name}.{knob}={value}" for name in SHM
                  for knob, value in zip(knobs, combo, strict=True)]
        run(["bench.cli", "sweep", *common(args), "--backends", ",".join(SHM), *params,
             "--out", str(target), "-q"])


def live(args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run(["tuner.cli", "live", *common(args), "--backends", ",".join(("gloo", *SHM)),
         "-o", str(out / "thresholds.json"), "--study-db", str(out / "study.db"),
         "--seed", str(args.seed)])


def compare(out: Path, grid_dir: Path, live_dir: Path) -> list[str]:
    rows = load_rows(find_run_dirs([grid_dir]))
    latency: dict[int, dict[tuple[str, str], float]] = {}
    for row in rows.itertuples(index=False):
        latency.setdefault(int(row.bytes), {})[(row.backend, row.params)] = float(row.latency_us)
    with open(out / "grid_latency.csv", "w") as fh:
        fh.write("bytes,backend,params,latency_us\n")
        for nbytes in sorted(latency):
            for (backend, params), value in sorted(latency[nbytes].items()):
                fh.write(f"{nbytes},{backend},\"{params.replace(chr(34), chr(34) * 2)}\","
                         f"{value:.6g}\n")
    summary = json.loads((live_dir / "thresholds.live.json").read_text())
    (out / "live.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| size | grid best (us) | live's pick in the grid (us) | regret | measured / grid |",
             "| --: | --: | --: | --: | --: |"]
    regrets, used, total = [], 0, 0
    for group in summary["groups"]:
        for point in group["points"]:
            nbytes, grid_here = point["nbytes"], latency.get(point["nbytes"], {})
            if not grid_here or point["best"] is None:
                continue
            best = min(grid_here.values())
            algorithm, params = point["best"]
            picked = grid_here.get((algorithm, params_key(params)))
            regret = picked / best - 1 if picked else float("nan")
            regrets.append(regret)
            used += point["measured"]
            total += len(grid_here)
            lines.append(f"| {format_size(nbytes)} | {best:.1f} | "
                         f"{picked:.1f} | {100 * regret:.1f}% | "
                         f"{point['measured']} / {len(grid_here)} |")
    lines.append(f"| all | | | mean {100 * statistics.fmean(regrets):.1f}%, median "
                 f"{100 * statistics.median(regrets):.1f}% | {used} / {total} "
                 f"({100 * used / total:.0f}%) |")
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
    p.add_argument("--out", required=True, help="work directory (grid runs, live study)")
    p.add_argument("--skip-grid", action="store_true", help="reuse the grid runs in --out")
    p.add_argument("--markdown", default=None, help="also write the table here")
    args = p.parse_args()
    out = Path(args.out)
    grid_dir, live_dir = out / "grid", out / "live"
    if not args.skip_grid:
        grid(args, grid_dir)
    if not (live_dir / "thresholds.live.json").is_file():
        live(args, live_dir)
    lines = compare(out, grid_dir, live_dir)
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
