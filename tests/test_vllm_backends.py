"""vLLM's own communicators as `bench sweep` plug-in backends (bench/vllm), on CPU: registered
through the entry point, every probe skips with its reason (vLLM absent, no CUDA, no ROCm), a
CPU sweep records them as skipped; and the paths' gates and calls (bench.vllm.paths) against
stand-ins with vLLM's method names: forcing the custom all-reduce kernel, multimem or not,
declining, and the max-size tables grown in place (against the real vLLM, when installed)."""

from __future__ import annotations

import copy
import csv
import importlib.util
import os

import pytest
import torch

from bench.backends import CommContext, get_spec, known_names
from bench.vllm import backends as vllm_backends
from bench.vllm.paths import (
    ALGO_ENV,
    PATHS,
    Communicators,
    bind,
    custom_ar_max_size,
    grow_max_sizes,
    run,
    symm_mem_max_size,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM,
    reason="vLLM is not installed (.ci/run installs "
    "it without its CUDA dependencies: docs/vllm.md)",
)
NAMES = (
    "vllm_custom_ar",
    "vllm_custom_ar_one_shot",
    "vllm_custom_ar_two_shot",
    "vllm_symm_mem_two_shot",
    "vllm_symm_mem_multimem",
    "vllm_pynccl",
    "vllm_quick_reduce",
)


def _cpu_ctx(world_size: int = 2) -> CommContext:
    return CommContext(
        rank=0,
        world_size=world_size,
        local_rank=0,
        local_world_size=world_size,
        nnodes=1,
        device=torch.device("cpu"),
        cpu_group=None,
    )


def test_the_entry_point_registers_every_vllm_backend():
    assert vllm_backends.NAMES == NAMES
    assert [n for n in known_names() if n.startswith("vllm_")] == list(NAMES)
    for name in NAMES:
        spec = get_spec(name)
        assert spec.device == "cuda" and spec.knobs == {}
    assert get_spec("vllm_symm_mem_two_shot").dtypes == (torch.bfloat16,)
    assert not get_spec("vllm_pynccl").needs_buffer and get_spec("vllm_custom_ar").needs_buffer


def test_probes_on_cpu_say_why(monkeypatch):
    ctx = _cpu_ctx()
    monkeypatch.delenv(vllm_backends.QUICK_REDUCE_ENV, raising=False)
    reasons = {name: get_spec(name).probe(ctx) for name in NAMES}
    if not HAS_VLLM:
        assert all(r.startswith("vLLM is not installed") for r in reasons.values()), reasons
        return
    for name in NAMES[:-1]:
        assert reasons[name] == f"{name} needs a CUDA device (this sweep runs on cpu)"
    assert reasons["vllm_quick_reduce"] == (
        "vllm_quick_reduce needs a ROCm GPU (AMD MI300/MI350); this sweep runs on cpu"
    )


def test_probes_without_vllm_say_it_is_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    for name in NAMES:
        assert get_spec(name).probe(_cpu_ctx()) == (
            "vLLM is not installed (pip install vllm; see docs/vllm.md)"
        )


