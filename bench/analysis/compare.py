"""`bench compare`: backends side by side over repeated full sweeps, with ratios to a baseline.

One `bench sweep` per world size (2 and 4 by default) over 1 KiB..64 MiB, each into its own run
directory under OUT/<hardware_key>/, then the ratios issue 3 set targets for. With `--repeats R`
the sweeps run R times, alternating world sizes, and each point keeps its fastest repeat (on a
shared machine other jobs come and go; the minimum over full side-by-side sweeps is the least
disturbed figure, and the spread is printed beside it):

- latency of the best candidate / the baseline's per size (target <= 0.1 up to 64 KiB),
- algbw of the best candidate / the baseline's at the largest size (target >= 2).

The baseline is one backend (`--baseline gloo`; default: the device's floor, gloo on CPU, nccl
on GPU) or the fastest of several at each point (`--baseline best-of:a,b`, e.g. the best peer
library: `best-of:mpi,deepspeed_shm`, issue 15); the candidates are `--candidates` (default:
every other backend of `--backends`; the rest are shown beside them, without ratios). Against a
baseline other than the floor the targets are parity (latency <= 1.0x up to 64 KiB, algbw
>= 1.0x at the largest size); `--latency-target` and `--bandwidth-target` set others. The `mpi`
peer needs `--launcher mpirun` (passed to every sweep). Nothing here asserts: the figures
are printed (and with --markdown written to a file).

    bench compare [--world-sizes 2,4] [-e 64M] [--dtypes float32] [--repeats 3] [--markdown F]
                  [--baseline best-of:mpi,deepspeed_shm --candidates shm_one_shot,shm_two_shot]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.analysis.results import correct_rows, read_results
from bench.backends import floor_name
from bench.launch.config import RUNS_ROOT
from bench.launch.flags import UsageError
from bench.launch.paths import writable_dir, writable_file, write_output
from bench.run.hardware import fingerprint
from bench.sizes import format_size, parse_size

__all__ = [
    "Baseline",
    "add_arguments",
    "run",
    "parse_baseline",
    "short_labels",
    "ratios",
    "table",
    "verdicts",
    "targets",
]

BACKENDS = "gloo,shm_one_shot,shm_two_shot"
SMALL_BYTES = 64 << 10
LATENCY_TARGET, BANDWIDTH_TARGET = 0.1, 2.0  # against the floor (issue 3)
PARITY = 1.0  # against any other baseline: a peer library (issue 15)
BEST_OF = "best-of:"


@dataclasses.dataclass(frozen=True)
class Baseline:
    """What every candidate is divided by: one backend, or the fastest of several per point.
    `candidates`: the backends given ratios (empty: every backend that is not a member);
    `latency_target`, `bandwidth_target`: what the verdicts hold them to."""

    members: tuple[str, ...]
    candidates: tuple[str, ...] = ()
    latency_target: float = LATENCY_TARGET
    bandwidth_target: float = BANDWIDTH_TARGET

    def chosen(self, backends: Sequence[str]) -> list[str]:
        """The candidates among `backends`, in their order."""
        return [
            b
            for b in backends
            if b not in self.members and (not self.candidates or b in self.candidates)
        ]

    @property
    def label(self) -> str:
        return self.members[0] if len(self.members) == 1 else f"best({','.join(self.members)})"

    @property
    def slug(self) -> str:
        return self.members[0] if len(self.members) == 1 else "best"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `bench compare`."""
    parser.add_argument("--world-sizes", default="2,4", help="comma list, one sweep each")
    parser.add_argument("-b", "--min-bytes", default="1K")
    parser.add_argument("-e", "--max-bytes", default="64M")
    parser.add_argument("--dtypes", "--dtype", dest="dtypes", default="float32")
    parser.add_argument("--backends", default=BACKENDS, help="comma list (default: %(default)s)")
    parser.add_argument(
        "--baseline",
        default=None,
        help="BACKEND, or best-of:A,B (the fastest of them at each point); "
        "default: the device's floor (gloo on CPU, nccl on GPU)",
    )
    parser.add_argument(
        "--candidates",
        default=None,
        help="comma list of backends given ratios (default: all but the baseline)",
    )
    parser.add_argument(
        "--latency-target",
        type=float,
        default=None,
        help="default 0.1 against the floor, 1.0 against any other baseline",
    )
    parser.add_argument(
        "--bandwidth-target",
        type=float,
        default=None,
        help="default 2.0 against the floor, 1.0 against any other baseline",
    )
    parser.add_argument(
        "--launcher",
        default="torchrun",
        help="the sweeps' launcher: torchrun, or mpirun (the mpi peer needs it)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("-n", "--iters", type=int, default=20)
    parser.add_argument("-w", "--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="full sweeps per world size")
    parser.add_argument(
        "--runs",
        nargs="*",
        default=None,
        help="report existing run directories instead of measuring",
    )
    parser.add_argument(
        "--out",
        default=RUNS_ROOT,
        help=f"run directories go to OUT/<hardware_key>/ (default: {RUNS_ROOT}; the committed "
        "reference runs are under results/)",
    )
    parser.add_argument(
        "--label",
        default=None,
        help="run directory names: "
        "<time>-LABEL-ws<N>[-r<repeat>] (default: <candidates>-vs-<baseline>)",
    )
    parser.add_argument("--markdown", default=None, help="also write the figures to this file")
    parser.add_argument("extra", nargs="*", help="more `bench sweep` flags after --")


def parse_baseline(text: str, backends: Sequence[str]) -> Baseline:
    """`NAME` or `best-of:A,B`, each a backend of `backends`; raises ValueError naming it."""
    names = text[len(BEST_OF) :].split(",") if text.startswith(BEST_OF) else [text]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"expected BACKEND or {BEST_OF}A,B, got {text!r}")
    for name in names:
        if name not in backends:
            raise ValueError(f"{name} is not among --backends ({', '.join(backends)})")
    return Baseline(tuple(names))


def short_labels(names: Sequence[str]) -> tuple[str, dict[str, str], dict[str, str]]:
    """(group, column label, ratio label) of the candidates. When they are one family (their
    names share parts in front), those parts name the group and leave the columns, and parts
    all share at the end leave the ratios too: shm_one_shot, shm_two_shot -> shm; one-shot,
    two-shot; one, two. Otherwise (one candidate included) no group, and the names stay whole."""
    parts = [name.split("_") for name in names]
    front = back = 0
    shortest = min(map(len, parts))
    while len(parts) > 1 and front < shortest - 1 and len({p[front] for p in parts}) == 1:
        front += 1
    while front and back < shortest - front - 1 and len({p[-1 - back] for p in parts}) == 1:
        back += 1
    if not front:
        return "", {n: n for n in names}, {n: n for n in names}
    group = "_".join(parts[0][:front])
    columns = {n: "-".join(p[front:]) for n, p in zip(names, parts, strict=True)}
    ratio = {n: "-".join(p[front : len(p) - back]) for n, p in zip(names, parts, strict=True)}
    return group, columns, ratio


def ratios(frame, backends: Sequence[str], baseline: Baseline):
    """One row per (world size, dtype, bytes): each backend's latency (fastest repeat, the
    slowest in `<name>_max`), the baseline's, and each candidate's ratio to it."""
    ok = correct_rows(frame)
    index = ["world_size", "dtype", "bytes"]
    wide = (
        ok.pivot_table(index=index, columns="backend", values="latency_us", aggfunc="min")
        .reindex(columns=list(backends))
        .reset_index()
    )
    worst = (
        ok.pivot_table(index=index, columns="backend", values="latency_us", aggfunc="max")
        .reindex(columns=list(backends))
        .reset_index()
    )
    candidates = baseline.chosen(backends)
    for name in backends:
        wide[f"{name}_max"] = worst[name]
    wide["baseline"] = wide[list(baseline.members)].min(axis=1)
    for name in candidates:
        wide[f"{name}/base"] = wide[name] / wide["baseline"]
    wide["best/base"] = wide[candidates].min(axis=1) / wide["baseline"]
    return wide


def _labels(backends: Sequence[str], baseline: Baseline) -> tuple[str, dict[str, str], dict]:
    group, columns, ratio = short_labels(baseline.chosen(backends))
    shown = {b: b for b in backends if b not in columns}
    return group, {b: b for b in baseline.members} | shown | columns, ratio


def table(wide, backends: Sequence[str], baseline: Baseline, repeats: int) -> list[str]:
    """Latency per backend (the slowest repeat in brackets when there are several), then each
    candidate's ratio to the baseline."""
    _, columns, ratio = _labels(backends, baseline)
    order = list(baseline.members) + [b for b in backends if b not in baseline.members]
    order = [b for b in order if b not in ratio] + [b for b in order if b in ratio]
    dtypes = wide["dtype"].nunique() > 1

    def cell(r, name: str) -> str:
        text = f"{r[name]:.1f}"
        return text + (f" ({r[name + '_max']:.0f})" if repeats > 1 else "")

    head = ["ws"] + (["dtype"] if dtypes else []) + ["size"]
    head += [f"{columns[b]} (us)" for b in order]
    head += [f"{ratio[c]}/{baseline.label}" for c in ratio]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["--:"] * len(head)) + " |"]
    for _, r in wide.iterrows():
        row = [str(int(r["world_size"]))] + ([str(r["dtype"])] if dtypes else [])
        row += [format_size(int(r["bytes"]))] + [cell(r, b) for b in order]
        row += [f"{r[c + '/base']:.3f}" for c in ratio]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def verdicts(wide, backends: Sequence[str], baseline: Baseline) -> list[str]:
    """Per world size (and dtype, when several): the targets, met or MISSED."""
    group, columns, ratio = _labels(backends, baseline)
    best = f"best-{group}" if group else "best"
    latency_target, bandwidth_target = baseline.latency_target, baseline.bandwidth_target
    dtypes = wide["dtype"].nunique() > 1
    lines = []
    for (ws, dtype), part in wide.groupby(["world_size", "dtype"]):
        small = part[part["bytes"] <= SMALL_BYTES]
        worst = small["best/base"].max()
        top = part[part["bytes"] == part["bytes"].max()].iloc[0]
        bw = 1.0 / top["best/base"]  # same bytes: algbw ratio = inverse latency ratio
        nbytes = int(top.bytes)
        shown = [n for n in columns if n in baseline.members or n in ratio]
        algbw = ", ".join(f"{columns[n]} {nbytes / top[n] / 1e3:.2f}" for n in shown)
        lines.append(
            f"- world size {ws}{f' {dtype}' if dtypes else ''}: worst {best}/{baseline.label} "
            f"latency up to {format_size(SMALL_BYTES)} = {worst:.3f} (target <= "
            f"{latency_target:g}: {'met' if worst <= latency_target else 'MISSED'}); at "
            f"{format_size(nbytes)} algbw {algbw} GB/s, {best.replace('-', ' ', 1)} = "
            f"{bw:.2f}x {baseline.label} (target >= {bandwidth_target:g}: "
            f"{'met' if bw >= bandwidth_target else 'MISSED'})"
        )
    return lines


