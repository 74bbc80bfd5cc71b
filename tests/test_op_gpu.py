"""The registered op on a GPU: nccl / pynccl at one rank, and the own IPC kernels with several
ranks on one GPU (start the MPS daemon first, docs/gpu.md). Eagerly, inside a captured CUDA
graph (decided once, at capture, by the graph rules; a replay does no host work: the
dispatcher's call count does not move) and under torch.compile(fullgraph=True).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python -m pytest -rs tests/test_op_gpu.py
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_tools import gloo_rank, read_reports, write_report

from bench.launch.launcher import free_port
from bench.run.hardware import fingerprint
from tuner.runtime import op
from tuner.runtime.dispatch import Dispatcher
from tuner.runtime.schema import Rule, Table, Thresholds

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
K, M = 1024, 1 << 20
EVIDENCE = {"run_id": "test", "points": 0, "regret_vs_oracle": 0.0, "gain_vs_nccl_geomean": None}


def _thresholds(world_size: int, eager: tuple, graph: tuple, max_size: dict) -> Thresholds:
    key = fingerprint("cuda")["hardware_key"]
    return Thresholds(
        tables=(
            Table(key, world_size, "bfloat16", "eager", eager, max_size, EVIDENCE),
            Table(key, world_size, "bfloat16", "graph", graph, max_size, EVIDENCE),
        )
    )


def _exercise(d: Dispatcher, rank: int, world: int, sizes: tuple[int, ...]) -> dict:
    """Eager calls and one captured graph per size: (backend, correct) each, and whether the
    replays ran the dispatcher."""
    out: dict = {"eager": [], "graph": []}
    total = sum(range(1, world + 1))
    for nbytes in sizes:
        x = torch.full((nbytes // 2,), float(rank + 1), dtype=torch.bfloat16, device="cuda")
        y = op.all_reduce(x)
        torch.cuda.synchronize()
        out["eager"].append(
            [nbytes, d.last_backend, bool((y == total).all()), bool((x == rank + 1).all())]
        )
    for nbytes in sizes:
        x = torch.full((nbytes // 2,), 1.0, dtype=torch.bfloat16, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            op.all_reduce(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = op.all_reduce(x) * 2
        chosen, calls = d.last_backend, sum(d.calls.values())
        ok = True
        for step in range(3):
            x.fill_(float(rank + 1 + step))
            graph.replay()
            torch.cuda.synchronize()
            ok &= bool((y == 2 * (total + world * step)).all())
        out["graph"].append([nbytes, chosen, ok, sum(d.calls.values()) == calls])
    return out


def _model(x: torch.Tensor) -> torch.Tensor:
    return op.all_reduce(x * 2) + 1


def test_op_one_rank_nccl_and_pynccl_eager_graph_and_compiled(tmp_path):
    rules = (Rule(8 * K, "pynccl"), Rule(None, "nccl"))
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    d = Dispatcher.from_thresholds(
        _thresholds(1, rules, (Rule(None, "nccl"),), {}), device="cuda:0", count_calls=True
    )
    try:
        with op.serving(d):
            report = _exercise(d, 0, 1, (4 * K, 1 * M))
            assert [e[1] for e in report["eager"]] == ["pynccl", "nccl"]
            assert all(e[2] and e[3] for e in report["eager"])
            # the graph table routes every size to nccl: decided at capture, from the graph rules
            assert [g[1] for g in report["graph"]] == ["nccl", "nccl"]
            assert all(g[2] and g[3] for g in report["graph"])
            from torch._dynamo import explain as dynamo_explain

            x = torch.ones(2048, dtype=torch.bfloat16, device="cuda")
            assert dynamo_explain(_model)(x).graph_break_count == 0
            torch.compiler.reset()
            compiled = torch.compile(_model, fullgraph=True)
            assert bool((compiled(x) == 3).all())
    finally:
        dist.destroy_process_group()


def _ipc_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.cuda.set_device(0)  # every rank on the one GPU, through CUDA IPC
    eager = (Rule(64 * K, "custom_one_shot"), Rule(None, "custom_two_shot"))
    graph = (Rule(None, "custom_one_shot"),)
    tables = _thresholds(world, eager, graph, {"custom_one_shot": 4 * M, "custom_two_shot": 4 * M})
    with gloo_rank(rank, world, port):
        with op.serving(Dispatcher.from_thresholds(tables, device="cuda:0", count_calls=True)) as d:
            report = _exercise(d, rank, world, (4 * K, 1 * M))
            report["notes"] = list(d.notes)
        write_report(out_dir, rank, report)


@pytest.mark.parametrize("world", [2, 4])
def test_op_own_ipc_kernels_several_ranks_on_one_gpu(world, tmp_path):
    mp.start_processes(
        _ipc_rank,
        args=(world, free_port("127.0.0.1"), str(tmp_path)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    for report in read_reports(tmp_path, world):
        assert [e[1] for e in report["eager"]] == ["custom_one_shot", "custom_two_shot"], report
        assert all(e[2] and e[3] for e in report["eager"]), report
        assert [g[1] for g in report["graph"]] == ["custom_one_shot", "custom_one_shot"], report
        assert all(g[2] and g[3] for g in report["graph"]), report
