"""The peer backends in real sweeps: `mpi` under `bench sweep --launcher mpirun`, `deepspeed_shm`
under the usual launcher, at 2 and 4 ranks, float32 and bfloat16, every row checked by the
sweep's own check; a hung peer still ends the sweep; nothing left in /dev/shm. Each test skips
with the reason (and the install line) where its peer is not installed here.

The DeepSpeed op is built once per machine (~90 s the first time) into TORCH_EXTENSIONS_DIR
(default ~/.cache/torch_extensions; .ci/run keeps it in .venv/torch_extensions), by the fixture
below, before any sweep starts: its --timeout need not cover the build.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.launch.mpirun import mpirun_reason
from bench.peers import APT_MPI, PIP_PEERS, installed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["-n", "5", "-w", "2", "--dtypes", "float32,bfloat16", "-q"]


def _mpi_reason() -> str | None:
    if not installed("mpi4py"):
        return f"mpi4py is not installed: {PIP_PEERS} and {APT_MPI}"
    return mpirun_reason()


def _deepspeed_reason() -> str | None:
    if not installed("deepspeed"):
        return f"deepspeed is not installed: DS_BUILD_OPS=0 {PIP_PEERS}"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx512bw" not in flags:
        return "DeepSpeed's shm kernels need avx512bw"
    return None


@pytest.fixture(scope="module")
def deepspeed_op():
    """The op built (or loaded) once, in this process, before the sweeps start."""
    reason = _deepspeed_reason()
    if reason:
        pytest.skip(reason)
    from bench.peers.deepspeed_shm import load_op

    start = time.monotonic()
    try:
        load_op()
    except Exception as exc:  # no compiler, no ninja: the backend would skip with this
        pytest.skip(f"the DeepSpeed op does not build here: {exc}")
    return time.monotonic() - start


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as fh:
        return list(csv.DictReader(fh))


def _ds_files() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if p.startswith("deepspeed_allreduce_buffer")}


def _check_rows(rows: list[dict], backend: str, count: int) -> None:
    mine = [r for r in rows if r["backend"] == backend]
    assert len(mine) == count, rows
    for row in mine:
        assert row["skipped_reason"] == "" and row["correct"] == "True", row
        assert float(row["latency_us"]) > 0


@pytest.mark.parametrize("ws", [2, 4])
def test_mpi_rows_correct_under_mpirun(ws, run_cli, tmp_path):
    reason = _mpi_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "run"
    # 256K: past 256 KiB Open MPI's coll/tuned switches to Rabenseifner (user op in pieces)
    proc = run_cli(
        "bench",
        "sweep",
        "--launcher",
        "mpirun",
        "--world-size",
        ws,
        "--backends",
        "mpi,shm_one_shot",
        "-b",
        "1K",
        "-e",
        "256K",
        "-f",
        "16",
        *SWEEP,
        "--out",
        out,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    _check_rows(rows, "mpi", 2 * 3)
    _check_rows(rows, "shm_one_shot", 2 * 3)  # the own backends run in mpirun's ranks too
    assert {r["world_size"] for r in rows} == {str(ws)}


def test_mpi_under_torchrun_is_a_skipped_row(run_cli, tmp_path):
    if not installed("mpi4py"):
        pytest.skip(f"mpi4py is not installed: {PIP_PEERS}")
    out = tmp_path / "run"
    proc = run_cli(
        "bench",
        "sweep",
        "--world-size",
        "2",
        "--backends",
        "mpi,gloo",
        "-e",
        "1K",
        "--dtypes",
        "float32",
        "-n",
        "3",
        "-q",
        "--out",
        out,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [r for r in _rows(out) if r["backend"] == "mpi"]
    assert "needs --launcher mpirun" in row["skipped_reason"], row
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("ws", [2, 4])
def test_deepspeed_shm_rows_correct(ws, deepspeed_op, run_cli, tmp_path):
    before = _ds_files()
    out = tmp_path / "run"
    # 4M: past 1 MiB the op reduce-scatters and all-gathers through its 32 MiB buffers
    proc = run_cli(
        "bench",
        "sweep",
        "--world-size",
        ws,
        "--backends",
        "deepspeed_shm,gloo",
        "-b",
        "1K",
        "-e",
        "4M",
        "-f",
        "64",
        *SWEEP,
        "--out",
        out,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_rows(_rows(out), "deepspeed_shm", 2 * 3)
    assert _ds_files() - before == set(), "the op's /dev/shm files were left behind"


def test_deepspeed_shm_refuses_what_it_would_not_reduce(deepspeed_op, run_cli, tmp_path):
    """float16 is reduced; what the op silently returns unreduced is refused by can_take (the
    sweep has no float64 dtype, so the gate is checked directly in one rank)."""
    script = tmp_path / "gate.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from bench.backends import get_spec\n"
        "from bench.run.context import make_context\n"
        "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
        "ctx = make_context(dist.group.WORLD, 'cpu', 30.0, run_tag='gate')\n"
        "b = get_spec('deepspeed_shm').create(ctx, 1 << 20)\n"
        "print(b.can_take(torch.ones(8, dtype=torch.float64)))\n"
        "print(b.can_take(torch.ones(8, 8).t()))\n"
        "print(b.can_take(torch.ones(8, dtype=torch.int32)))\n"
        "print(b.can_take(torch.ones(8, dtype=torch.float16)))\n"
        "dist.destroy_process_group()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "dtype float64 not supported" in lines[0]
    assert lines[1] == "tensor is not contiguous"
    assert "dtype int32 not supported" in lines[2]
    assert lines[3] == "None"


def _vader_segments() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if p.startswith("vader_segment")}


def _worker_pids(out: Path) -> list[int]:
    """The rank processes of the sweep writing `out` (their command line names it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd[1:3] == [b"-m", b"bench.run.worker"] and str(out).encode() in cmd:
            pids.append(int(entry.name))
    return sorted(pids)


def test_mpirun_sweep_ends_when_a_rank_stops(tmp_path):
    """A SIGSTOPped rank under mpirun: the other rank's watchdog names it and ends, mpirun
    ends the job, within --timeout plus slack; no rank process is left."""
    reason = _mpi_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "run"
    vader_before = _vader_segments()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.cli",
            "sweep",
            "--launcher",
            "mpirun",
            "--world-size",
            "2",
            "--backends",
            "mpi",
            "-b",
            "1K",
            "-e",
            "1M",
            "--dtypes",
            "float32",
            "-n",
            "40",
            "--timeout",
            "8",
            "--out",
            str(out),
            "-q",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            # rounds.csv grows from the first round on; results.csv only in the last round,
            # by which time the sweep may end before the stop lands
            table = out / "rounds.csv"
            if table.exists() and len(table.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before a rank could be stopped"
        pids = _worker_pids(out)
        assert len(pids) == 2, pids
        os.kill(pids[-1], signal.SIGSTOP)
        _, stderr = proc.communicate(timeout=180)  # a hang bound only, not a timing claim
        assert proc.returncode != 0
        assert "mpirun launch failed" in stderr, stderr[-2000:]
        assert _worker_pids(out) == []
        assert _vader_segments() == vader_before, "Open MPI's segments were left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _worker_pids(out):
            os.kill(pid, signal.SIGKILL)


DISPATCH = """
import json, os, sys, warnings
import torch, torch.distributed as dist
from bench.launch.mpirun import export_layout, mpi_layout
if mpi_layout() is not None:
    export_layout(mpi_layout())
dist.init_process_group("gloo")
from bench.run.session import collect_at_exit
collect_at_exit()
from bench.run.inputs import check_result, fill_input
from tuner.runtime.dispatch import Dispatcher
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    dispatcher = Dispatcher.from_file(sys.argv[1], count_calls=True)
wrong = []
for dtype in (torch.float32, torch.bfloat16):
    for seed, nbytes in enumerate((1024, 16384, 262144), start=1):
        t = fill_input(torch.empty(nbytes // torch.empty((), dtype=dtype).element_size(),
                                   dtype=dtype), dist.get_rank(), seed)
        if check_result(dispatcher.all_reduce(t), dist.get_rank(), dist.get_world_size(), seed):
            wrong.append((str(dtype), nbytes))
if dist.get_rank() == 0:
    print(json.dumps({"calls": dispatcher.calls, "wrong": wrong,
                      "notes": [str(w.message) for w in caught]}))
dispatcher.release()
dist.destroy_process_group()
"""


def _thresholds(path: Path) -> Path:
    """Rules as a peers run could fit them: mpi up to 4K, deepspeed_shm up to 64K, then the
    own two-shot, for this machine at 2 ranks."""
    from bench.run.hardware import fingerprint

    rules = [
        {"max_bytes": 4096, "algorithm": "mpi"},
        {"max_bytes": 65536, "algorithm": "deepspeed_shm"},
        {"max_bytes": None, "algorithm": "shm_two_shot"},
    ]
    tables = [
        {
            "hardware_key": fingerprint("cpu")["hardware_key"],
            "world_size": 2,
            "dtype": dtype,
            "mode": "eager",
            "rules": rules,
            "max_size": {"shm_two_shot": 1 << 20},
            "evidence": {
                "run_id": "test",
                "points": 0,
                "regret_vs_oracle": 0.0,
                "gain_vs_nccl_geomean": None,
            },
        }
        for dtype in ("float32", "bfloat16")
    ]
    import json

    path.write_text(
        json.dumps({"schema_version": 1, "generated_by": {"tool": "test"}, "tables": tables})
    )
    return path


def _dispatch(launch: list[str], tmp_path: Path) -> dict:
    import json

    script = tmp_path / "dispatch.py"
    script.write_text(DISPATCH)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1"}
    for key in ("RANK", "WORLD_SIZE"):
        env.pop(key, None)
    from bench.launch.launcher import free_port

    env["MASTER_PORT"] = str(free_port("127.0.0.1"))
    launch = [a.replace("PORT", env["MASTER_PORT"]) for a in launch]
    proc = subprocess.run(
        [*launch, str(script), str(_thresholds(tmp_path / "t.json"))],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dispatcher_routes_to_the_peers_under_mpirun(deepspeed_op, tmp_path):
    reason = _mpi_reason()
    if reason:
        pytest.skip(reason)
    mpirun = [
        "mpirun",
        "--oversubscribe",
        "--bind-to",
        "none",
        "-np",
        "2",
        "-x",
        "MASTER_ADDR",
        "-x",
        "MASTER_PORT",
        sys.executable,
    ]
    if os.geteuid() == 0:
        mpirun.insert(1, "--allow-run-as-root")
    out = _dispatch(mpirun, tmp_path)
    assert out["wrong"] == [] and not any("unavailable" in n for n in out["notes"]), out
    assert out["calls"] == {"mpi": 2, "deepspeed_shm": 2, "shm_two_shot": 2}, out


def test_dispatcher_without_mpirun_falls_through_and_says_so(deepspeed_op, tmp_path):
    out = _dispatch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "PORT",
        ],
        tmp_path,
    )
    assert out["wrong"] == [], out
    assert out["calls"] == {"deepspeed_shm": 4, "shm_two_shot": 2}, out
    assert any("mpi unavailable here" in n and "--launcher mpirun" in n for n in out["notes"])
