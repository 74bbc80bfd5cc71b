"""custom_one_shot / custom_two_shot: what is checkable without a GPU (registration, probe
reasons, knob validation, the kernels' protocol under Triton's CPU interpreter with real rank
processes), and, on a CUDA machine, correctness with 2, 3, 4 and 8 ranks on the visible GPUs
(several ranks per GPU through CUDA IPC; start the MPS daemon so their kernels run at once)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.backends import CommContext, get_spec
from bench.backends.custom import KNOBS, CustomAllReduce, probe

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NAMES = ("custom_one_shot", "custom_two_shot")


def _ctx(device: str = "cuda:0", world_size: int = 2, **kw) -> CommContext:
    fields = {
        "rank": 0,
        "world_size": world_size,
        "local_rank": 0,
        "local_world_size": world_size,
        "nnodes": 1,
        "device": torch.device(device),
        "cpu_group": None,
        "same_host": True,
        "visible_gpus": 1,
    }
    fields.update(kw)
    return CommContext(**fields)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# -- no GPU needed ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_knobs(name):
    spec = get_spec(name)
    assert spec.device == "cuda" and spec.alignment == 16
    assert set(spec.dtypes) == {torch.float32, torch.bfloat16, torch.float16}
    assert set(spec.knobs) == {"blocks", "num_warps", "vec_bytes", "chunk"}
    assert spec.default_params() == {k: v[0] for k, v in KNOBS.items()}


@pytest.mark.parametrize(
    "ctx, words",
    [
        (_ctx("cpu"), "needs CUDA tensors"),
        (_ctx(world_size=1, local_world_size=1), "2..8"),
        (_ctx(world_size=9, local_world_size=9), "2..8"),
        (_ctx(nnodes=2, same_host=False, local_world_size=1), "span 2 hosts"),
        (_ctx(world_size=4, local_world_size=2), "not every rank is on this host"),
    ],
)
def test_probe_reasons(ctx, words):
    reason = probe(ctx)
    assert reason and words in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given without CUDA")
def test_probe_on_a_machine_without_cuda_gives_a_reason():
    reason = probe(_ctx())
    assert reason and ("Triton" in reason or "CUDA" in reason)


@pytest.mark.parametrize(
    "params, words",
    [
        ({"blocks": 7}, "blocks=7"),
        ({"num_warps": 3}, "num_warps=3"),
        ({"vec_bytes": 12}, "vec_bytes=12"),
        ({"warps": 8}, "no knob 'warps'"),
    ],
)
def test_knob_validation(params, words):
    for name in NAMES:
        reason = get_spec(name).check_params(params)
        assert reason and words in reason
    # the constructor refuses before touching a device (an unknown keyword is a TypeError)
    with pytest.raises(
        (ValueError, TypeError),
        match=words.split("=")[0].split("'")[-2] if "'" in words else words.split("=")[0],
    ):
        CustomAllReduce(_ctx(), 1 << 20, algorithm="one_shot", **params)


def test_constructor_refuses_bad_algorithm_and_spins():
    with pytest.raises(ValueError, match="algorithm"):
        CustomAllReduce(_ctx(), 1 << 20, algorithm="three_shot")
    with pytest.raises(ValueError, match="max_spins"):
        CustomAllReduce(_ctx(), 1 << 20, algorithm="two_shot", max_spins=0)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--inputs", "1,2"], "--inputs"),
        (["--inputs", "9"], "--inputs"),
        (["--dtype", "int8"], "--dtype"),
        (["--max-bytes", "12Q"], "--max-bytes"),
    ],
)
def test_bench_kernels_bad_input_exits_2(argv, flag, capsys):
    from bench.cli import main

    assert main(["kernels", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


def _interp(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "custom_interp_ranks.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_env(), "TRITON_INTERPRET": "1"},
    )


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (its CPU interpreter runs the kernels)")
def test_kernels_in_interpreter_three_ranks():
    """One process per rank over shared memory: 36 calls of both kernels, every dtype, partial
    tiles, more tiles than programs; epochs, double buffers and ownership all exercised."""
    proc = _interp("--world-size", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok ") == 3 * 36, proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (its CPU interpreter runs the kernels)")
def test_warm_up_without_waiting_keeps_the_epochs_in_step_in_interpreter():
    """The communicator's warm-up at creation (every variant launched with a spin budget of
    one read, ranks arriving at different times, then a CPU meeting): every check after it
    still sums exactly, so the epochs and flags ended in step on every rank."""
    proc = _interp("--world-size", "2", "--mode", "warmup")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok ") == 2 * 36, proc.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (its CPU interpreter runs the kernels)")
def test_kernel_barrier_timeout_names_the_peer_in_interpreter():
    proc = _interp("--world-size", "2", "--mode", "timeout")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "'peer': 1" in proc.stdout


# -- on a CUDA machine ----------------------------------------------------------------------


def _check(tmp_path, *args: str) -> dict:
    log_dir = Path(os.environ.get("BENCH_GPU_LOG_DIR", tmp_path))
    log_dir.mkdir(parents=True, exist_ok=True)
    out = log_dir / ("check-" + "-".join(a.strip("-") for a in args) + ".json")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "check_custom_allreduce.py"),
            *args,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env=_env(),
    )
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.gpu
@NEEDS_CUDA
def test_custom_allreduce_timeout_names_the_peer(tmp_path):
    summary = _check(tmp_path, "--world-size", "2", "--timeout-test")
    assert summary["failures"] == 0
    (row,) = [r for r in summary["rows"] if r["rank"] == 0]
    assert "peer 1" in row["message"] and "TimeoutError" not in row.get("error", "")


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_custom_allreduce_correct_on_this_gpu(world_size, tmp_path):
    """Every dtype, 1 KiB .. 64 MiB (odd counts too), eager and CUDA graph, back-to-back calls,
    two other knob settings; both algorithms."""
    summary = _check(tmp_path, "--world-size", str(world_size))
    assert summary["failures"] == 0
    rows = [r for r in summary["rows"] if r["rank"] == 0 and "dtype" in r]
    assert {r["dtype"] for r in rows} == {"bfloat16", "float16", "float32"}
    assert {r["mode"] for r in rows} >= {"eager", "graph", "eager-back-to-back"}
    assert {r["backend"] for r in rows} == set(NAMES)
    assert min(r["bytes"] for r in rows if isinstance(r["bytes"], int)) == 1024
    assert max(r["bytes"] for r in rows if isinstance(r["bytes"], int)) == 64 << 20
