"""Helpers of the fault tests: start a real sweep, find its ranks, watch its rows and leftovers."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHM_PREFIX = "aat-"  # bench.backends.shm_segment.NAME_PREFIX


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), out.get("PYTHONPATH")]))
    out.setdefault("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    out.update(extra or {})
    return out


# a process of its own host: its own hostname (UTS namespace), and a private /etc/hosts (mount
# namespace) where the simulated hosts resolve to loopback, as a cluster's DNS would resolve them
OWN_HOST = """f=$(mktemp) && cat /etc/hosts > "$f" && echo "127.0.0.1 $1" >> "$f" &&
mount --bind "$f" /etc/hosts && rm -f "$f" && hostname "$0" && shift && exec "$@" """


def start(
    program: str,
    *args: object,
    extra_env: dict[str, str] | None = None,
    cwd: Path | None = None,
    hostname: str | None = None,
    known_hosts: tuple[str, ...] = (),
    terminal: bool = False,
) -> subprocess.Popen:
    """The CLI in a process of its own; with `hostname`, on a simulated host of that name where
    `known_hosts` resolve to loopback (see `own_host_reason`). With `terminal`, in a process
    group of its own, as a shell starts a foreground job (Ctrl-C signals the whole group)."""
    module = {"bench": "bench.cli", "tuner": "tuner.cli"}[program]
    cmd = [sys.executable, "-m", module, *map(str, args)]
    if hostname is not None:
        cmd = own_host_command(hostname, known_hosts, cmd)
    return subprocess.Popen(
        cmd,
        env=env(extra_env),
        cwd=cwd or REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=terminal,
    )


def own_host_command(hostname: str, known_hosts: tuple[str, ...], cmd: list[str]) -> list[str]:
    return [
        "unshare",
        "--uts",
        "--mount",
        "sh",
        "-c",
        OWN_HOST,
        hostname,
        " ".join((hostname, *known_hosts)),
        *cmd,
    ]


def own_host_reason() -> str | None:
    """None when `unshare --uts --mount` can give a process its own hostname and /etc/hosts
    here (it needs root), else why not."""
    probe = own_host_command(
        "aat-probe", ("aat-peer",), ["sh", "-c", "hostname && getent hosts aat-peer"]
    )
    try:
        proc = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare --uts --mount cannot run: {exc}"
    if proc.returncode != 0 or not proc.stdout.startswith("aat-probe\n127.0.0.1"):
        return (
            "unshare --uts --mount cannot give a process its own hostname and /etc/hosts "
            f"here: {(proc.stderr or proc.stdout).strip()[:200]}"
        )
    return None


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            ppid = _ppid(int(entry.name))
            if ppid is not None:
                parents[int(entry.name)] = ppid
    found, frontier = set(), {root}
    while frontier:
        children = {p for p, pp in parents.items() if pp in frontier} - found
        found |= children
        frontier = children
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def rank_pids(root: int, lock: Path) -> tuple[int, list[int]]:
    """(rank 0, other ranks) of a sweep: the ranks are the launcher's spawned workers, and
    rank 0 is the one holding the run directory's lock open."""
    workers = []
    for pid in descendants(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            workers.append(pid)
    writer = [pid for pid in workers if holds(pid, lock)]
    assert len(writer) == 1, f"no single rank holds {lock}: workers {workers}"
    return writer[0], sorted(set(workers) - set(writer))


def holds(pid: int, path: Path) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:
            continue
    return False


def data_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


def wait_for_rows(
    proc: subprocess.Popen,
    results: Path,
    rows: int,
    timeout_s: float = 120,
    seen: set[int] | None = None,
) -> None:
    """Poll until `results` has `rows` data rows; record the sweep's processes in `seen`."""
    deadline = time.monotonic() + timeout_s
    while data_rows(results) < rows:
        if seen is not None:
            seen |= descendants(proc.pid)
        if proc.poll() is not None:
            raise AssertionError(
                f"sweep ended (rc {proc.returncode}) before {rows} rows: "
                f"{proc.stderr.read()[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no {rows} rows in {results} within {timeout_s} s")
        time.sleep(0.02)
    if seen is not None:
        seen |= descendants(proc.pid)


def shm_segments() -> set[str]:
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith(SHM_PREFIX)}
    except OSError:
        return set()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def point_keys(results: Path, with_round: bool = False) -> list[tuple]:
    """The point key of every row of results.csv (or, `with_round`, of rounds.csv: the key
    and the round)."""
    with open(results, newline="") as fh:
        return [
            (r["backend"], r["world_size"], r["dtype"], r["bytes"], r["mode"])
            + ((r["round"],) if with_round else ())
            for r in csv.DictReader(fh)
        ]


def stderr_lines(text: str) -> list[str]:
    """Our own lines: torch's launcher logs (W/I/E + date prefixes) and tracebacks it prints
    on our behalf are left out, and so are the sweep's noise warnings at its start (a loaded
    test machine gets "the machine is busy"), which are not the line a fault ends with."""
    return [
        line
        for line in text.splitlines()
        if line.startswith("bench") and not line.startswith("bench: warning:")
    ]


def whole_rows(results: Path) -> list[dict]:
    """The table's rows, each checked whole: the file ends with a line end, and every row has
    a value (maybe empty) for every column."""
    from bench.analysis.results import COLUMNS

    data = results.read_bytes()
    assert data.endswith(b"\n"), f"{results} ends inside a row: {data[-80:]!r}"
    with open(results, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        assert None not in row.values() and None not in row, f"line {line} is cut: {row}"
    return rows


def mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at `path` (made if missing); None, or why it cannot be done."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return f"`mount -t tmpfs` is not permitted here: {proc.stderr.strip()[:200]}"
    return None


def fill_disk(folder: Path) -> Path:
    """Write a file into `folder` until its file system is full; returns the file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler
