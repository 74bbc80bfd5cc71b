"""shm_one_shot / shm_two_shot in real processes: sums, races, timeouts, no segment left behind.

Ranks are spawned processes joined through a gloo FileStore (no port is opened). Each rank runs a
scenario and writes what it saw to rank<r>.json; the test reads those.
"""

from __future__ import annotations

import csv
import datetime
import glob
import json
import multiprocessing
import os
import signal
import time
import traceback
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bench.backends import CommContext, get_spec
from bench.backends.shm_segment import NAME_PREFIX, SHM_DIR, Segment, supported_isa
from bench.run.inputs import check_result, fill_input
from bench.run.session import collect_at_exit

pytestmark = pytest.mark.skipif(
    not supported_isa() or not os.path.isdir(SHM_DIR),
    reason="shm backends need x86-64 and /dev/shm",
)

BACKENDS = ("shm_one_shot", "shm_two_shot")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _segments(tag: str) -> list[str]:
    return glob.glob(os.path.join(SHM_DIR, f"{NAME_PREFIX}{tag}*"))


# -- scenarios, run inside each rank ------------------------------------------------------


def _sums(ctx: CommContext) -> dict:
    """Every dtype, sizes not a multiple of the world size, pieces smaller than the message,
    many back-to-back calls with new data and with ranks skewed in turn."""
    wrong: list[str] = []
    calls = 0
    rank, ws = ctx.rank, ctx.world_size
    for name in BACKENDS:
        for chunk_bytes in (4096, 1 << 20):
            backend = get_spec(name).create(ctx, 1 << 20, chunk_bytes=chunk_bytes)
            for dtype in DTYPES:
                for shape in ((1,), (3,), (ws * 250 + 1,), (4099,), (7, 1001), (100_003,)):
                    tensor = torch.empty(shape, dtype=dtype)
                    for call in range(8):
                        seed = 1 + call + 13 * shape[-1]
                        fill_input(tensor, rank, seed)
                        if (call + rank) % 4 == 0:
                            time.sleep(0.001)  # a slow rank, a different one each time
                        out = backend.all_reduce(tensor)
                        calls += 1
                        err = check_result(out, rank, ws, seed)
                        if out is not tensor or err != 0.0:
                            wrong.append(
                                f"{name} chunk={chunk_bytes} {dtype} {shape} call {call}: err {err}"
                            )
            # non-integer data: every rank must get the same bits (sum in rank order)
            gen = torch.Generator().manual_seed(100 + rank)
            x = torch.randn(30_001, generator=gen)
            if not _same_bits_everywhere(backend, x, ws):
                wrong.append(f"{name} chunk={chunk_bytes}: ranks got different bits")
            backend.release()
            backend.release()  # idempotent
    return {"wrong": wrong, "calls": calls, "left": _segments(ctx.run_tag)}


def _same_bits_everywhere(backend, x: torch.Tensor, ws: int) -> bool:
    """Reduce non-integer `x` in place; every rank must hold the same bits (sum in rank
    order)."""
    backend.all_reduce(x)
    gathered = [torch.empty_like(x) for _ in range(ws)]
    dist.all_gather(gathered, x)
    return all(torch.equal(gathered[0], g) for g in gathered)


def _timeout(ctx: CommContext) -> dict:
    """Rank 1 builds the backend but never calls all_reduce."""
    out: dict = {}
    backend = get_spec("shm_two_shot").create(ctx, 4096)
    if ctx.rank == 0:
        start = time.monotonic()
        try:
            backend.all_reduce(torch.ones(1024))
            out["error"] = None
        except TimeoutError as exc:
            out["error"] = str(exc)
        out["waited_s"] = time.monotonic() - start
        try:
            backend.all_reduce(torch.ones(1024))
        except RuntimeError as exc:
            out["after"] = str(exc)
    dist.barrier()
    backend.release()
    out["left"] = _segments(ctx.run_tag)
    return out


def _killed(ctx: CommContext) -> dict:
    """Rank 1 is SIGKILLed once both segments exist; rank 0 sees none in /dev/shm."""
    backends = [get_spec(name).create(ctx, 1 << 16) for name in BACKENDS]
    for backend in backends:
        backend.all_reduce(torch.ones(100))
    dist.barrier()
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    out: dict = {"left_while_mapped": _segments(ctx.run_tag)}
    try:
        backends[0].all_reduce(torch.ones(100))
    except TimeoutError as exc:
        out["error"] = str(exc)
    for backend in backends:
        backend.release()
    return out


