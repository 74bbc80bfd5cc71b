"""The vLLM plugin on a GPU node, through vLLM's own tensor-parallel group (needs vLLM installed
with a torch it was built for; not runnable on CPU).

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    torchrun --nproc-per-node 2 scripts/gpu_check_vllm_plugin.py thresholds.json > check.jsonl

Each rank sets ALLREDUCE_AUTOTUNE_THRESHOLDS, runs vLLM's plugin loader (this project's
register()), and builds vLLM's distributed state with every rank in one TP group: vLLM's
CudaCommunicator is built with the plugin's agreement, sizing and routes. Then, for sizes at
and just past each rule bound of the table's (dtype, mode) rules, eagerly and inside vLLM's
graph_capture + a CUDA graph, the sum through get_tp_group().all_reduce is checked. Rank 0
prints one JSON line per call: the path the table names, whether its communicator took the
call (else vLLM's own order ran) and whether the sum was right; and the buffer sizes vLLM built.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def _sizes(routes, dtype: torch.dtype, mode: str) -> list[int]:
    route = routes.by_key[(dtype, mode)]
    item = torch.empty((), dtype=dtype).element_size()
    edges = [1024] + [b for bound in route.bounds for b in (bound, bound + 16)]
    return sorted({max(item, e - e % 16) for e in edges})


def _check(tp, routes, dtype: torch.dtype, mode: str, nbytes: int) -> dict:
    from bench.vllm.paths import accepts

    rank, world = tp.rank_in_group, tp.world_size
    x = torch.full(
        (nbytes // torch.empty((), dtype=dtype).element_size(),),
        float(rank + 1),
        dtype=dtype,
        device="cuda",
    )
    path = routes.choose(nbytes, dtype, mode)
    took = bool(path and accepts(path, tp.device_communicator, x))
    if mode == "eager":
        y = tp.all_reduce(x)
    else:
        with tp.graph_capture() as context:
            tp.all_reduce(x)  # vLLM's warm-up inside graph_capture, as its model runner does
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=context.stream):
                y = tp.all_reduce(x)
        graph.replay()
    torch.cuda.synchronize()
    want = world * (world + 1) / 2
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "mode": mode,
        "bytes": nbytes,
        "path": path.name if path else None,
        "took": took,
        "sum_ok": bool((y.float() == want).all()),
    }


def main(path: str) -> None:
    os.environ["ALLREDUCE_AUTOTUNE_THRESHOLDS"] = path
    import vllm.plugins
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    from tuner.engines.vllm_comm import ROUTES_ATTRIBUTE

    vllm.plugins.load_general_plugins()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    with set_current_vllm_config(VllmConfig()):
        ps.init_distributed_environment(world, rank, "env://", local, "nccl")
        ps.ensure_model_parallel_initialized(world, 1)
        tp = ps.get_tp_group()
        comm = tp.device_communicator
        routes = getattr(comm, ROUTES_ATTRIBUTE)
        if routes is None:
            raise SystemExit("the plugin attached no routes (see its log line above)")
        rows = [
            _check(tp, routes, dtype, mode, nbytes)
            for dtype, mode in routes.by_key
            for nbytes in _sizes(routes, dtype, mode)
        ]
    built = {
        name: getattr(getattr(comm, name, None), "max_size", None)
        for name in ("ca_comm", "symm_mem_comm")
    }
    if rank == 0:
        print(json.dumps({"max_size": built}))
        for row in rows:
            print(json.dumps(row))
    if not all(row["sum_ok"] for row in rows):
        raise SystemExit(f"rank {rank}: wrong sums: {[r for r in rows if not r['sum_ok']]}")


if __name__ == "__main__":
    main(sys.argv[1])
