"""The registered op `allreduce_autotune::all_reduce` with real ranks on CPU: eager calls routed
by the table, the caller's tensor left alone, and a `torch.compile(fullgraph=True)` function
around it with no graph break (counted by `torch._dynamo.explain`) and the right sums."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_tools import gloo_rank, read_reports, write_report
from torch._dynamo import explain as dynamo_explain

from bench.launch.launcher import free_port
from bench.run.hardware import fingerprint
from tuner.runtime import op
from tuner.runtime.dispatch import Dispatcher
from tuner.runtime.schema import Rule, Table, Thresholds

K = 1024


def _thresholds(world_size: int) -> Thresholds:
    rules = (Rule(4 * K, "shm_one_shot"), Rule(64 * K, "shm_two_shot"), Rule(None, "gloo"))
    evidence = {
        "run_id": "test",
        "points": 0,
        "regret_vs_oracle": 0.0,
        "gain_vs_nccl_geomean": None,
    }
    return Thresholds(
        tables=(
            Table(
                fingerprint("cpu")["hardware_key"],
                world_size,
                "float32",
                "eager",
                rules,
                {"shm_one_shot": 4 * K, "shm_two_shot": 64 * K},
                evidence,
            ),
        )
    )


def _model(x: torch.Tensor) -> torch.Tensor:
    return op.all_reduce(x * 2) + 1


def _exercise(dispatcher: Dispatcher, rank: int, world: int) -> dict:
    """Eager calls of the op (routes, sums, input kept), the graph-break count of a model
    around it, and that model compiled with fullgraph=True."""
    report: dict = {"eager": [], "compiled": []}
    for nbytes in (1 * K, 16 * K, 256 * K):
        x = torch.full((nbytes // 4,), float(rank + 1))
        before = x.clone()
        y = op.all_reduce(x)
        report["eager"].append(
            {
                "bytes": nbytes,
                "backend": dispatcher.last_backend,
                "sum_ok": bool(torch.equal(y, torch.full_like(x, sum(range(1, world + 1))))),
                "input_kept": bool(torch.equal(x, before)),
            }
        )
    explain = dynamo_explain(_model)(torch.ones(256))
    report["graph_breaks"] = explain.graph_break_count
    report["graphs"] = explain.graph_count
    torch.compiler.reset()
    compiled = torch.compile(_model, fullgraph=True, backend="aot_eager")
    for nbytes in (1 * K, 16 * K):
        x = torch.full((nbytes // 4,), float(rank + 1))
        y = compiled(x)
        want = 2 * sum(range(1, world + 1)) + 1
        report["compiled"].append(
            {
                "bytes": nbytes,
                "backend": dispatcher.last_backend,
                "sum_ok": bool(torch.equal(y, torch.full_like(x, want))),
            }
        )
    return report


def _rank_main(rank: int, world: int, port: int, path: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    with gloo_rank(rank, world, port):
        with op.serving(Dispatcher.from_file(path, count_calls=True)) as dispatcher:
            write_report(out_dir, rank, _exercise(dispatcher, rank, world))


@pytest.mark.slow
def test_op_routes_by_table_and_compiles_without_graph_breaks(tmp_path):
    world = 2
    path = tmp_path / "thresholds.json"
    _thresholds(world).save(path)
    mp.start_processes(
        _rank_main,
        args=(world, free_port("127.0.0.1"), str(path), str(tmp_path)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    for report in read_reports(tmp_path, world):
        assert [e["backend"] for e in report["eager"]] == ["shm_one_shot", "shm_two_shot", "gloo"]
        assert all(e["sum_ok"] and e["input_kept"] for e in report["eager"])
        assert report["graph_breaks"] == 0 and report["graphs"] == 1
        assert [e["backend"] for e in report["compiled"]] == ["shm_one_shot", "shm_two_shot"]
        assert all(e["sum_ok"] for e in report["compiled"])


def test_op_without_an_installed_dispatcher_says_how_to_install():
    with pytest.raises(RuntimeError, match="no dispatcher installed for group 'nobody'"):
        op.all_reduce(torch.ones(4), "nobody")


def test_op_registration_passes_torch_opcheck(tmp_path):
    """torch.library.opcheck: schema, fake implementation, autograd registration and
    AOT-dispatch all agree with the real implementation (one rank, gloo)."""
    path = tmp_path / "thresholds.json"
    _thresholds(1).save(path)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with op.serving(Dispatcher.from_file(path), "opcheck"):
            for x in (torch.arange(12.0).reshape(3, 4), torch.ones(5, dtype=torch.bfloat16)):
                torch.library.opcheck(
                    torch.ops.allreduce_autotune.all_reduce.default, (x, "opcheck")
                )
    finally:
        dist.destroy_process_group()


class _GlooInto:
    """A real backend (gloo underneath) with the optional out-of-place verb, counting which
    verb ran: the op must use `all_reduce_into` and never reduce a copy in place."""

    name, in_place = "gloo_into", True

    def __init__(self, ctx) -> None:
        self.group, self.into_calls, self.in_place_calls = ctx.cpu_group, 0, 0

    def can_take(self, tensor: torch.Tensor) -> str | None:
        return None if tensor.is_contiguous() else "tensor is not contiguous"

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.in_place_calls += 1
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_reduce_into(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        self.into_calls += 1
        out.copy_(tensor)
        dist.all_reduce(out, group=self.group)
        return out

    def release(self) -> None:
        self.group = None


def _register_gloo_into() -> None:
    """In the rank's own process (each spawned rank has its own registry)."""
    from bench.backends import register
    from bench.backends.base import BackendSpec

    register(
        BackendSpec(
            name="gloo_into",
            device="cpu",
            probe=lambda ctx: None,
            create=lambda ctx, max_bytes, **kw: _GlooInto(ctx),
            needs_buffer=False,
        )
    )


