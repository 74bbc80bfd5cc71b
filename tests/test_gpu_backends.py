"""GPU backends (nccl, pynccl, pynccl_symm, symm_mem_*): their reasons everywhere, their
sums and CUDA-graph capture on a GPU.

On a machine without CUDA the `gpu` tests skip with the reason and the rest check what needs
no GPU: registration, probe reasons, the libnccl load error, the ncclConfig_t layout, and that a
CPU sweep records the GPU backends as skipped rows. On a GPU node (docs/gpu.md):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python -m pytest -rs tests/test_gpu_backends.py
"""

from __future__ import annotations

import csv
import ctypes
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bench import backends as registry
from bench.backends import libnccl
from bench.backends.base import CommContext, WritesElsewhere

GPU_NAMES = (
    "nccl",
    "pynccl",
    "pynccl_symm",
    "symm_mem_one_shot",
    "symm_mem_two_shot",
    "symm_mem_multimem",
)
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _ctx(device: str, world_size: int = 1, visible_gpus: int = 0, group=None) -> CommContext:
    return CommContext(
        rank=0,
        world_size=world_size,
        local_rank=0,
        local_world_size=world_size,
        nnodes=1,
        device=torch.device(device),
        cpu_group=group,
        visible_gpus=visible_gpus,
    )


def _read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# -- what runs without a GPU -------------------------------------------------------------------


def test_gpu_backends_register_on_any_machine():
    for name in GPU_NAMES:
        spec = registry.get_spec(name)
        assert spec.device == "cuda"
        assert spec.check_params(spec.default_params()) is None
    assert "nccl" not in registry.family_errors()


@pytest.mark.parametrize("name", GPU_NAMES)
def test_probe_on_a_cpu_context_names_the_device(name):
    reason = registry.get_spec(name).probe(_ctx("cpu"))
    assert reason and "CUDA device" in reason and "cpu" in reason


@pytest.mark.parametrize("name", [n for n in GPU_NAMES if n != "symm_mem_multimem"])
def test_probe_refuses_ranks_sharing_a_gpu(name):
    reason = registry.get_spec(name).probe(_ctx("cuda:0", world_size=4, visible_gpus=1))
    assert reason and "needs one GPU per rank: 4 ranks on 1 visible GPUs" in reason


def test_multimem_skips_when_multicast_is_disabled(monkeypatch):
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    reason = registry.get_spec("symm_mem_multimem").probe(_ctx("cuda:0", 2, visible_gpus=2))
    assert reason and reason.startswith("no NVLink multicast")


def test_libnccl_override_that_is_missing_names_path_and_platform(monkeypatch, tmp_path):
    missing = tmp_path / "libnccl.so.2"
    monkeypatch.setenv(libnccl.ENV_PATH, str(missing))
    assert libnccl.candidate_paths() == [str(missing)]
    with pytest.raises(libnccl.NcclLoadError) as err:
        libnccl.load_library()
    text = str(err.value)
    assert str(missing) in text and "missing" in text
    assert f"platform {sys.platform}" in text
    if not torch.cuda.is_available():
        assert "expected" in text and "no NVIDIA GPU" in text
    else:
        assert "unexpected" in text and libnccl.ENV_PATH in text


def test_libnccl_override_that_is_not_a_library(monkeypatch, tmp_path):
    junk = tmp_path / "libnccl.so.2"
    junk.write_bytes(b"not an ELF file")
    monkeypatch.setenv(libnccl.ENV_PATH, str(junk))
    with pytest.raises(libnccl.NcclLoadError, match="cannot load libnccl: tried .*libnccl.so.2"):
        libnccl.load_library()
    reason = registry.get_spec("pynccl").probe(_ctx("cuda:0", visible_gpus=1))
    assert reason  # no CUDA here, or the junk library: either way a reason, never a crash


def test_libnccl_search_order(monkeypatch):
    monkeypatch.delenv(libnccl.ENV_PATH, raising=False)
    paths = libnccl.candidate_paths()
    wheel = [i for i, p in enumerate(paths) if p.endswith("nvidia/nccl/lib/libnccl.so.2")]
    assert wheel and paths[-1].startswith(("libnccl", "/")) and wheel[0] < len(paths) - 1


def test_nccl_config_prefix_matches_nccl_h():
    """size_t size; unsigned magic, version; int blocking, cgaClusterSize, minCTAs, maxCTAs;
    const char* netName (nccl.h, unchanged since 2.17)."""
    config = libnccl.NcclConfig
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        pytest.skip("layout checked for 64-bit platforms")
    assert [
        getattr(config, f).offset
        for f in ("magic", "version", "blocking", "minCTAs", "maxCTAs", "netName")
    ] == [8, 12, 16, 24, 28, 32]
    assert ctypes.sizeof(config) == 40
    assert ctypes.sizeof(libnccl.NcclUniqueId) == 128