def test_symmetric_memory_is_never_built_where_multicast_stays_off():
    off = vllm_backends.multicast_off_reason
    assert off({}) is None and off({"NCCL_NVLS_ENABLE": "1"}) is None
    assert off({"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}) == (
        "no NVLink multicast (TORCH_SYMM_MEM_DISABLE_MULTICAST=1: kept off on this machine)"
    )
    assert off({"NCCL_NVLS_ENABLE": "0"}).startswith("no NVLink multicast (NCCL_NVLS_ENABLE=0")
    assert off({"NVSHMEM_DISABLE_NVLS": "true"})


@pytest.mark.slow
def test_cpu_sweep_records_the_vllm_backends_as_skipped(run_cli, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "bench",
        "sweep",
        "--device",
        "cpu",
        "--world-size",
        "1",
        "--backends",
        ",".join(NAMES) + ",gloo",
        "-b",
        "1K",
        "-e",
        "1K",
        "--dtypes",
        "float32",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--out",
        out,
        "-q",
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "results.csv") as fh:
        rows = {r["backend"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {*NAMES, "gloo"}
    for name in NAMES:
        assert not rows[name]["latency_us"]
        assert rows[name]["skipped_reason"].startswith(
            "needs cuda tensors; these ranks run on cpu"
        ), rows[name]
    assert rows["gloo"]["latency_us"] and rows["gloo"]["correct"] == "True"


# -- the paths, against stand-ins with vLLM's method names ---------------------------------


class FakeCustom:
    """CustomAllreduce's gate and graph-aware call; records VLLM_CUSTOM_ALLREDUCE_ALGO."""

    disabled = False

    def __init__(self, max_size: int) -> None:
        self.max_size, self.algos = max_size, []

    def should_custom_ar(self, tensor):
        return tensor.nbytes % 16 == 0 and tensor.nbytes < self.max_size

    def custom_all_reduce(self, tensor):
        self.algos.append(os.environ.get(ALGO_ENV))
        return tensor * 2


class FakeSymm:
    disabled = False
    force_multimem = None

    def __init__(self) -> None:
        self.seen = []

    def should_use_symm_mem(self, tensor):
        return tensor.dtype == torch.bfloat16

    def all_reduce(self, tensor):
        self.seen.append(self.force_multimem)
        return tensor * 3


def test_custom_paths_force_the_kernel_only_for_the_call(monkeypatch):
    monkeypatch.setenv(ALGO_ENV, "operator-choice")
    ca = FakeCustom(max_size=1024)
    comms = Communicators(ca_comm=ca)
    x = torch.ones(64)  # 256 bytes
    for name in ("vllm_custom_ar_one_shot", "vllm_custom_ar_two_shot", "vllm_custom_ar"):
        assert torch.equal(run(PATHS[name], comms, x), x * 2)
    assert ca.algos == ["1stage", "2stage", "operator-choice"]
    assert os.environ[ALGO_ENV] == "operator-choice"
    monkeypatch.delenv(ALGO_ENV)
    run(PATHS["vllm_custom_ar_one_shot"], comms, x)
    assert ALGO_ENV not in os.environ
    assert run(PATHS["vllm_custom_ar"], comms, torch.ones(256)) is None  # 1024 bytes: not < 1024
    assert run(PATHS["vllm_custom_ar"], comms, torch.ones(3)) is None  # 12 bytes: not % 16
    ca.disabled = True
    assert run(PATHS["vllm_custom_ar"], comms, x) is None


class WatchedSymm(FakeSymm):
    """A stand-in that records every attribute written after its constructor, with the
    object written (a shallow copy shares the record)."""

    def __init__(self, force_multimem=None) -> None:
        super().__init__()
        self.force_multimem = force_multimem
        self.writes = []

    def __setattr__(self, name, value):
        if "writes" in self.__dict__:
            self.writes.append((id(self), name))
        object.__setattr__(self, name, value)


def test_symm_mem_paths_choose_multimem_when_bound_and_decline_what_vllm_declines():
    symm = WatchedSymm()  # vLLM's own object: force_multimem None, vLLM's choice
    comms = Communicators(symm_mem_comm=symm)
    bind([PATHS["vllm_symm_mem_multimem"], PATHS["vllm_symm_mem_two_shot"]], comms)
    x = torch.ones(8, dtype=torch.bfloat16)
    for _ in range(2):
        run(PATHS["vllm_symm_mem_multimem"], comms, x)
        run(PATHS["vllm_symm_mem_two_shot"], comms, x)
    assert symm.seen == [True, False, True, False]  # the copies share vLLM's state
    written = [name for who, name in symm.writes if who == id(symm)]
    assert symm.force_multimem is None and written == []  # vLLM's object never written
    assert run(PATHS["vllm_symm_mem_two_shot"], comms, torch.ones(8)) is None  # float32
    assert run(PATHS["vllm_symm_mem_two_shot"], Communicators(), x) is None  # none built
    assert run(PATHS["vllm_pynccl"], Communicators(), x) is None
    assert run(PATHS["nccl"], Communicators(), x) is None  # no device group


def test_a_symm_mem_object_built_with_the_paths_algorithm_is_called_itself():
    symm = WatchedSymm(force_multimem=False)  # as bench's own vllm_symm_mem_two_shot builds it
    comms = Communicators(symm_mem_comm=symm)
    bind([PATHS["vllm_symm_mem_two_shot"]], comms)
    symm.all_reduce = lambda t: ("itself", t)  # recorded as a write: cleared below
    symm.writes.clear()
    assert run(PATHS["vllm_symm_mem_two_shot"], comms, torch.ones(8, dtype=torch.bfloat16))[0] == (
        "itself"
    )
    assert symm.writes == []


def test_the_forced_custom_kernel_variable_is_restored_when_vllm_raises(monkeypatch):
    """The hazard of the one per-call environment write (vLLM reads only the variable): it
    must never outlive the call."""
    monkeypatch.setenv(ALGO_ENV, "operator-choice")

    class Raising(FakeCustom):
        def custom_all_reduce(self, tensor):
            self.algos.append(os.environ.get(ALGO_ENV))
            raise RuntimeError("vLLM failed")

    ca = Raising(max_size=1024)
    with pytest.raises(RuntimeError, match="vLLM failed"):
        run(PATHS["vllm_custom_ar_two_shot"], Communicators(ca_comm=ca), torch.ones(64))
    assert ca.algos == ["2stage"] and os.environ[ALGO_ENV] == "operator-choice"


def test_max_size_rounding():
    assert custom_ar_max_size(65536) == 65552  # CustomAllreduce takes bytes < max_size
    assert custom_ar_max_size(65535) == 65536
    assert symm_mem_max_size(65536) == 65536  # SymmMemCommunicator: bytes <= max_size
    assert symm_mem_max_size(65530) == 65536


@needs_vllm
def test_max_size_tables_grow_in_place_and_vllm_modules_see_it():
    from vllm.distributed.device_communicators import all_reduce_utils, custom_all_reduce
    from vllm.distributed.device_communicators import symm_mem as vllm_symm_mem

    custom, symm = (
        all_reduce_utils.CUSTOM_ALL_REDUCE_MAX_SIZES,
        all_reduce_utils.SYMM_MEM_ALL_REDUCE_MAX_SIZES,
    )
    saved = copy.deepcopy(custom), copy.deepcopy(symm)
    try:
        changes = grow_max_sizes("9.0", 8, custom_ar=1 << 20, symm_mem=1 << 10)
        assert changes == ["CUSTOM_ALL_REDUCE_MAX_SIZES['9.0'][8] 262144 -> 1048576"]
        assert custom_all_reduce.CUSTOM_ALL_REDUCE_MAX_SIZES["9.0"][8] == 1 << 20
        assert vllm_symm_mem.SYMM_MEM_ALL_REDUCE_MAX_SIZES["9.0"][8] == 64 << 20  # never lowered
        # a capability vLLM lacks: a symmetric-memory row is added, a custom one is not (no
        # row there means no clamp)
        assert grow_max_sizes("8.0", 4, custom_ar=4096, symm_mem=4096) == [
            "SYMM_MEM_ALL_REDUCE_MAX_SIZES['8.0'][4] None -> 4096"
        ]
        assert "8.0" not in custom_all_reduce.CUSTOM_ALL_REDUCE_MAX_SIZES
        assert vllm_symm_mem.SYMM_MEM_ALL_REDUCE_MAX_SIZES["8.0"] == {4: 4096}
    finally:
        for table, before in zip((custom, symm), saved, strict=True):
            table.clear()
            table.update(before)


@needs_vllm
def test_custom_allreduce_gets_the_tables_max_size_only_where_the_caller_left_the_default(
    monkeypatch,
):
    """Read from the constructor's signature, not from the count of positional arguments:
    a vLLM that puts another parameter before max_size still gets it right."""
    from vllm.distributed.device_communicators.custom_all_reduce import CustomAllreduce

    from tuner.engines.vllm_comm import custom_ar_built_with

    seen = []

    def init(self, group, device, symm_mem_enabled=False, max_size=8 << 20):
        self.disabled = True  # what vLLM's close() (at garbage collection) looks at
        seen.append(max_size)

    monkeypatch.setattr(CustomAllreduce, "__init__", init)
    with custom_ar_built_with(4096):
        CustomAllreduce(None, "cpu")
        CustomAllreduce(None, "cpu", True)  # three positional, none of them max_size
        CustomAllreduce(None, "cpu", max_size=77)
        CustomAllreduce(None, "cpu", False, 99)
    CustomAllreduce(None, "cpu")  # outside: vLLM's own default again
    assert seen == [4096, 4096, 77, 99, 8 << 20]
