"""The vLLM plugin (tuner/engines) against the real vLLM package where it is installed.

- register(): nothing without ALLREDUCE_AUTOTUNE_THRESHOLDS; a missing, corrupt or unusable
  table (an algorithm vLLM does not run) is one line naming the variable and the file, and
  refuses (raises) unless ALLREDUCE_AUTOTUNE_STRICT=0 (a warning, vLLM's own choice);
- vLLM's plugin loader finds the entry point, and register() leaves vLLM's communicator
  module alone until vLLM imports it, then wraps CudaCommunicator;
- the routing decision: the table's path for (bytes, dtype, mode), its gate, and vLLM's own
  order when it declines, through the wrapped all_reduce of a stand-in class;
- two real ranks (gloo, spawned) building vLLM's real CudaCommunicator (its communicators
  come up disabled on CPU): the same table agrees, sizes vLLM's tables in place and routes;
  different tables refuse on every rank (strict) or fall back with one line each; a node
  without a table keeps vLLM's choice with one warning.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_tools import gloo_rank, read_reports, write_report

from bench.launch.launcher import free_port
from bench.vllm.paths import PATHS, Communicators
from tuner.engines import vllm_comm, vllm_plugin
from tuner.engines.vllm_names import NO_VLLM_PATH, VLLM_PATH, vllm_path
from tuner.engines.vllm_setup import (
    ENV_HARDWARE_KEY,
    ENV_STRICT,
    ENV_THRESHOLDS,
    ThresholdsRefused,
)
from tuner.runtime.schema import Rule, Table, Thresholds

K, M = 1024, 1024 * 1024
KEY = "nvidia-h200-x2-nvlink"
EVIDENCE = {"run_id": "test", "points": 1, "regret_vs_oracle": 0.0, "gain_vs_nccl_geomean": None}
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM,
    reason="vLLM is not installed (.ci/run installs "
    "it without its CUDA dependencies: docs/vllm.md)",
)


def _tables(first_bound: int = 64 * K, key: str = KEY) -> Thresholds:
    bf16 = Table(
        key,
        2,
        "bfloat16",
        "eager",
        (
            Rule(first_bound, "custom_one_shot", {"blocks": 16}),
            Rule(16 * M, "vllm_symm_mem_two_shot"),
            Rule(None, "nccl"),
        ),
        {"custom_one_shot": first_bound, "vllm_symm_mem_two_shot": 16 * M},
        EVIDENCE,
    )
    fp32 = Table(
        key,
        2,
        "float32",
        "eager",
        (Rule(6 * M, "vllm_custom_ar"), Rule(None, "vllm_pynccl")),
        {"vllm_custom_ar": 6 * M},
        EVIDENCE,
    )
    return Thresholds(tables=(bf16, fp32))


@pytest.fixture
def plugin_log():
    """The plugin's log records as text (vLLM's own logger does not propagate to pytest's)."""
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("vllm.allreduce_autotune")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# -- names and settings (no vLLM needed) ----------------------------------------------------


def test_every_name_maps_to_a_vllm_path_or_is_refused_with_a_reason():
    from bench.backends import known_names
    from bench.vllm.backends import NAMES

    assert set(VLLM_PATH.values()) <= set(PATHS)
    assert set(NAMES) <= set(VLLM_PATH)  # a table tuned on vLLM's own communicators
    for name in known_names():
        path, reason = vllm_path(name)
        assert (path is None) == (name not in VLLM_PATH) and (reason is None) == bool(path)
    assert set(NO_VLLM_PATH) == {
        "symm_mem_one_shot",
        "pynccl_symm",
        "gloo",
        "shm_one_shot",
        "shm_two_shot",
    }
    assert vllm_path("custom_one_shot") == ("vllm_custom_ar_one_shot", None)
    assert vllm_path("mpi")[0] is None