def test_cpu_sweep_records_gpu_backends_as_skipped(run_cli, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "bench",
        "sweep",
        "--device",
        "cpu",
        "--world-size",
        "1",
        "--backends",
        ",".join(GPU_NAMES),
        "-b",
        "1K",
        "-e",
        "1K",
        "--dtypes",
        "float32",
        "--out",
        out,
        "-q",
        env=NO_MULTICAST,
        timeout=120,
    )
    # nothing measured: every row says why, and the sweep says so and exits 1 (issue 20)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "no point was measured" in proc.stderr
    rows = _read_rows(out)
    assert sorted(r["backend"] for r in rows) == sorted(GPU_NAMES)
    assert all(r["skipped_reason"] and not r["latency_us"] for r in rows)


# -- on a GPU ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_ctx(tmp_path_factory):
    """One rank's gloo world (what the sweep worker has) and its CommContext on cuda:0."""
    for key, value in NO_MULTICAST.items():
        os.environ.setdefault(key, value)
    owns_group = not dist.is_initialized()
    if owns_group:
        store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    torch.cuda.set_device(0)
    yield _ctx("cuda:0", 1, visible_gpus=torch.cuda.device_count(), group=dist.group.WORLD)
    torch.cuda.synchronize()
    if owns_group:
        dist.destroy_process_group()


def _create(name: str, ctx: CommContext, max_bytes: int = 1 << 20, **params):
    spec = registry.get_spec(name)
    reason = spec.probe(ctx)
    if reason:
        return None, reason
    return spec.create(ctx, max_bytes, **params), None


def _check_sum(backend, ctx: CommContext, count: int = 4096) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.arange(count, device=ctx.device) % 7 - 3).to(dtype)
        ref = x.clone() * ctx.world_size
        assert backend.can_take(x) is None
        if isinstance(backend, WritesElsewhere):  # the optional out-of-place verb
            kept, into = x.clone(), torch.full_like(x, 99)
            assert backend.all_reduce_into(x, into) is into
            torch.cuda.synchronize()
            assert torch.equal(into, ref) and torch.equal(x, kept), backend.name
        out = backend.all_reduce(x)
        torch.cuda.synchronize()
        assert torch.equal(out, ref), backend.name


def _graph_sum(backend, ctx: CommContext, calls: int = 3) -> None:
    """Captured in one CUDA graph, replayed on fresh inputs: the sum is right (in place)."""
    from bench.run.timing import capture_graph

    x = torch.ones(8192, dtype=torch.bfloat16, device=ctx.device)
    replay, _graph = capture_graph(lambda: backend.all_reduce(x), calls=calls)
    x.fill_(2.0)
    replay()
    torch.cuda.synchronize()
    assert torch.equal(x, torch.full_like(x, 2.0 * ctx.world_size**calls))


def _sums_then_release(backend, ctx: CommContext) -> None:
    """Eager and captured sums right, then the backend released (also when they are not)."""
    try:
        _check_sum(backend, ctx)
        _graph_sum(backend, ctx)
    finally:
        backend.release()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("params", [{}, {"ctas": 4}])
def test_nccl_world_size_1_eager_and_graph(gpu_ctx, params):
    backend, reason = _create("nccl", gpu_ctx, **params)
    assert reason is None, reason
    _sums_then_release(backend, gpu_ctx)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("params", [{}, {"ctas": 2, "algo": "ring", "proto": "simple"}])
def test_pynccl_world_size_1_eager_and_graph(gpu_ctx, params):
    backend, reason = _create("pynccl", gpu_ctx, **params)
    assert reason is None, reason
    try:
        print(f"pynccl: {backend.lib.path} NCCL {backend.lib.version}")
        _check_sum(backend, gpu_ctx)
        _graph_sum(backend, gpu_ctx)
    finally:
        backend.release()
    backend.release()  # idempotent


@pytest.mark.gpu
@needs_cuda
def test_pynccl_runs_inside_a_cuda_graph(gpu_ctx):
    """Out of place, so a call that did not run would leave `out` at zero: the captured graph
    itself moves the data, on replay, with new inputs."""
    backend, reason = _create("pynccl", gpu_ctx)
    assert reason is None, reason
    try:
        x = torch.zeros(1 << 16, dtype=torch.float32, device=gpu_ctx.device)
        out = torch.zeros_like(x)
        graph = torch.cuda.CUDAGraph()
        backend.all_reduce_into(x, out)  # warm-up outside capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            backend.all_reduce_into(x, out)
        for value in (3.0, -5.0):
            x.fill_(value)
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, torch.full_like(x, value * gpu_ctx.world_size))
    finally:
        backend.release()