def _paths(ctx: CommContext) -> dict:
    """The C short path (native=1), the Python one (native=0), and both taking turns on one
    segment (messages up to 256 KiB go through C, larger ones through Python): every sum
    exact, every rank the same bits."""
    wrong: list[str] = []
    rank, ws = ctx.rank, ctx.world_size
    for native in (1, 0):
        backend = get_spec("shm_one_shot").create(ctx, 1 << 20, native=native)
        for call, count in enumerate((1, 257, 4096, 70_000, 3, 65_537, 100_000, 2)):
            for dtype in DTYPES:
                tensor = fill_input(torch.empty(count, dtype=dtype), rank, seed=call + 1)
                err = check_result(backend.all_reduce(tensor), rank, ws, call + 1)
                if err != 0.0:
                    wrong.append(f"native={native} {dtype} count {count}: err {err}")
                x = torch.randn(count, generator=torch.Generator().manual_seed(rank)).to(dtype)
                if not _same_bits_everywhere(backend, x, ws):
                    wrong.append(f"native={native} {dtype} count {count}: bits differ")
        backend.release()
    return {"wrong": wrong, "left": _segments(ctx.run_tag)}


SCENARIOS = {"sums": _sums, "timeout": _timeout, "killed": _killed, "paths": _paths}


def _rank_main(rank: int, ws: int, scenario: str, tmp: str, tag: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{tmp}/store",
            rank=rank,
            world_size=ws,
            timeout=datetime.timedelta(seconds=60),
        )
        collect_at_exit()  # no gloo group left to finalization (SIGABRT)
        ctx = CommContext(
            rank=rank,
            world_size=ws,
            local_rank=rank,
            local_world_size=ws,
            nnodes=1,
            device=torch.device("cpu"),
            cpu_group=dist.group.WORLD,
            timeout_s=timeout_s,
            run_tag=tag,
        )
        result = SCENARIOS[scenario](ctx)
    except BaseException:
        result = {"exception": traceback.format_exc()}
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # no teardown handshake: in "killed" the peer is gone


def _spawn(
    ws: int, scenario: str, tmp_path: Path, timeout_s: float = 30.0, join_s: float = 120.0
) -> tuple[list[dict | None], list[int | None], str]:
    tag = f"t{uuid.uuid4().hex[:8]}"
    spawn = multiprocessing.get_context("spawn")
    procs = [
        spawn.Process(target=_rank_main, args=(r, ws, scenario, str(tmp_path), tag, timeout_s))
        for r in range(ws)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + join_s
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    results = []
    for r in range(ws):
        path = tmp_path / f"rank{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return results, [p.exitcode for p in procs], tag


# -- tests --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_sums_every_dtype_back_to_back(ws, tmp_path):
    results, codes, tag = _spawn(ws, "sums", tmp_path)
    assert codes == [0] * ws
    for rank, res in enumerate(results):
        assert res is not None and "exception" not in res, res
        assert res["wrong"] == [], f"rank {rank}: {res['wrong'][:5]}"
        assert res["calls"] == 2 * 2 * 3 * 6 * 8
        assert res["left"] == []
    assert _segments(tag) == []


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 3])
def test_native_and_python_paths_take_turns(ws, tmp_path):
    from bench.backends import shm_native

    lib, reason = shm_native.load()
    if lib is None:
        pytest.skip(f"the C short path does not build here: {reason}")
    results, codes, tag = _spawn(ws, "paths", tmp_path)
    assert codes == [0] * ws
    for rank, res in enumerate(results):
        assert res is not None and "exception" not in res, res
        assert res["wrong"] == [], f"rank {rank}: {res['wrong'][:5]}"
        assert res["left"] == []


@pytest.mark.slow
def test_timeout_names_the_missing_rank_and_epoch(tmp_path):
    results, codes, tag = _spawn(2, "timeout", tmp_path, timeout_s=1.0)
    assert codes == [0, 0]
    res = results[0]
    assert res is not None and "exception" not in res, res
    assert "rank 1's flag" in res["error"] and "epoch 1" in res["error"], res["error"]
    assert res["waited_s"] > 0.9  # it waited its timeout; no upper bound beyond the hang's
    assert "unusable after a timeout" in res["after"]
    assert _segments(tag) == []


