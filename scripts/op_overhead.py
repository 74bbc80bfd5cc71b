#!/usr/bin/env python
"""What the registered op costs, side by side in one run (one rank; nothing asserts).

Eager, per call (median over batches of calls, so the timer's own cost stays out): the
dispatcher's decision (rule lookup + the chosen backend's gate) at three sizes and the gate
alone; then, at 1 KiB, `torch.distributed.all_reduce` of the floor, the backend the table
routes 1 KiB to called directly, the dispatcher's `all_reduce`, the op
(`torch.ops.allreduce_autotune.all_reduce`: torch's op dispatch, the decision, the backend
writing into a new tensor, or reducing a clone where it cannot) with its overhead over that
direct call, and a clone alone.

With `--device cuda`, also CUDA graphs: K calls captured as plain `torch.distributed.all_reduce`
on the NCCL group, as pynccl called directly, and through the op (routed by the table to pynccl,
then nccl); the host time of `graph.replay()` (perf_counter around the call, no synchronisation
inside the timed region) and the GPU time of a replay (CUDA events), the graphs replayed in turn
so all see the same host, the op's paired difference to each, and the dispatcher's call count
before and after the replays (a replay must do no host work: it stays).
With `--ipc-ranks N` (CUDA; N ranks on the one GPU, start the MPS daemon first) the same graph
comparison for the own IPC kernels: K calls of `custom_one_shot` captured directly, and K calls
of the op routed to it by the table; rank 0 prints.
Target: replay host time identical within noise; eager decision <= 1 us median.

    python scripts/op_overhead.py [--device cpu|cuda] [--ipc-ranks N] [--batches 200] [--markdown F]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.run.hardware import fingerprint  # noqa: E402
from bench.run.session import collect_at_exit  # noqa: E402
from tuner.runtime import op  # noqa: E402
from tuner.runtime.dispatch import Dispatcher  # noqa: E402
from tuner.runtime.schema import Rule, Table, Thresholds  # noqa: E402

GRAPH_HEADER = (
    "| CUDA graph | host us per replay, median [p10-p90] | GPU us per replay, median |",
    "| --- | --: | --: |",
)
EVIDENCE = {
    "run_id": "op-overhead",
    "points": 0,
    "regret_vs_oracle": 0.0,
    "gain_vs_nccl_geomean": None,
}


def per_call_us(fn, batches: int, calls: int = 200) -> float:
    times = []
    for _ in range(batches):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter_ns() - t0) / calls / 1000)
    return statistics.median(times)


def _thresholds(device: str, hardware_key: str) -> Thresholds:
    if device == "cpu":
        rules = (Rule(4096, "shm_one_shot"), Rule(65536, "shm_two_shot"), Rule(None, "gloo"))
        sizes = {"shm_one_shot": 4096, "shm_two_shot": 65536}
    else:
        rules, sizes = (Rule(8192, "pynccl"), Rule(None, "nccl")), {}
    modes = ("eager", "graph") if device == "cuda" else ("eager",)
    return Thresholds(
        tables=tuple(
            Table(hardware_key, 1, "float32", mode, rules, sizes, EVIDENCE) for mode in modes
        )
    )


def eager_rows(d: Dispatcher, device: str, batches: int) -> list[tuple[str, float]]:
    t = torch.ones(256, device=device)  # 1 KiB
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):
        value = per_call_us(fn, batches)
        sync()
        return value

    rows = []
    for nbytes in (2048, 32768, 4 << 20):
        x = torch.ones(nbytes // 4, device=device)
        backend = d.decide(x)
        rows.append((f"decide {nbytes} B -> {backend.name}", timed(lambda x=x: d.decide(x))))
        rows.append(
            (f"  {backend.name}.can_take alone", timed(lambda x=x, b=backend: b.can_take(x)))
        )
    routed = d.decide(t)
    direct = timed(lambda: routed.all_reduce(t))
    op_us = timed(lambda: op.all_reduce(t))
    return rows + [
        (
            f"floor {d.floor.name}: torch.distributed.all_reduce (1 KiB)",
            timed(lambda: d.floor.all_reduce(t)),
        ),
        (f"{routed.name}.all_reduce called directly (where the table routes 1 KiB)", direct),
        ("dispatcher.all_reduce", timed(lambda: d.all_reduce(t))),
        ("op.all_reduce (torch.ops.allreduce_autotune)", op_us),
        (f"  op's eager overhead over the direct {routed.name} call", op_us - direct),
        (
            "tensor.clone (the op's copy where the backend cannot write elsewhere)",
            timed(lambda: t.clone()),
        ),
    ]


def _captured(step, calls: int) -> torch.cuda.CUDAGraph:
    x = torch.ones(256, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            step(x)
    return graph


def _spread(values: list[float], sign: str = "") -> str:
    """'median [p10-p90]' in us, one decimal (`sign="+"`: signed, for differences)."""
    deciles = statistics.quantiles(values, n=10)
    return f"{statistics.median(values):{sign}.1f} [{deciles[0]:{sign}.1f}-{deciles[-1]:{sign}.1f}]"


def graph_rows(
    d: Dispatcher, calls: int, replays: int, directs: list[tuple[str, object]]
) -> list[tuple[str, str, float]]:
    """(what, host us per replay as 'median [p10-p90]', GPU us per replay) for each direct
    call and for the op, then the median of the op's paired host-time difference to each.
    Every graph is captured first, then all are replayed in turn (the order rotated every
    round), so a change in the host's speed during the run falls on all alike."""
    steps = [*directs, ("the op (1 KiB, by the table)", lambda x: op.all_reduce(x))]
    graphs = [_captured(step, calls) for _, step in steps]
    before = sum(d.calls.values())
    host: list[list[float]] = [[] for _ in steps]
    gpu: list[list[float]] = [[] for _ in steps]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(replays):
        for k in range(len(steps)):
            which = (i + k) % len(steps)
            torch.cuda.synchronize()
            dist.barrier()  # ranks replay together (the IPC kernels meet inside)
            start.record()
            t0 = time.perf_counter_ns()
            graphs[which].replay()
            host[which].append((time.perf_counter_ns() - t0) / 1000)
            end.record()
            end.synchronize()
            gpu[which].append(start.elapsed_time(end) * 1000)
    assert sum(d.calls.values()) == before, "a replay ran the dispatcher"
    out = [
        (f"graph of {label}, {calls} calls", _spread(h), statistics.median(g))
        for (label, _), h, g in zip(steps, host, gpu, strict=True)
    ]
    for k, (label, _) in enumerate(directs):
        diff = [b - a for a, b in zip(host[k], host[-1], strict=True)]
        out.append(
            (
                f"op minus {label.split(' (')[0]}, paired by round ({replays} rounds)",
                _spread(diff, "+"),
                statistics.median(gpu[-1]) - statistics.median(gpu[k]),
            )
        )
    return out


