"""A crashed peer of the custom all-reduce on a GPU node: start a `bench sweep` of the IPC
backends, SIGKILL one rank (not the writer) once rows are coming, and check what is left:
the sweep ends within its limit with one line per failed rank naming SIGKILL and the rows
counted; no process of the sweep is alive; nothing new in /dev/shm (torch's torch_<pid>_*
reference-count files, the project's aat-* segments); the table holds whole rows. Writes
a JSON summary; exit 1 when a check fails.

    python scripts/gpu_crash_check.py --world-size 4 --out /tmp/crash.json --log /tmp/crash.log
    python scripts/gpu_crash_check.py --device cpu --backends shm_one_shot --world-size 2 ...
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def _holds(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def _shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(("torch_", "aat-"))}


def _rows(table: Path) -> tuple[int, bool]:
    """(rows, every row whole)."""
    try:
        data = table.read_bytes()
    except OSError:
        return 0, True
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return len(rows), data.endswith(b"\n") and all(None not in r.values() for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--device", default="cuda", help="cpu tries the same on CPU backends")
    parser.add_argument("--backends", default="custom_one_shot,custom_two_shot")
    parser.add_argument(
        "--limit", type=float, default=60.0, help="seconds the sweep may take to end after the kill"
    )
    parser.add_argument("--out", required=True, help="JSON summary")
    parser.add_argument("--log", required=True, help="the sweep's output")
    args = parser.parse_args()
    run = Path(tempfile.mkdtemp(prefix="crash-")) / "run"
    shm_before = _shm()
    cmd = [
        sys.executable,
        "-m",
        "bench.cli",
        "sweep",
        "--device",
        args.device,
        "--world-size",
        str(args.world_size),
        "--backends",
        args.backends,
        "-b",
        "1M",
        "-e",
        "64M",
        "--dtypes",
        "bfloat16,float32",
        "--modes",
        "eager",
        "-n",
        "20",
        "-w",
        "2",
        "--timeout",
        "20",
        "--out",
        str(run),
        "-q",
    ]
    with open(args.log, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        summary = _crash(proc, run, args)
    summary["log_lines"] = [
        line for line in Path(args.log).read_text().splitlines() if line.startswith("bench")
    ]
    summary["new_shm"] = sorted(_shm() - shm_before)
    summary["rows"], summary["rows_whole"] = _rows(run / "results.csv")
    summary["ok"] = bool(
        summary.get("killed")
        and summary["ended_in_s"] is not None
        and not summary["left_alive"]
        and not summary["new_shm"]
        and summary["rows_whole"]
        and any("SIGKILL" in line and "rows are kept" in line for line in summary["log_lines"])
    )
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"crash ws={args.world_size}: ok={summary['ok']} ended_in_s={summary['ended_in_s']} "
        f"left_alive={summary['left_alive']} new_shm={summary['new_shm']} "
        f"rows={summary['rows']} whole={summary['rows_whole']}",
        flush=True,
    )
    return 0 if summary["ok"] else 1


def _crash(proc: subprocess.Popen, run: Path, args) -> dict:
    """Wait for two rows, kill a rank that is not the writer, wait for the end."""
    seen: set[int] = set()
    deadline = time.monotonic() + 240
    while _rows(run / "results.csv")[0] < 2:
        seen |= _children(proc.pid)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            return {
                "killed": None,
                "ended_in_s": None,
                "left_alive": [],
                "error": f"no 2 rows (sweep rc {proc.poll()})",
            }
        time.sleep(0.05)
    seen |= _children(proc.pid)
    ranks = [p for p in seen if b"spawn_main" in _cmdline(p)]
    victims = [p for p in ranks if not _holds(p, run / ".lock")]
    os.kill(victims[-1], signal.SIGKILL)
    hit = time.monotonic()
    try:
        proc.wait(timeout=args.limit)
        ended = round(time.monotonic() - hit, 1)
    except subprocess.TimeoutExpired:
        proc.kill()
        ended = None
    time.sleep(1.0)
    return {
        "killed": victims[-1],
        "ranks": sorted(ranks),
        "ended_in_s": ended,
        "returncode": proc.returncode,
        "left_alive": sorted(p for p in seen | {proc.pid} if _alive(p)),
    }


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


if __name__ == "__main__":
    sys.exit(main())