def test_register_without_the_variable_does_nothing():
    before = vllm_plugin.current()
    assert vllm_plugin.register({}) is None
    assert vllm_plugin.register({ENV_THRESHOLDS: "  "}) is None
    assert vllm_plugin.current() is before


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _unmapped(tmp_path) -> str:
    doc = _tables().to_json()
    doc["tables"][1]["rules"][1]["algorithm"] = "symm_mem_one_shot"
    doc["tables"][1]["max_size"]["symm_mem_one_shot"] = 64 * M
    return _write(tmp_path, "unmapped.json", json.dumps(doc))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no such file"),
        ("corrupt", "not JSON (Expecting value at line 1 column 1)"),
        ("invalid", "tables[0].world_size: expected an integer >= 1, got 0"),
        (
            "unmapped",
            "tables[1].rules[1].algorithm: symm_mem_one_shot has no vLLM path (vLLM "
            "never calls torch's one-shot symmetric-memory all-reduce); vLLM runs ",
        ),
    ],
)
def test_a_bad_table_refuses_in_one_line_naming_the_variable_and_the_file(tmp_path, case, expected):
    doc = _tables().to_json()
    doc["tables"][0]["world_size"] = 0
    path = {
        "missing": str(tmp_path / "none.json"),
        "corrupt": _write(tmp_path, "corrupt.json", "nan"),
        "invalid": _write(tmp_path, "invalid.json", json.dumps(doc)),
        "unmapped": _unmapped(tmp_path),
    }[case]
    with pytest.raises(ThresholdsRefused) as info:
        vllm_plugin.register({ENV_THRESHOLDS: path})
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{ENV_THRESHOLDS}: {path}: {expected}")
    assert text.endswith(
        "(vLLM does not start; ALLREDUCE_AUTOTUNE_STRICT=0 starts it with its "
        "own all-reduce choice)"
    )


def test_strict_0_warns_once_and_keeps_vllms_choice(tmp_path, plugin_log):
    path = _unmapped(tmp_path)
    setup = vllm_plugin.register({ENV_THRESHOLDS: path, ENV_STRICT: "0"})
    assert setup.thresholds is None and not setup.strict
    assert len(plugin_log) == 1 and "\n" not in plugin_log[0]
    assert plugin_log[0].startswith(f"{ENV_THRESHOLDS}: {path}: tables[1].rules[1].algorithm")
    assert plugin_log[0].endswith(
        "; vLLM keeps its own all-reduce choice (ALLREDUCE_AUTOTUNE_STRICT=0)"
    )
    with pytest.raises(
        ThresholdsRefused,
        match=r"^ALLREDUCE_AUTOTUNE_STRICT: expected 0 or 1, "
        r"got 'maybe'$",
    ):
        vllm_plugin.register({ENV_THRESHOLDS: path, ENV_STRICT: "maybe"})


def test_register_is_idempotent_and_reloads_on_other_settings(tmp_path):
    good, other = tmp_path / "good.json", tmp_path / "other.json"
    _tables().save(good)
    _tables(32 * K).save(other)
    first = vllm_plugin.register({ENV_THRESHOLDS: str(good)})
    assert vllm_plugin.register({ENV_THRESHOLDS: str(good)}) is first is vllm_plugin.current()
    again = vllm_plugin.register({ENV_THRESHOLDS: str(other), ENV_HARDWARE_KEY: KEY})
    assert again is not first and again.hardware_key == KEY and again.digest != first.digest
    # a CPU table in the same file is not vLLM's business: no refusal for its gloo rules
    cpu = Table("cpu-some-model-2c", 2, "float32", "eager", (Rule(None, "gloo"),), {}, EVIDENCE)
    Thresholds(tables=(*_tables().tables, cpu)).save(good)
    assert vllm_plugin.register({ENV_THRESHOLDS: str(good), ENV_STRICT: "1"}).thresholds