@pytest.mark.slow
def test_nothing_left_in_dev_shm_after_sigkill(tmp_path):
    results, codes, tag = _spawn(2, "killed", tmp_path, timeout_s=1.0)
    assert codes[1] == -signal.SIGKILL
    res = results[0]
    assert res is not None and "exception" not in res, res
    assert res["left_while_mapped"] == []
    assert "rank 1's flag" in res["error"]
    assert _segments(tag) == []


def test_segment_is_private_to_the_user():
    """The segment's file is created 0600; its name is unlinked as soon as every rank has
    attached, so the mode is read through this process's own mapping of it."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        segment = Segment.open(dist.group.WORLD, 0, 1, 8192, label=f"mode-{uuid.uuid4().hex[:8]}")
        try:
            (span,) = [
                line.split()[0]
                for line in Path("/proc/self/maps").read_text().splitlines()
                if segment.name[1:] in line
            ]
            mode = os.stat(f"/proc/self/map_files/{span}").st_mode & 0o777
        finally:
            segment.close()
    finally:
        dist.destroy_process_group()
    assert mode == 0o600


def test_probe_reasons():
    spec = get_spec("shm_one_shot")
    ctx = CommContext(
        rank=0,
        world_size=2,
        local_rank=0,
        local_world_size=1,
        nnodes=2,
        device=torch.device("cpu"),
        cpu_group=None,
        same_host=False,
    )
    assert spec.probe(ctx) == "ranks span 2 hosts; shared memory needs one host"
    ctx.same_host, ctx.nnodes = True, 1
    assert spec.probe(ctx) is None
    ctx.device = torch.device("cuda", 0)
    assert "CPU tensors only" in spec.probe(ctx)


@pytest.mark.slow
def test_sweep_end_to_end_four_ranks(run_cli, tmp_path):
    out = tmp_path / "run"
    before = set(glob.glob(os.path.join(SHM_DIR, f"{NAME_PREFIX}*")))
    proc = run_cli(
        "bench",
        "sweep",
        "--world-size",
        "4",
        "--backends",
        ",".join(BACKENDS),
        "-b",
        "1K",
        "-e",
        "256K",
        "-f",
        "16",
        "--dtypes",
        "float32,bfloat16,float16",
        "-n",
        "5",
        "-w",
        "2",
        "--out",
        out,
        "-q",
        "--param",
        "shm_two_shot.chunk_bytes=262144",
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 3 * 3
    for row in rows:
        assert row["skipped_reason"] == "" and row["correct"] == "True", row
        assert row["world_size"] == "4" and float(row["latency_us"]) > 0
    after = set(glob.glob(os.path.join(SHM_DIR, f"{NAME_PREFIX}*")))
    assert after - before == set()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("world_size", [3, 5, 8])
def test_the_c_sum_is_the_reference_arithmetic(dtype, world_size):
    """aat_sum (the exact sums of the Python paths' pieces): random floats of mixed magnitude
    from every rank, summed in rank order with float32 accumulation and one rounding, gives the
    reference's bits exactly (NaN-free inputs), partial blocks included (1,000 elements)."""
    from bench.backends import shm_native
    from bench.run.numerics import random_input, reference

    lib, reason = shm_native.load()
    if lib is None:
        pytest.skip(f"the C library does not build here: {reason}")
    if dtype == torch.float16 and not lib.aat_has_float16():
        pytest.skip("this compiler has no _Float16")
    import ctypes

    count = 1000
    terms = [random_input(dtype, count, rank) for rank in range(world_size)]
    out = torch.empty(count, dtype=dtype)
    assert shm_native.ExactSum(lib)(out, terms)  # the call the shm backends make
    _, expected = reference(dtype, count, world_size)
    assert torch.equal(
        out.view(torch.int16 if dtype != torch.float32 else torch.int32),
        expected.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )
    # a dtype code it does not know is refused, nothing written
    pointers = (ctypes.c_void_p * world_size)(*(t.data_ptr() for t in terms))
    assert (
        lib.aat_sum(
            ctypes.c_void_p(out.data_ptr()),
            pointers,
            ctypes.c_int32(world_size),
            ctypes.c_int64(count),
            ctypes.c_int32(7),
        )
        == shm_native.DTYPE
    )