def _into_table(world_size: int) -> Thresholds:
    evidence = {
        "run_id": "test",
        "points": 0,
        "regret_vs_oracle": 0.0,
        "gain_vs_nccl_geomean": None,
    }
    return Thresholds(
        tables=(
            Table(
                fingerprint("cpu")["hardware_key"],
                world_size,
                "float32",
                "eager",
                (Rule(4 * K, "gloo_into"), Rule(None, "gloo")),
                {},
                evidence,
            ),
        )
    )


def _into_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    _register_gloo_into()
    with gloo_rank(rank, world, port):
        with op.serving(Dispatcher.from_thresholds(_into_table(world))) as dispatcher:
            backend = dispatcher.backends["gloo_into"]
            report = []
            for nbytes in (1 * K, 4 * K, 16 * K):
                x = torch.full((nbytes // 4,), float(rank + 1))
                y = op.all_reduce(x)
                report.append(
                    {
                        "bytes": nbytes,
                        "into": backend.into_calls,
                        "in_place": backend.in_place_calls,
                        "sum_ok": bool(
                            torch.equal(y, torch.full_like(x, sum(range(1, world + 1))))
                        ),
                        "input_kept": bool(torch.equal(x, torch.full_like(x, rank + 1))),
                        "new_tensor": y.data_ptr() != x.data_ptr(),
                    }
                )
            write_report(out_dir, rank, report)


def test_op_writes_into_a_new_tensor_where_the_backend_can(tmp_path):
    """A backend with `all_reduce_into` gets the caller's tensor and an empty one (no copy
    first); above its range gloo reduces a copy. Two real ranks."""
    world = 2
    mp.start_processes(
        _into_rank,
        args=(world, free_port("127.0.0.1"), str(tmp_path)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    for report in read_reports(tmp_path, world):
        assert [(e["into"], e["in_place"]) for e in report] == [(1, 0), (2, 0), (2, 0)]
        assert all(e["sum_ok"] and e["input_kept"] and e["new_tensor"] for e in report)


def test_opcheck_passes_through_the_out_of_place_verb(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    _register_gloo_into()
    try:
        with op.serving(Dispatcher.from_thresholds(_into_table(1)), "into") as dispatcher:
            torch.library.opcheck(
                torch.ops.allreduce_autotune.all_reduce.default,
                (torch.arange(12.0).reshape(3, 4), "into"),
            )
            assert dispatcher.backends["gloo_into"].into_calls > 0
    finally:
        dist.destroy_process_group()