def test_a_table_fitted_on_vllms_own_backends_is_what_the_plugin_routes(tmp_path):
    """sweep rows of the vllm_* backends -> tuner fit -> the plugin: every rule names a path."""
    from bench.analysis.results import ResultsWriter, write_meta
    from tuner.cli import main as tuner_main

    run = tmp_path / "run"
    latency = {
        "vllm_custom_ar_one_shot": (5, 2e4),
        "vllm_symm_mem_two_shot": (12, 8e4),
        "vllm_pynccl": (19, 1e5),
        "nccl": (20, 1e5),
    }
    with ResultsWriter(run) as writer:
        for backend, (base, rate) in latency.items():
            for nbytes in (4**i * K for i in range(9)):
                us = base + nbytes / rate
                writer.append(
                    {
                        "run_id": "r1",
                        "hardware_key": KEY,
                        "backend": backend,
                        "world_size": 2,
                        "nnodes": 1,
                        "dtype": "bfloat16",
                        "bytes": nbytes,
                        "count": nbytes // 2,
                        "mode": "graph",
                        "iters": 5,
                        "latency_us": us,
                        "p10_us": us,
                        "p90_us": us,
                        "algbw_gbps": nbytes / us / 1e3,
                        "busbw_gbps": nbytes / us / 1e3,
                        "correct": True,
                        "max_abs_err": 0.0,
                        "skipped_reason": None,
                    }
                )
    write_meta(run, {"run_id": "r1", "hardware_key": KEY})
    assert tuner_main(["fit", str(run), "-o", str(tmp_path / "t.json")]) == 0
    setup = vllm_plugin.register({ENV_THRESHOLDS: str(tmp_path / "t.json")})
    assert vllm_comm.Routes(list(setup.thresholds.tables)).describe() == (
        "bfloat16 graph: <=64K vllm_custom_ar_one_shot, <=1M vllm_symm_mem_two_shot, "
        "rest vllm_pynccl"
    )


# -- the routing decision, against stand-ins -------------------------------------------------


class FakeCustom:
    disabled = False

    def should_custom_ar(self, tensor):
        return tensor.nbytes < 64 * K

    def custom_all_reduce(self, tensor):
        return tensor + 100


def _fake_module():
    class CudaCommunicator:
        def __init__(self, cpu_group, device=None, device_group=None, unique_name=""):
            self.ca_comm, self.symm_mem_comm, self.pynccl_comm = FakeCustom(), None, None
            self.qr_comm, self.device_group, self.world_size = None, None, 2

        def all_reduce(self, input_):
            return input_ + 1  # "vLLM's own order"

    return types.SimpleNamespace(CudaCommunicator=CudaCommunicator)


def test_routes_choose_by_bytes_dtype_and_mode():
    routes = vllm_comm.Routes(list(_tables().tables))
    choose = routes.choose
    bf16, fp32 = torch.bfloat16, torch.float32
    assert choose(64 * K, bf16, "eager").name == "vllm_custom_ar_one_shot"
    assert choose(64 * K + 2, bf16, "eager").name == "vllm_symm_mem_two_shot"
    assert choose(16 * M, bf16, "eager").name == "vllm_symm_mem_two_shot"
    assert choose(16 * M + 2, bf16, "eager").name == "nccl"
    assert choose(6 * M, fp32, "eager").name == "vllm_custom_ar"
    assert choose(6 * M + 4, fp32, "eager").name == "vllm_pynccl"
    assert choose(1 * K, torch.float16, "eager") is None  # no table: vLLM's own
    assert choose(1 * K, bf16, "graph") is None
    assert routes.describe().startswith(
        "bfloat16 eager: <=64K vllm_custom_ar_one_shot, "
        "<=16M vllm_symm_mem_two_shot, rest nccl; float32 eager"
    )