@pytest.mark.gpu
@needs_cuda
def test_pynccl_refuses_tensors_of_another_device(gpu_ctx):
    backend, reason = _create("pynccl", gpu_ctx)
    assert reason is None, reason
    try:
        # the gate is the only check (all_reduce's precondition, taken once per call by the
        # dispatcher and the sweep): it must refuse what NCCL must never be handed
        host = torch.ones(16)
        assert "cpu" in backend.can_take(host)
        if torch.cuda.device_count() > 1:
            other = torch.ones(16, device="cuda:1")
            assert "communicator on cuda:0" in backend.can_take(other)
        assert "not supported" in backend.can_take(
            torch.ones(4, dtype=torch.int16, device=gpu_ctx.device)
        )
    finally:
        backend.release()


@pytest.mark.gpu
@needs_cuda
def test_pynccl_symm_runs_or_gives_the_reason(gpu_ctx):
    lib = libnccl.load_library()
    backend, reason = _create("pynccl_symm", gpu_ctx)
    if lib.version_code < libnccl.SYMMETRIC_MIN_VERSION:
        assert reason and "needs >= 2.27" in reason
        return
    assert reason is None, reason  # 2.27+: the probe passes; creation may still refuse
    try:
        _check_sum(backend, gpu_ctx)
        _graph_sum(backend, gpu_ctx)
        assert "exceeds" in backend.can_take(torch.ones(1 << 19, device=gpu_ctx.device))
    finally:
        backend.release()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["symm_mem_one_shot", "symm_mem_two_shot"])
def test_symm_mem_runs_or_gives_the_reason(gpu_ctx, name):
    try:
        backend, reason = _create(name, gpu_ctx)
    except Exception as exc:  # what the sweep would record as "create failed: ..."
        pytest.skip(f"{name} refused this group: {type(exc).__name__}: {exc}"[:300])
    if reason:
        pytest.skip(f"{name}: {reason}")
    _sums_then_release(backend, gpu_ctx)


@pytest.mark.gpu
@needs_cuda
def test_symm_mem_multimem_skips_without_multicast(gpu_ctx, monkeypatch):
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    backend, reason = _create("symm_mem_multimem", gpu_ctx)
    assert backend is None and reason.startswith("no NVLink multicast")


@pytest.mark.gpu
@needs_cuda
def test_fingerprint_names_the_gpu():
    from bench.run.hardware import fingerprint

    fp = fingerprint("cuda")
    gpu = fp["gpu"]
    assert "error" not in gpu, gpu
    assert gpu["gpus"][0]["name"] and gpu["gpus"][0]["memory_gib"] > 0
    assert gpu["gpus"][0]["compute_capability"][0].isdigit()
    assert len(gpu["p2p"]) == len(gpu["gpus"])
    count = torch.cuda.device_count()
    assert fp["hardware_key"].split("-x")[-1].startswith(f"{count}-")
    print(fp["hardware_key"], gpu["gpus"][0], fp["versions"])


@pytest.mark.gpu
@needs_cuda
def test_cuda_sweep_world_size_1(run_cli, tmp_path):
    out = tmp_path / "run"
    names = GPU_NAMES + ("custom_one_shot",)
    proc = run_cli(
        "bench",
        "sweep",
        "--device",
        "cuda",
        "--world-size",
        "1",
        "--backends",
        ",".join(names),
        "-b",
        "4K",
        "-e",
        "1M",
        "-f",
        "16",
        "--iters",
        "5",
        "--warmup",
        "2",
        "--timeout",
        "60",
        "--out",
        out,
        "-q",
        env=NO_MULTICAST,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _read_rows(out)
    assert {r["backend"] for r in rows} == set(names)
    for name in ("nccl", "pynccl"):
        for mode in ("eager", "graph"):
            measured = [r for r in rows if r["backend"] == name and r["mode"] == mode]
            assert measured and all(r["latency_us"] and r["correct"] == "True" for r in measured), (
                name,
                mode,
                measured[:1],
            )
    multimem = [r for r in rows if r["backend"] == "symm_mem_multimem"]
    assert all(r["skipped_reason"].startswith("no NVLink multicast") for r in multimem)
    for row in rows:  # every row is either a correct measurement or a reason
        assert (row["latency_us"] and row["correct"] == "True") or row["skipped_reason"], row