def _sweep(world_size: int, out: Path, backends: Sequence[str], args) -> int:
    cmd = [
        sys.executable,
        "-m",
        "bench.cli",
        "sweep",
        "--world-size",
        str(world_size),
        "--backends",
        ",".join(backends),
        "-b",
        args.min_bytes,
        "-e",
        args.max_bytes,
        "--dtypes",
        args.dtypes,
        "--device",
        args.device,
        "-n",
        str(args.iters),
        "-w",
        str(args.warmup),
        "--out",
        str(out),
        "-q",
        *args.extra,
    ]
    if args.launcher != "torchrun":
        cmd[cmd.index("-q") : cmd.index("-q")] = ["--launcher", args.launcher]
    print("$", " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd).returncode


def _measure(
    args, backends: Sequence[str], baseline: Baseline, hardware_key: str
) -> tuple[list[Path], int]:
    """The sweeps, R rounds alternating world sizes: their run directories, and the exit
    status of the first sweep that failed (0: none did)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    group, _, _ = short_labels(baseline.chosen(backends))
    label = args.label or f"{group or 'compare'}-vs-{baseline.slug}"
    runs = []
    for repeat in range(args.repeats):
        for ws in _world_sizes(args.world_sizes):
            name = f"{stamp}-{label}-ws{ws}" + (f"-r{repeat}" if args.repeats > 1 else "")
            out = Path(args.out) / hardware_key / name
            code = _sweep(ws, out, backends, args)
            if code:
                print(f"bench compare: the sweep into {out} failed (exit {code})", file=sys.stderr)
                return runs, code
            runs.append(out)
    return runs, 0


def _world_sizes(text: str) -> list[int]:
    return [int(w) for w in text.split(",")]


def _shown(path: Path) -> str:
    """A run directory as the user would type it: relative to here when below here."""
    here = Path.cwd()
    return str(path.relative_to(here)) if path.is_absolute() and here in path.parents else str(path)


def _check(args) -> tuple[list[str], Baseline]:
    """Every flag checked before a sweep starts; raises the CLI's UsageError naming it."""
    for flag, value in (("-b/--min-bytes", args.min_bytes), ("-e/--max-bytes", args.max_bytes)):
        try:
            parse_size(value)
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None
    try:
        if min(_world_sizes(args.world_sizes)) < 1:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"--world-sizes: expected a comma list of integers >= 1, got {args.world_sizes!r}"
        ) from None
    if args.repeats < 1:
        raise UsageError(f"--repeats: expected an integer >= 1, got {args.repeats}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    try:
        baseline = parse_baseline(args.baseline or floor_name(args.device), backends)
    except ValueError as exc:
        raise UsageError(f"--baseline: {exc}") from None
    if not [b for b in backends if b not in baseline.members]:
        raise UsageError(f"--backends: nothing to compare with the baseline {baseline.label}")
    return backends, targets(baseline, args, backends, floor_name(args.device))


def targets(baseline: Baseline, args, backends: Sequence[str], floor: str) -> Baseline:
    """The baseline with --candidates and the targets: issue 3's against the floor, parity
    against anything else, unless given; raises the CLI's UsageError naming a bad flag."""
    against_floor = baseline.members == (floor,)
    candidates = tuple(c.strip() for c in (args.candidates or "").split(",") if c.strip())
    bad = [c for c in candidates if c not in backends or c in baseline.members]
    if bad:
        raise UsageError(
            f"--candidates: {','.join(bad)} is not a backend of --backends outside the baseline"
        )
    if args.launcher not in ("torchrun", "mpirun"):
        raise UsageError(f"--launcher: expected torchrun or mpirun, got {args.launcher!r}")
    return dataclasses.replace(
        baseline,
        candidates=candidates,
        latency_target=args.latency_target
        if args.latency_target is not None
        else (LATENCY_TARGET if against_floor else PARITY),
        bandwidth_target=args.bandwidth_target
        if args.bandwidth_target is not None
        else (BANDWIDTH_TARGET if against_floor else PARITY),
    )


def run(args: argparse.Namespace) -> int:
    """`bench compare`: measure (or read --runs), print the table and the verdicts."""
    import pandas as pd

    backends, baseline = _check(args)
    _check_outputs(args)
    fp = fingerprint(args.device)
    runs, code = (
        ([Path(r) for r in args.runs], 0)
        if args.runs
        else _measure(args, backends, baseline, fp["hardware_key"])
    )
    if code:
        return code
    frame = pd.concat([read_results(r) for r in runs], ignore_index=True)
    wide = ratios(frame, backends, baseline)
    cpu, versions = fp.get("cpu", {}), fp.get("versions", {})
    head = [
        f"machine: {cpu.get('model')}, {cpu.get('cores', os.cpu_count())} cores, "
        f"{cpu.get('memory_gib')} GiB; hardware_key {fp['hardware_key']}; torch "
        f"{versions.get('torch')}, Python {versions.get('python')}; dtype {args.dtypes}",
        "runs: " + ", ".join(_shown(r) for r in runs),
        "",
    ]
    repeats = max(1, len(runs) // max(1, frame["world_size"].nunique()))
    if repeats > 1:
        head.append(f"fastest of {repeats} full sweeps per world size (slowest in brackets)")
    text = "\n".join(
        head + table(wide, backends, baseline, repeats) + [""] + verdicts(wide, backends, baseline)
    )
    print(text)
    if args.markdown:
        write_output("--markdown", args.markdown, text + "\n")
    return 0


def _check_outputs(args) -> None:
    """The files `bench compare` writes, checked by doing before a sweep starts."""
    if args.markdown:
        writable_file("--markdown", args.markdown)
    if not args.runs:
        writable_dir("--out", args.out)
