"""The dispatcher on CPU with real ranks: routing observed on the backends themselves, correct
sums, overrides by argument and environment, and the single mismatch warning."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_tools import gloo_rank, read_reports, write_report

from bench.backends import get_spec
from bench.launch.launcher import free_port
from bench.run.hardware import fingerprint
from tuner.runtime.dispatch import Dispatcher, DispatchWarning
from tuner.runtime.overrides import OverrideError, apply_max_bytes, parse_overrides
from tuner.runtime.schema import Rule, Table, Thresholds, load

K = 1024
# a knob setting other than the default, from the registry (the values move with tuning)
CHUNK = get_spec("shm_one_shot").knobs["chunk_bytes"][1]


def _table(hardware_key: str, world_size: int = 2) -> Thresholds:
    rules = (
        Rule(4 * K, "shm_one_shot", {"chunk_bytes": CHUNK}),
        Rule(64 * K, "shm_two_shot", {}),
        Rule(None, "gloo", {}),
    )
    evidence = {
        "run_id": "test",
        "points": 0,
        "regret_vs_oracle": 0.0,
        "gain_vs_nccl_geomean": None,
        "sizes": [K, 256 * K],
    }
    table = Table(
        hardware_key,
        world_size,
        "float32",
        "eager",
        rules,
        {"shm_one_shot": 4 * K, "shm_two_shot": 64 * K},
        evidence,
    )
    return Thresholds(tables=(table,))


SIZES = [1 * K, 4 * K, 8 * K, 64 * K, 128 * K]


def _exercise(dispatcher: Dispatcher, rank: int, world: int) -> list[dict]:
    """Every size once; which backend's all_reduce actually ran, seen through a spy on it."""
    ran: list[str] = []
    for backend in {id(b): b for b in [*dispatcher.backends.values(), dispatcher.floor]}.values():
        real = backend.all_reduce

        def spy(tensor, _real=real, _name=backend.name):
            ran.append(_name)
            return _real(tensor)

        backend.all_reduce = spy  # an instance attribute: the dispatcher calls this one
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for nbytes in SIZES:
            count = nbytes // torch.empty((), dtype=dtype).element_size()
            tensor = torch.arange(count, dtype=torch.float32).remainder(7).add(rank).to(dtype)
            expected = sum(
                torch.arange(count, dtype=torch.float32).remainder(7).add(r) for r in range(world)
            )
            ran.clear()
            result = dispatcher.all_reduce(tensor)
            out.append(
                {
                    "dtype": str(dtype),
                    "bytes": nbytes,
                    "ran": list(ran),
                    "last": dispatcher.last_backend,
                    "correct": bool(torch.equal(result.float(), expected)),
                }
            )
    strided = torch.ones(4 * K, dtype=torch.float32)[::2]  # not contiguous: every gate refuses
    ran.clear()
    result = dispatcher.all_reduce(strided)
    out.append(
        {
            "dtype": "strided",
            "bytes": 8 * K,
            "ran": list(ran),
            "last": dispatcher.last_backend,
            "correct": bool(torch.equal(result, torch.full_like(result, world))),
        }
    )
    return out


