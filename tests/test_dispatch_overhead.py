"""The dispatcher's per-call decision (rule lookup + the chosen backend's gates), timed with
pytest-benchmark. The target is <= 1 us median on CPU; that figure is read from a real
benchmark run and written to results/tuner.md (scripts/op_overhead.py). Here, with or
without --benchmark-disable, the test only asserts that a decision was made and is the right
one: no timing threshold inside a test."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bench.run.hardware import fingerprint
from tuner.runtime.dispatch import Dispatcher
from tuner.runtime.schema import Rule, Table, Thresholds


@pytest.fixture(scope="module")
def dispatcher(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "s"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    rules = (Rule(4096, "shm_one_shot"), Rule(65536, "shm_two_shot"), Rule(None, "gloo"))
    evidence = {
        "run_id": "bench",
        "points": 0,
        "regret_vs_oracle": 0.0,
        "gain_vs_nccl_geomean": None,
    }
    tables = tuple(
        Table(
            fingerprint("cpu")["hardware_key"],
            1,
            dtype,
            "eager",
            rules,
            {"shm_one_shot": 4096, "shm_two_shot": 65536},
            evidence,
        )
        for dtype in ("float32", "bfloat16")
    )
    d = Dispatcher.from_thresholds(Thresholds(tables=tables))
    yield d
    d.release()
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "nbytes,expected", [(2048, "shm_one_shot"), (32768, "shm_two_shot"), (4 << 20, "gloo")]
)
def test_decision_overhead(benchmark, dispatcher, nbytes, expected):
    tensor = torch.ones(nbytes // 4, dtype=torch.float32)
    backend = benchmark(dispatcher.decide, tensor)
    assert backend is not None and backend.name == expected


@pytest.mark.parametrize("call", ["floor", "dispatcher", "op"])
def test_op_call_overhead(benchmark, dispatcher, call):
    """The registered op against the dispatcher it wraps and the plain floor call, side by side
    (pytest-benchmark's table); asserts only the sum (1 rank: the input itself)."""
    from tuner.runtime import op

    op.install(dispatcher, "bench")
    tensor = torch.full((256,), 3.0)
    fn = {
        "floor": dispatcher.floor.all_reduce,
        "dispatcher": dispatcher.all_reduce,
        "op": lambda t: op.all_reduce(t, "bench"),
    }[call]
    try:
        result = benchmark(fn, tensor)
    finally:
        op.uninstall("bench")
    assert torch.equal(result, torch.full((256,), 3.0))