def test_the_wrapped_all_reduce_routes_and_falls_back_to_vllms_order():
    module = _fake_module()
    vllm_comm.install(module, current=lambda: None)
    vllm_comm.install(module, current=lambda: None)  # once only
    comm = module.CudaCommunicator(cpu_group=None, unique_name="tp:0")
    assert getattr(comm, vllm_comm.ROUTES_ATTRIBUTE) is None  # no setup: vLLM's alone
    x = torch.zeros(16, dtype=torch.bfloat16)
    assert torch.equal(comm.all_reduce(x), x + 1)
    setattr(comm, vllm_comm.ROUTES_ATTRIBUTE, vllm_comm.Routes(list(_tables().tables)))
    assert torch.equal(comm.all_reduce(x), x + 100)  # the table: custom all-reduce
    big = torch.zeros(48 * K, dtype=torch.bfloat16)  # 96K: symm mem, absent here
    assert torch.equal(comm.all_reduce(big), big + 1)
    comm.ca_comm.disabled = True  # the gate declines: vLLM's order
    assert torch.equal(comm.all_reduce(x), x + 1)
    assert torch.equal(comm.all_reduce(x.half()), x.half() + 1)  # no float16 table


def test_nccl_path_reduces_a_copy_on_the_device_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        x = torch.arange(4.0)
        out = vllm_comm.run(PATHS["nccl"], Communicators(device_group=dist.group.WORLD), x)
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    finally:
        dist.destroy_process_group()


# -- the real vLLM package -------------------------------------------------------------------

DISCOVERY = """
import os, sys
import vllm.plugins as plugins
found = plugins.load_plugins_by_group(plugins.DEFAULT_PLUGINS_GROUP)
print("found", found["allreduce_autotune"] is __import__("tuner.engines.vllm_plugin").engines.vllm_plugin.register)
plugins.load_general_plugins()
from tuner.engines import vllm_plugin
print("off", vllm_plugin.current(), "tuner.engines.vllm_comm" in sys.modules)
os.environ["ALLREDUCE_AUTOTUNE_THRESHOLDS"] = sys.argv[1]
plugins.plugins_loaded = False
plugins.load_general_plugins()
print("on", vllm_plugin.current().path, vllm_plugin.CUDA_COMMUNICATOR in sys.modules)
from vllm.distributed.device_communicators.cuda_communicator import CudaCommunicator
print("wrapped", getattr(CudaCommunicator.all_reduce, "__allreduce_autotune__", False))
"""