def _ipc_rank(rank: int, world: int, port: int, args) -> None:
    torch.cuda.set_device(0)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    collect_at_exit()  # no gloo group left to finalization (SIGABRT)
    key = fingerprint("cuda")["hardware_key"]
    rules = (Rule(None, "custom_one_shot"),)
    tables = tuple(
        Table(key, world, "float32", mode, rules, {"custom_one_shot": 1 << 20}, EVIDENCE)
        for mode in ("eager", "graph")
    )
    d = Dispatcher.from_thresholds(Thresholds(tables=tables), device="cuda:0", count_calls=True)
    with op.serving(d):
        backend = d.backends["custom_one_shot"]
        rows = graph_rows(
            d,
            args.graph_calls,
            args.replays,
            [("custom_one_shot called directly", backend.all_reduce)],
        )
    if rank == 0:
        lines = [
            f"{world} ranks on one {torch.cuda.get_device_name(0)} ({key}); CUDA_MPS_PIPE_"
            f"DIRECTORY {'set' if os.environ.get('CUDA_MPS_PIPE_DIRECTORY') else 'unset'}",
            "",
            *GRAPH_HEADER,
        ]
        lines += [f"| {name} | {host} | {gpu:.1f} |" for name, host, gpu in rows]
        print("\n".join(lines))
        if args.markdown:
            Path(args.markdown).write_text("\n".join(lines) + "\n")
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--graph-calls", type=int, default=20)
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--ipc-ranks", type=int, default=0)
    p.add_argument("--markdown", default=None)
    args = p.parse_args()
    if args.ipc_ranks:
        import torch.multiprocessing as mp

        from bench.launch.launcher import free_port

        mp.start_processes(
            _ipc_rank,
            args=(args.ipc_ranks, free_port("127.0.0.1"), args),
            nprocs=args.ipc_ranks,
            join=True,
            start_method="spawn",
        )
        return 0
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    fp = fingerprint(args.device)
    device = "cuda:0" if args.device == "cuda" else "cpu"
    d = Dispatcher.from_thresholds(
        _thresholds(args.device, fp["hardware_key"]), device=device, count_calls=True
    )
    where = fp.get("cuda_name") or fp["cpu"]["model"]
    lines = [
        f"machine: {where} ({fp['hardware_key']}), {os.cpu_count()} CPUs; torch "
        f"{torch.__version__}; load average {os.getloadavg()[0]:.2f}",
        "",
        "| eager call, float32 | median us per call |",
        "| --- | --: |",
    ]
    with op.serving(d):
        lines += [
            f"| {name} | {value:.2f} |" for name, value in eager_rows(d, device, args.batches)
        ]
        if args.device == "cuda":
            lines += ["", *GRAPH_HEADER]
            lines += [
                f"| {name} | {host} | {gpu:.1f} |"
                for name, host, gpu in graph_rows(
                    d,
                    args.graph_calls,
                    args.replays,
                    [
                        ("plain torch.distributed.all_reduce (the nccl floor)", d.floor.all_reduce),
                        (
                            "pynccl called directly (what the op routes to)",
                            d.backends["pynccl"].all_reduce,
                        ),
                    ],
                )
            ]
    dist.destroy_process_group()
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
