#!/usr/bin/env python
"""How close does `tuner live` get to the best of the full grid, and with how many trials?

1. The grid: `tuner live --grid` measures every configuration (every backend x every value
   of every knob in the registry) at every size, with the same launched ranks and the same
   measurement code as the search, into its own study.
2. `tuner live` over the same backends, sizes and dtype, from an empty study.
3. Per size: the configuration live found best, its latency *in the grid* over the grid's best
   (regret in the grid), and live's measurements against the grid's size.
4. The grid's best is the minimum of ~200 noisy measurements, so it is flattered by its own
   luck (the winner's curse); where the two picks differ, both are re-measured side by side,
   interleaved, `--repeats` times each (`tuner.search.live.confirm_worker`), and the regret is the
   ratio of those medians.

Nothing asserts; the figures are printed and, with --markdown, written to a file. The grid's
latencies are kept as grid_latency.csv and live's summary as live.json in --out, and every trial
of the search's study as live/study.trials.csv (the study itself, live/study.db, is not
committed: results/tuner.md).

The experiment of results/tuner.md ("Search vs grid"), kept beside what it made; run from the
repository root:
    python results/cpu-intel-xeon-processor-2c/20261129-live-vs-grid/live_vs_grid.py \
        --world-size 2 -b 1K -e 1M -f 4 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # results/<hardware_key>/<run_id>/this file
sys.path.insert(0, str(REPO))

from bench.backends import params_key  # noqa: E402
from bench.sizes import format_size  # noqa: E402
from tuner.search.study import measurements, storage_url  # noqa: E402

BACKENDS = ("gloo", "shm_one_shot", "shm_two_shot")


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, check=True)


def live(args, out: Path, grid: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run(
        [
            "tuner.cli",
            "live",
            "--world-size",
            str(args.world_size),
            "-b",
            args.min_bytes,
            "-e",
            args.max_bytes,
            "-f",
            str(args.factor),
            "--dtypes",
            args.dtype,
            "--device",
            "cpu",
            "-n",
            str(args.iters),
            "-w",
            str(args.warmup),
            "--backends",
            ",".join(BACKENDS),
            "-o",
            str(out / "thresholds.json"),
            "--study-db",
            str(out / "study.db"),
            "--seed",
            str(args.seed),
            *(["--grid", "--cache-backends", "512"] if grid else (args.live_args or [])),
        ]
    )


def grid_latency(out: Path, grid_dir: Path) -> dict[int, dict[tuple[str, str], float]]:
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
    return latency


def confirm(args, out: Path, jobs: list[dict]) -> list[dict]:
    """The grid's best and live's pick per size, re-measured side by side (interleaved)."""
    path = out / "confirm.json"
    if not path.is_file() and jobs:
        from bench.launch.config import SweepConfig
        from tuner.search.live import confirm_worker

        cfg = SweepConfig(
            world_size=args.world_size,
            backends=list(BACKENDS),
            sizes=sorted(j["bytes"] for j in jobs),
            dtypes=[args.dtype],
            modes=["eager"],
            device="cpu",
            iters=args.iters,
            warmup=args.warmup,
            quiet=True,
        )
        launcher()(cfg, confirm_worker, (cfg, jobs, str(path), args.repeats))
    return json.loads(path.read_text()) if path.is_file() else []


def compare(args, out: Path, grid_dir: Path, live_dir: Path) -> list[str]:
    from tuner.table.builder import config_label

    latency = grid_latency(out, grid_dir)
    summary = json.loads((live_dir / "thresholds.live.json").read_text())
    (out / "live.json").write_text(json.dumps(summary, indent=2) + "\n")
    points = [
        p
        for g in summary["groups"]
        for p in g["points"]
        if latency.get(p["nbytes"]) and p["best"] is not None
    ]
    jobs = []
    for point in points:
        (alg, key), _ = min(latency[point["nbytes"]].items(), key=lambda kv: kv[1])
        picked = [point["best"][0], point["best"][1]]
        best = [alg, json.loads(key)]
        if params_key(best[1]) != params_key(picked[1]) or best[0] != picked[0]:
            jobs.append({"bytes": point["nbytes"], "configs": {"grid": best, "live": picked}})
    confirmed = {c["bytes"]: c for c in confirm(args, out, jobs)}
    lines = [
        "| size | grid best (config, us in the grid) | live's pick (config, us in the grid) "
        "| regret in the grid | side by side: grid's / live's (us, median of "
        f"{args.repeats}) | regret side by side | measured / grid |",
        "| --: | --- | --- | --: | --: | --: | --: |",
    ]
    single, paired, used, total = [], [], 0, 0
    for point in points:
        nbytes, here = point["nbytes"], latency[point["nbytes"]]
        (alg, key), best = min(here.items(), key=lambda kv: kv[1])
        algorithm, params = point["best"]
        picked = here.get((algorithm, params_key(params)), float("nan"))
        single.append(picked / best - 1)
        pair = "same configuration"
        if nbytes in confirmed:
            times = confirmed[nbytes]["latency_us"]
            grid_t, live_t = statistics.median(times["grid"]), statistics.median(times["live"])
            paired.append(live_t / grid_t - 1)
            pair = f"{grid_t:.1f} / {live_t:.1f}"
            pair_regret = f"{100 * paired[-1]:+.1f}%"
        else:
            paired.append(0.0)
            pair_regret = "0.0%"
        used += point["measured"]
        total += point["grid"]
        lines.append(
            f"| {format_size(nbytes)} | {config_label(alg, json.loads(key))} {best:.1f} "
            f"| {config_label(algorithm, params)} {picked:.1f} | "
            f"{100 * single[-1]:.1f}% | {pair} | {pair_regret} | "
            f"{point['measured']} / {point['grid']} |"
        )
    lines.append(
        f"| all | | | mean {100 * statistics.fmean(single):.1f}% | | mean "
        f"{100 * statistics.fmean(paired):+.1f}%, median "
        f"{100 * statistics.median(paired):+.1f}%, worst {100 * max(paired):+.1f}% | "
        f"{used} / {total} ({100 * used / total:.0f}%) |"
    )
    return lines


def launcher():
    """The sweep's launcher."""
    from bench.launch.launcher import launch

    return launch