@needs_vllm
@pytest.mark.slow
def test_vllms_plugin_loader_finds_and_runs_register(tmp_path, subprocess_env):
    path = tmp_path / "thresholds.json"
    _tables().save(path)
    env = subprocess_env()
    env.pop(ENV_THRESHOLDS, None)
    proc = subprocess.run(
        [sys.executable, "-c", DISCOVERY, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [
        line
        for line in proc.stdout.splitlines()
        if line.startswith(("found", "off", "on", "wrapped"))
    ]
    assert lines == ["found True", "off None False", f"on {path} False", "wrapped True"]


CASES = [
    (64 * K, "bfloat16", "eager"),
    (64 * K + 2, "bfloat16", "eager"),
    (16 * M + 2, "bfloat16", "eager"),
    (1 * K, "float16", "eager"),
    (6 * M, "float32", "eager"),
    (6 * M + 4, "float32", "eager"),
]
CALLS = [
    (1 * K, "bfloat16"),
    (2 * M, "bfloat16"),
    (20 * M, "bfloat16"),
    (1 * K, "float32"),
    (8 * M, "float32"),
]


def _phase(build, log: list, report: dict, name: str) -> object:
    """Build a TP communicator; its routes (or the refusal) and the log lines it wrote."""
    log.clear()
    try:
        routes = getattr(build(), vllm_comm.ROUTES_ATTRIBUTE)
        report[name] = {"routes": routes is not None, "log": list(log)}
        return routes
    except ThresholdsRefused as exc:
        report[name] = {"refused": str(exc), "log": list(log)}
        return None


def _rank_main(rank: int, world: int, port: int, files: dict, out_dir: str) -> None:
    os.environ.update(
        {"OMP_NUM_THREADS": "1", ENV_THRESHOLDS: files["good"], ENV_HARDWARE_KEY: KEY}
    )
    os.environ.pop(ENV_STRICT, None)
    with gloo_rank(rank, world, port):
        write_report(out_dir, rank, _rank_report(rank, files))


def _rank_report(rank: int, files: dict) -> dict:
    """vLLM's real CudaCommunicator built in every phase (tables agreed, different, lenient,
    none for this hardware), with the routes, log lines and sums each phase gave."""
    log: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: log.append(record.getMessage())
    logging.getLogger("vllm.allreduce_autotune").addHandler(handler)
    import vllm.plugins
    from vllm.distributed.device_communicators import custom_all_reduce, symm_mem
    from vllm.distributed.device_communicators.cuda_communicator import CudaCommunicator

    vllm.plugins.load_general_plugins()  # the entry point -> register()
    vllm_comm.device_capability = lambda: "10.3"  # vLLM knows no capability on CPU
    ran: list = []
    real_run = vllm_comm.run
    vllm_comm.run = lambda path, comms, t: ran.append(path.name) or real_run(path, comms, t)
    group, report = dist.group.WORLD, {}

    def build(name: str = "tp:0"):
        return CudaCommunicator(
            cpu_group=group, device=torch.device("cpu"), device_group=group, unique_name=name
        )

    routes = _phase(build, log, report, "agreed")
    report["choices"] = [
        getattr(routes.choose(n, getattr(torch, d), m), "name", None) for n, d, m in CASES
    ]
    comm, sums = build(), []
    for nbytes, dtype in CALLS:
        x = torch.full(
            (nbytes // torch.tensor([], dtype=getattr(torch, dtype)).element_size(),),
            float(rank + 1),
            dtype=getattr(torch, dtype),
        )
        y = comm.all_reduce(x)
        sums.append(bool((y == 3).all()) and bool((x == rank + 1).all()))
    report.update(
        sums=sums,
        ran=ran,
        sizes=[
            custom_all_reduce.CUSTOM_ALL_REDUCE_MAX_SIZES["10.3"][2],
            symm_mem.SYMM_MEM_ALL_REDUCE_MAX_SIZES["10.3"][2],
        ],
    )
    report["pp_routes"] = getattr(build("pp:0"), vllm_comm.ROUTES_ATTRIBUTE)
    env = {ENV_THRESHOLDS: files["good" if rank == 0 else "other"], ENV_HARDWARE_KEY: KEY}
    vllm_plugin.register(env)
    _phase(build, log, report, "different")
    vllm_plugin.register({**env, ENV_STRICT: "0"})
    _phase(build, log, report, "different_lenient")
    vllm_plugin.register({ENV_THRESHOLDS: files["good"], ENV_HARDWARE_KEY: "nvidia-b200-x2-nvlink"})
    _phase(build, log, report, "no_table")
    return report


@needs_vllm
@pytest.mark.slow
def test_two_ranks_build_vllms_communicator_agree_size_and_route(tmp_path):
    files = {"good": str(tmp_path / "good.json"), "other": str(tmp_path / "other.json")}
    _tables().save(files["good"])
    _tables(32 * K).save(files["other"])
    mp.start_processes(
        _rank_main,
        args=(2, free_port("127.0.0.1"), files, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    reports = read_reports(tmp_path, 2)
    for report in reports:
        assert report["agreed"]["routes"] and report["pp_routes"] is None
        assert report["choices"] == [
            "vllm_custom_ar_one_shot",
            "vllm_symm_mem_two_shot",
            "nccl",
            None,
            "vllm_custom_ar",
            "vllm_pynccl",
        ]
        # on CPU every vLLM communicator declines: all but the nccl path fall back to vLLM's
        # own order, and every sum is right with the input left alone
        assert report["ran"] == [
            "vllm_custom_ar_one_shot",
            "vllm_symm_mem_two_shot",
            "nccl",
            "vllm_custom_ar",
            "vllm_pynccl",
        ]
        assert all(report["sums"]), report["sums"]
        # grown in place, seen through vLLM's own module names: 4 MiB -> 6 MiB + 16 (custom
        # all-reduce takes bytes < max_size), 4 MiB -> 16 MiB (symmetric memory)
        assert report["sizes"] == [6 * M + 16, 16 * M]
        refused = report["different"]["refused"]
        assert "\n" not in refused and refused.startswith(
            f"{ENV_THRESHOLDS}: the ranks of tp:0 loaded different tables (rank 0: "
            f"{files['good']} ("
        )
        assert f"rank 1: {files['other']} (" in refused and "vLLM does not start" in refused
        lenient = report["different_lenient"]
        assert not lenient["routes"] and len(lenient["log"]) == 1
        assert "loaded different tables" in lenient["log"][0]
        assert lenient["log"][0].endswith(
            "vLLM keeps its own all-reduce choice (ALLREDUCE_AUTOTUNE_STRICT=0)"
        )
        assert not report["no_table"]["routes"]
    agreed = reports[0]["agreed"]["log"]
    assert len(agreed) == 1 and agreed[0].startswith(
        f"allreduce-autotune: tp:0 all_reduce follows {files['good']} ({KEY}, world_size 2): "
        "bfloat16 eager: <=64K vllm_custom_ar_one_shot"
    )
    assert "CUSTOM_ALL_REDUCE_MAX_SIZES['10.3'][2] 4194304 -> 6291472" in agreed[0]
    assert "params of custom_one_shot not applied" in agreed[0]
    assert agreed[0].endswith(
        "not available here, their sizes go vLLM's own way: "
        "vllm_custom_ar_one_shot, vllm_symm_mem_two_shot, vllm_custom_ar, "
        "vllm_pynccl"
    )
    assert reports[1]["agreed"]["log"] == []
    assert reports[0]["no_table"]["log"] == [
        f"allreduce-autotune: no table for nvidia-b200-x2-nvlink world_size 2 in "
        f"{files['good']} (it has: {KEY} ws2); vLLM keeps its own all-reduce choice"
    ]
    assert reports[1]["no_table"]["log"] == []


def test_an_exact_table_runs_only_where_vllm_keeps_the_arithmetic():
    """An exact-numerics table is refused where vLLM would run it with arithmetic nobody
    measured (this project's kernel name -> vLLM's nearest path) or with NCCL (its order
    changes with the message size); one fitted on vLLM's own implementations is kept."""
    from tuner.engines.vllm_names import first_inexact
    from tuner.runtime.schema import Rule, Table

    def table(*names: str, numerics: str = "exact") -> Table:
        rules = tuple(Rule(65536 if i < len(names) - 1 else None, n) for i, n in enumerate(names))
        return Table("nvidia-h200-x8-nvlink", 8, "bfloat16", "graph", rules, {}, {}, numerics)

    kept = table("vllm_custom_ar_one_shot", "vllm_symm_mem_two_shot")
    assert first_inexact(enumerate([kept])) is None
    assert first_inexact(enumerate([table("custom_one_shot", "nccl", numerics="any")])) is None
    own = first_inexact(enumerate([table("custom_one_shot", "vllm_symm_mem_two_shot")]))
    assert own.startswith("tables[0].rules[0].algorithm: custom_one_shot") and "vllm_*" in own
    nccl = first_inexact(enumerate([table("vllm_custom_ar_one_shot", "vllm_pynccl")]))
    assert nccl.startswith("tables[0].rules[1].algorithm: vllm_pynccl") and "NCCL" in nccl
