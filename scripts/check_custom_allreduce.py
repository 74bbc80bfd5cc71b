"""Correctness of custom_one_shot / custom_two_shot with N ranks, every rank a process on this
host's GPUs (rank r on GPU r % visible: several ranks share a GPU through CUDA IPC when there
are fewer GPUs than ranks). Writes a JSON summary; exit code 1 on any wrong sum.

    python scripts/check_custom_allreduce.py --world-size 4 --out /tmp/check-ws4.json
    python scripts/check_custom_allreduce.py --world-size 2 --timeout-test

Checks, for each backend, dtype and size (1 KiB .. 64 MiB, odd element counts included):
eager calls, and a call captured in a CUDA graph replayed twice on fresh inputs; then 24
back-to-back calls on different tensors with no synchronisation between them (epochs, double
buffers); and two other knob settings. `--timeout-test`: rank 1 stays away, rank 0's barrier
must end and raise TimeoutError naming peer 1. Run under the MPS daemon for concurrent ranks
on one GPU (the JSON records whether CUDA_MPS_PIPE_DIRECTORY was set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SIZES = (1024, 1040, 4096, 65536 + 48, 1 << 20, (1 << 20) + 16, 16 << 20, 64 << 20)
DTYPES = ("bfloat16", "float16", "float32")
# other knob settings, checked at a few sizes in the first dtype (the first value of every knob is the default)
VARIANTS = (
    {"blocks": 8, "num_warps": 4, "vec_bytes": 8, "chunk": 1},
    {"blocks": 64, "num_warps": 8, "vec_bytes": 32, "chunk": 4},
)
VARIANT_SIZES = (1040, 65536 + 48, 4 << 20)
# a lost peer ends a barrier in ~1-3 s instead of the default's tens of seconds
SPINS = 2_000_000


def _context(rank: int, world: int):
    import torch
    import torch.distributed as dist

    from bench.backends import CommContext

    visible = torch.cuda.device_count()
    device = torch.device("cuda", rank % visible)
    torch.cuda.set_device(device)
    return CommContext(
        rank=rank,
        world_size=world,
        local_rank=rank,
        local_world_size=world,
        nnodes=1,
        device=device,
        cpu_group=dist.group.WORLD,
        timeout_s=120,
        run_tag="check",
        same_host=True,
        visible_gpus=visible,
    )


def _meet() -> None:
    """Finish this rank's GPU work and meet the others on the CPU before the next call, as
    the sweep worker does between points: a rank still busy on the host (first use of a
    kernel loads its module) must not be owed a barrier by peers already spinning on a GPU
    they share with it."""
    import torch
    import torch.distributed as dist

    torch.cuda.synchronize()
    dist.barrier()


def _check_point(backend, dtype, nbytes: int, mode: str, seed: int, ctx) -> dict:
    import torch

    from bench.run.inputs import check_result, fill_input
    from bench.run.timing import capture_graph

    count = nbytes // torch.empty((), dtype=dtype).element_size()
    tensor = torch.empty(count, dtype=dtype, device=ctx.device)
    errors = []
    if mode == "eager":
        for k in range(2):
            fill_input(tensor, ctx.rank, seed + k)
            _meet()
            result = backend.all_reduce(tensor)
            torch.cuda.synchronize()
            errors.append(check_result(result, ctx.rank, ctx.world_size, seed + k))
    else:
        fill_input(tensor, ctx.rank, seed)
        _meet()
        replay, _graph = capture_graph(lambda: backend.all_reduce(tensor), calls=1)
        for k in range(2):
            fill_input(tensor, ctx.rank, seed + k)
            _meet()
            replay()
            torch.cuda.synchronize()
            errors.append(check_result(tensor, ctx.rank, ctx.world_size, seed + k))
    return {"bytes": nbytes, "mode": mode, "max_abs_err": max(errors)}


def _back_to_back(backend, dtype, ctx, seed: int) -> dict:
    import torch

    from bench.run.inputs import check_result, fill_input

    sizes = [(4096 + 16 * k) if k % 3 else (1 << 20) for k in range(24)]
    tensors = []
    for k, nbytes in enumerate(sizes):
        t = torch.empty(
            nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=ctx.device
        )
        tensors.append(fill_input(t, ctx.rank, seed + k))
    _meet()
    for t in tensors:
        backend.all_reduce(t)
    torch.cuda.synchronize()
    err = max(check_result(t, ctx.rank, ctx.world_size, seed + k) for k, t in enumerate(tensors))
    return {"bytes": "24 mixed", "mode": "eager-back-to-back", "max_abs_err": err}


def _round_us(backend, ctx) -> float:
    """Median eager call time of a 1 KiB all-reduce (mostly the barrier round)."""
    import torch
    import torch.distributed as dist

    t = torch.ones(256, dtype=torch.float32, device=ctx.device)
    _meet()
    for _ in range(20):
        backend.all_reduce(t)
    torch.cuda.synchronize()
    dist.barrier()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(200):
        backend.all_reduce(t)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / 200


def _run_checks(ctx, sizes, dtypes) -> list[dict]:
    import torch

    from bench.backends.custom import CustomAllReduce, probe
    from bench.dtypes import DTYPES as TORCH_DTYPES
    from bench.run.inputs import check_result, fill_input

    rows = []
    # load the kernels the checks use before any barrier kernel can spin
    for dtype_name in dtypes:
        warm = fill_input(
            torch.empty(4096, dtype=TORCH_DTYPES[dtype_name], device=ctx.device), ctx.rank, 0
        )
        check_result(warm, ctx.rank, ctx.world_size, 0)
    reason = probe(ctx)
    if reason:
        return [{"backend": "custom", "ok": False, "error": f"probe: {reason}"}]
    seed = 1
    for algorithm in ("one_shot", "two_shot"):
        settings = [({}, sizes, dtypes)] + [
            (v, [s for s in VARIANT_SIZES if s <= max(sizes)], dtypes[:1]) for v in VARIANTS
        ]
        for knobs, knob_sizes, knob_dtypes in settings:
            if knobs and knobs["blocks"] * ctx.world_size > 128:
                continue  # every rank's programs must be resident at once on a shared GPU
            backend = CustomAllReduce(
                ctx, max(sizes), algorithm=algorithm, max_spins=SPINS, **knobs
            )
            try:
                for dtype_name in knob_dtypes:
                    dtype = TORCH_DTYPES[dtype_name]
                    for nbytes in knob_sizes:
                        for mode in ("eager", "graph"):
                            row = _check_point(backend, dtype, nbytes, mode, seed, ctx)
                            seed += 2
                            rows.append(
                                {
                                    "backend": backend.name,
                                    "dtype": dtype_name,
                                    "knobs": backend.knobs(),
                                    **row,
                                }
                            )
                    if not knobs:
                        row = _back_to_back(backend, dtype, ctx, seed)
                        seed += 24
                        rows.append(
                            {
                                "backend": backend.name,
                                "dtype": dtype_name,
                                "knobs": backend.knobs(),
                                **row,
                            }
                        )
                if not knobs:
                    rows.append(
                        {
                            "backend": backend.name,
                            "mode": "round",
                            "round_us": _round_us(backend, ctx),
                            "max_abs_err": 0.0,
                        }
                    )
            finally:
                backend.release()
            torch.cuda.synchronize()
    return rows


def _timeout_test(ctx) -> list[dict]:
    import torch
    import torch.distributed as dist

    from bench.backends.custom import CustomAllReduce

    backend = CustomAllReduce(ctx, 1 << 16, algorithm="one_shot", max_spins=200_000)
    dist.barrier()
    row = {"backend": backend.name, "mode": "timeout", "max_abs_err": 0.0}
    if ctx.rank == 0:
        t = torch.ones(1024, dtype=torch.float32, device=ctx.device)
        started = time.monotonic()
        backend.all_reduce(t)
        try:
            backend.check()
            row["error"] = "no TimeoutError although rank 1 never called"
        except TimeoutError as exc:
            row["message"] = str(exc)
            if "peer 1" not in str(exc):
                row["error"] = "the TimeoutError does not name peer 1"
        row["seconds"] = round(time.monotonic() - started, 3)
        try:
            backend.all_reduce(t)
            row["error"] = "a call after the timeout did not raise"
        except TimeoutError:
            pass
        backend.release()
    dist.barrier()
    return [row]


def _rank_main(rank: int, world: int, port: int, args) -> None:
    import torch.distributed as dist

    from bench.run.session import collect_at_exit

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    collect_at_exit()  # no gloo group left to finalization (SIGABRT)
    ctx = _context(rank, world)
    try:
        rows = (
            _timeout_test(ctx)
            if args.timeout_test
            else _run_checks(ctx, [s for s in SIZES if s <= args.max_bytes], args.dtypes.split(","))
        )
    except Exception as exc:
        rows = [
            {
                "backend": "custom",
                "ok": False,
                "error": f"rank {rank}: {type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-2000:],
            }
        ]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        _report(gathered, world, args)
    dist.barrier()
    dist.destroy_process_group()


def _report(gathered: list, world: int, args) -> None:
    rows = []
    for rank, rank_rows in enumerate(gathered):
        for row in rank_rows:
            ok = "error" not in row and row.get("max_abs_err", 1.0) == 0.0
            rows.append({"rank": rank, **row, "ok": ok})
    failures = [r for r in rows if not r["ok"]]
    summary = {
        "world_size": world,
        "checks": len(rows),
        "failures": len(failures),
        "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")),
        "mps_pipe_dir": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),
        "timeout_test": bool(args.timeout_test),
        "round_us": {
            r["backend"]: round(r["round_us"], 2)
            for r in rows
            if r.get("mode") == "round" and r["rank"] == 0
        },
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    for row in failures[:20]:
        print(f"FAIL ws={world} {json.dumps(row, default=str)[:600]}", flush=True)
    msg = [r.get("message") for r in rows if r.get("message")]
    print(
        f"ws={world} checks={len(rows)} failures={len(failures)} mps={summary['mps']} "
        f"round_us={summary['round_us']}" + (f" timeout: {msg[0]}" if msg else ""),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--max-bytes", type=int, default=64 << 20)
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--timeout-test", action="store_true")
    parser.add_argument("--out", default=None, help="JSON summary")
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    # every module loaded when the context starts: a lazy load in one rank while its peers'
    # kernels spin on the same GPU was seen to stall it past the spin budget under MPS
    os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
    from bench.launch.launcher import free_port

    port = free_port("127.0.0.1")
    if args.out is None:
        args.out = f"/tmp/check-custom-ws{args.world_size}.json"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(r, args.world_size, port, args))
        for r in range(args.world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    if any(codes):
        print(f"ranks exited with {codes}", flush=True)
        return 1
    with open(args.out) as f:
        return 1 if json.load(f)["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