def export_trials(db: Path) -> Path:
    """Every trial of every study in an Optuna SQLite file as <db>.trials.csv beside it: study,
    number, state, value, params and user attributes (JSON), start and end time."""
    import optuna
    import pandas as pd

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, rows = storage_url(str(db)), []
    for name in optuna.study.get_all_study_names(storage=storage):
        for t in optuna.load_study(study_name=name, storage=storage).trials:
            rows.append(
                {
                    "study": name,
                    "number": t.number,
                    "state": t.state.name,
                    "value": t.values[0] if t.values else None,
                    "params": json.dumps(t.params, sort_keys=True),
                    "user_attrs": json.dumps(t.user_attrs, sort_keys=True),
                    "datetime_start": t.datetime_start,
                    "datetime_complete": t.datetime_complete,
                }
            )
    out = db.with_suffix(".trials.csv")
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


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
    p.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="side-by-side re-measurements of the grid's best and live's pick",
    )
    p.add_argument(
        "--live-arg",
        dest="live_args",
        action="append",
        metavar="ARG",
        help="passed on to the search's `tuner live` (not the grid's), e.g. "
        "--live-arg=--patience --live-arg=20; repeatable",
    )
    p.add_argument(
        "--out",
        required=True,
        help="work directory (grid and live studies); a finished step found there is not run again",
    )
    p.add_argument("--markdown", default=None, help="also write the table here")
    args = p.parse_args()
    out = Path(args.out)
    grid_dir, live_dir = out / "grid", out / "live"
    if not (grid_dir / "thresholds.live.json").is_file():
        live(args, grid_dir, grid=True)
    if not (live_dir / "thresholds.live.json").is_file():
        live(args, live_dir, grid=False)
    export_trials(live_dir / "study.db")
    text = "\n".join(compare(args, out, grid_dir, live_dir))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