def _rank_main(rank: int, world: int, port: int, table_path: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    with gloo_rank(rank, world, port, timeout_s=60):
        results = {}
        with Dispatcher.from_file(table_path, count_calls=True) as d:
            results["table"] = _exercise(d, rank, world)
            results["backends"] = sorted(d.backends)
        with Dispatcher.from_file(
            table_path, overrides={"force": "shm_two_shot"}, count_calls=True
        ) as d:
            results["force"] = _exercise(d, rank, world)
        os.environ["ALLREDUCE_AUTOTUNE_MAX_BYTES"] = "shm_one_shot=16K"
        with Dispatcher.from_file(table_path, count_calls=True) as d:
            results["env_max_bytes"] = _exercise(d, rank, world)
        del os.environ["ALLREDUCE_AUTOTUNE_MAX_BYTES"]
        write_report(out_dir, rank, results)


@pytest.mark.slow
def test_dispatcher_routes_sizes_to_the_backends_the_table_names(tmp_path):
    path = tmp_path / "thresholds.json"
    _table(fingerprint("cpu")["hardware_key"]).save(path)
    mp.start_processes(
        _rank_main,
        args=(2, free_port("127.0.0.1"), str(path), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    for results in read_reports(tmp_path, 2):
        # only what the table names was built (the floor is gloo)
        assert results["backends"] == [
            "gloo",
            f'shm_one_shot{{"chunk_bytes": {CHUNK}}}',
            "shm_two_shot",
        ]
        table = {(r["dtype"], r["bytes"]): r for r in results["table"]}
        for dtype in ("torch.float32", "torch.bfloat16"):  # bfloat16 uses float32's rules
            assert table[(dtype, 1 * K)]["ran"] == ["shm_one_shot"]
            assert table[(dtype, 4 * K)]["ran"] == ["shm_one_shot"]
            assert table[(dtype, 8 * K)]["ran"] == ["shm_two_shot"]
            assert table[(dtype, 64 * K)]["ran"] == ["shm_two_shot"]
            assert table[(dtype, 128 * K)]["ran"] == ["gloo"]
        for name in ("table", "force", "env_max_bytes"):
            for row in results[name]:
                assert row["correct"], (name, row)
                assert row["ran"] == [row["last"]], (name, row)
        strided = results["table"][-1]
        assert strided["ran"] == ["gloo"]
        force = {(r["dtype"], r["bytes"]): r["ran"] for r in results["force"]}
        # forced: two-shot everywhere its buffer (sized to the table's largest bound) allows
        assert force[("torch.float32", 1 * K)] == ["shm_two_shot"]
        assert force[("torch.float32", 64 * K)] == ["shm_two_shot"]
        assert force[("torch.float32", 128 * K)] == ["gloo"]
        env = {(r["dtype"], r["bytes"]): r["ran"] for r in results["env_max_bytes"]}
        assert env[("torch.float32", 8 * K)] == ["shm_one_shot"]  # was two-shot's
        assert env[("torch.float32", 64 * K)] == ["shm_two_shot"]


def test_mismatch_warns_once_and_uses_gloo(tmp_path):
    path = tmp_path / "thresholds.json"
    _table("cpu-some-other-machine-64c", world_size=8).save(path)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d = Dispatcher.from_file(path, count_calls=True)
            for nbytes in SIZES:
                d.all_reduce(torch.ones(nbytes // 4))
        mine = [w for w in caught if issubclass(w.category, DispatchWarning)]
        assert len(mine) == 1
        text = str(mine[0].message)
        here = fingerprint("cpu")["hardware_key"]
        assert f"no table for {here} world_size 1" in text
        assert "cpu-some-other-machine-64c ws8" in text and "using gloo" in text
        assert d.last_backend == "gloo" and d.calls == {"gloo": len(SIZES)}
        assert d.backends == {}
        d.release()
    finally:
        dist.destroy_process_group()


def test_override_parsing_and_rule_surgery(tmp_path):
    env = {
        "ALLREDUCE_AUTOTUNE_FORCE": "shm_one_shot",
        "ALLREDUCE_AUTOTUNE_MAX_BYTES": "shm_one_shot=64K, gloo=1M",
    }
    assert parse_overrides(None, env) == {
        "force": "shm_one_shot",
        "max_bytes": {"shm_one_shot": 65536, "gloo": 1 << 20},
    }
    # the argument wins over the environment
    assert parse_overrides({"force": None, "max_bytes": {}}, env) == {
        "force": None,
        "max_bytes": {},
    }
    for bad, message in [
        ({"force": "warp_drive"}, "overrides['force']: unknown algorithm"),
        ({"max_bytes": {"gloo": "lots"}}, "overrides['max_bytes']: gloo"),
        ({"speed": 1}, "unknown key 'speed'"),
    ]:
        with pytest.raises(OverrideError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_overrides(bad, {})
    with pytest.raises(OverrideError, match="ALLREDUCE_AUTOTUNE_MAX_BYTES: expected"):
        parse_overrides(None, {"ALLREDUCE_AUTOTUNE_MAX_BYTES": "shm_one_shot"})

    path = tmp_path / "t.json"
    _table("cpu-x").save(path)
    table = load(path).tables[0]

    def shape(t):
        return [(r.max_bytes, r.algorithm) for r in t.rules], dict(t.max_size)

    assert shape(apply_max_bytes(table, "shm_one_shot", 16 * K)) == (
        [(16 * K, "shm_one_shot"), (64 * K, "shm_two_shot"), (None, "gloo")],
        {"shm_one_shot": 16 * K, "shm_two_shot": 64 * K},
    )
    assert shape(apply_max_bytes(table, "shm_one_shot", 1 << 20)) == (
        [(1 << 20, "shm_one_shot"), (None, "gloo")],
        {"shm_one_shot": 1 << 20},
    )
    assert shape(apply_max_bytes(table, "shm_two_shot", 2 * K)) == (
        [(4 * K, "shm_one_shot"), (None, "gloo")],
        {"shm_one_shot": 4 * K},
    )
    # the catch-all cut below its own start: it goes, the rule before becomes the catch-all
    # (sizes beyond two-shot's max_size still reach the floor through the gates)
    assert shape(apply_max_bytes(table, "gloo", 8 * K)) == (
        [(4 * K, "shm_one_shot"), (None, "shm_two_shot")],
        {"shm_one_shot": 4 * K, "shm_two_shot": 64 * K},
    )
    # an algorithm the table does not name takes every size up to the bound
    assert shape(apply_max_bytes(table, "nccl", 8 * K))[0] == [
        (8 * K, "nccl"),
        (64 * K, "shm_two_shot"),
        (None, "gloo"),
    ]
    # the result is still a valid table
    for name, nbytes in [
        ("shm_one_shot", 16 * K),
        ("shm_two_shot", 2 * K),
        ("gloo", 8 * K),
        ("shm_two_shot", 1 << 30),
    ]:
        Thresholds(tables=(apply_max_bytes(table, name, nbytes),)).save(tmp_path / "u.json")


def test_describe_follows_dispatch_order_and_reused_rules_are_said(tmp_path):
    path = tmp_path / "thresholds.json"
    _table(fingerprint("cpu")["hardware_key"], world_size=1).save(path)  # float32 eager only
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d = Dispatcher.from_file(path)
        # reuse is said where the table is read (describe, tuner show), not warned on every start
        assert not [w for w in caught if issubclass(w.category, DispatchWarning)]
        lines = d.describe()
        assert lines[0].startswith(f"dispatcher for {d.hardware_key} world_size 1")
        f32 = next(line for line in lines if line.strip().startswith("float32 eager:"))
        assert f32.split(": ", 1)[1] == (
            "1..4096: shm_one_shot > shm_two_shot > gloo; 4097..65536: shm_two_shot > gloo; "
            "> 65536: gloo"
        ), f32
        for dtype in ("bfloat16", "float16"):
            assert any(
                line.strip().startswith(f"{dtype} eager (rules of float32 eager):")
                for line in lines
            ), lines
        # no bookkeeping unless asked
        d.all_reduce(torch.ones(8))
        assert d.last_backend is None and d.calls == {}
        d.release()
    finally:
        dist.destroy_process_group()


def test_runtime_imports_no_tuner_or_analysis_dependencies():
    """A serving process imports the dispatcher with torch and the backends only."""
    import subprocess
    import sys

    code = (
        "import sys, tuner.runtime.dispatch, tuner.runtime.schema; "
        "print(sorted(m for m in ('optuna', 'pandas', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


class _Stub:
    """A backend as far as building a route reads it (compared by identity)."""

    in_place = True


def test_routes_are_built_in_linear_work(monkeypatch):
    """Each rule's chain (its backend, then the following rules' distinct backends, then the
    floor) is built from the next rule's chain: the rule lookups grow linearly with the rules
    (they grew with their square: 8,000 rules took seconds), and the chains are what the
    definition says."""
    from tuner.runtime import route as route_module

    names = ["shm_one_shot", "shm_two_shot", "gloo", "shm_one_shot"]
    rules = tuple(Rule(64 * (i + 1), names[i % 4], {"threads": i % 3}) for i in range(3000))
    rules += (Rule(None, "gloo", {}),)
    table = Table("cpu-test-2c", 2, "float32", "eager", rules, {}, {})
    floor = _Stub()
    backends = {route_module.backend_key(r): _Stub() for r in rules if r.algorithm != "gloo"}
    backends["gloo"] = floor
    limits = {key: 1 << 20 for key in backends}
    calls = []
    real = route_module.backend_key
    monkeypatch.setattr(route_module, "backend_key", lambda rule: calls.append(1) or real(rule))
    route = route_module.build_route(table, backends, limits, floor)
    assert len(calls) <= 3 * len(rules)
    for i in (0, 1, 2, 1500, len(rules) - 2, len(rules) - 1):
        expected = []
        for rule in rules[i:]:
            backend = backends.get(real(rule))
            if backend not in (None, floor) and backend not in expected:
                expected.append(backend)
        assert [link.backend for link in route.values[i]] == [*expected, floor]


class _Into(_Stub):
    """Declares the optional out-of-place verb (`bench.backends.WritesElsewhere`)."""

    name = "into"

    def can_take(self, tensor):
        return None

    def all_reduce(self, tensor):
        raise AssertionError("the out-of-place call must write elsewhere")

    def all_reduce_into(self, tensor, out):
        return out.copy_(tensor * 2)

    def release(self) -> None:
        pass


def test_a_route_keeps_per_size_the_links_that_admit_it_and_each_out_of_place_call():
    """The size limit is applied once per size, in the route's lookup (cached), not per call;
    each link carries its backend's out-of-place call, chosen from the declared protocol."""
    from tuner.runtime import route as route_module

    table = Table(
        "cpu-test-2c",
        2,
        "float32",
        "eager",
        (Rule(4096, "shm_one_shot"), Rule(None, "gloo")),
        {"shm_one_shot": 1024},
        {},
    )
    own, floor = _Into(), _Stub()
    floor.in_place = False
    floor.all_reduce = lambda tensor: tensor + 1
    route = route_module.build_route(
        table, {"shm_one_shot": own, "gloo": floor}, {"shm_one_shot": 1024}, floor
    )
    assert [link.backend for link in route[1024]] == [own, floor]
    assert [link.backend for link in route[2048]] == [floor]  # over own's buffer
    assert route[1024] is route[1024]  # kept per size
    x = torch.ones(4)
    into, plain = route[16]
    assert torch.equal(into.out_of_place(x), torch.full((4,), 2.0))
    assert torch.equal(plain.out_of_place(x), torch.full((4,), 2.0))
    assert torch.equal(x, torch.ones(4))  # the caller's tensor as it was


def test_vllm_routes_hold_paths_in_their_own_route_type():
    """vLLM's routing looks sizes up with the same size ranges, holding vLLM paths, not the
    dispatcher's links."""
    from bench.vllm.paths import Path
    from tuner.engines.vllm_comm import Routes
    from tuner.runtime.route import Route, SizeRoute

    table = Table(
        "nvidia-test",
        2,
        "bfloat16",
        "eager",
        (Rule(65536, "vllm_custom_ar_one_shot"), Rule(None, "nccl")),
        {},
        {},
    )
    route = Routes([table]).by_key[(torch.bfloat16, "eager")]
    assert isinstance(route, SizeRoute) and not isinstance(route, Route)
    assert [p.name for p in route.values] == ["vllm_custom_ar_one_shot", "nccl"]
    assert isinstance(route[1024], Path) and route[1 << 20].name == "nccl"
