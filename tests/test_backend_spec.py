"""A backend's spec is the one statement of its dtypes, alignment and knobs: the gate a built
backend applies (`can_take`), the knob checks (the sweep's flag, the build, the constructor),
are all read from it (issue 22)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.backends import CommContext, all_specs, get_spec, make_gate, register
from bench.backends.custom import CustomAllReduce
from bench.backends.gloo import GlooAllReduce
from bench.backends.shm import ShmAllReduce


def _ctx(world_size: int = 1) -> CommContext:
    return CommContext(
        rank=0,
        world_size=world_size,
        local_rank=0,
        local_world_size=world_size,
        nnodes=1,
        device=torch.device("cpu"),
        cpu_group=None,
    )


@pytest.fixture
def narrowed():
    """gloo and shm_one_shot re-registered as taking float32 only, in 8-byte multiples."""
    saved = {name: get_spec(name) for name in ("gloo", "shm_one_shot")}
    for spec in saved.values():
        register(dataclasses.replace(spec, dtypes=(torch.float32,), alignment=8))
    yield
    for spec in saved.values():
        register(spec)


def test_the_gate_of_a_built_backend_is_its_specs(narrowed):
    for backend in (GlooAllReduce(_ctx()), ShmAllReduce(_ctx(), 1024, algorithm="one_shot")):
        assert backend.can_take(torch.ones(4)) is None
        assert backend.can_take(torch.ones(4, dtype=torch.bfloat16)) == (
            "dtype bfloat16 not supported (takes float32)"
        )
        assert backend.can_take(torch.ones(3)) == "12 bytes is not a multiple of 8"


def test_every_cpu_spec_gate_says_why_in_one_line():
    for spec in all_specs():
        if spec.device != "cpu":
            continue
        gate = spec.gate(max_bytes=64)
        assert gate(torch.ones(4)) is None, spec.name
        assert gate(torch.ones(32)) == "128 bytes exceeds max_size 64", spec.name
        assert gate(torch.ones(4, 4).t()) == "tensor is not contiguous", spec.name
        assert "not supported" in gate(torch.ones(2, dtype=torch.float64)), spec.name


def test_make_gate_checks_the_device_first():
    gate = make_gate(dtypes=(torch.float32,), device_type="cuda", alignment=4, max_bytes=None)
    assert gate(torch.ones(4)) == "tensor on cpu, backend needs cuda"


def test_custom_knobs_are_checked_by_its_spec():
    """The constructor refuses a knob value through the spec, before any kernel loads."""
    with pytest.raises(ValueError, match=r"custom_one_shot.blocks=3 not in \[32, 8, 16, 64, 128\]"):
        CustomAllReduce(_ctx(2), 1024, algorithm="one_shot", blocks=3)
    spec = get_spec("custom_two_shot")
    assert spec.unknown_knob({"warps": 4}) == (
        "custom_two_shot has no knob 'warps' (knobs: blocks, num_warps, vec_bytes, chunk)"
    )
    assert spec.check_params({"blocks": 16, "chunk": 4}) is None


def test_nccl_and_pynccl_share_one_ctas_list():
    ctas = {get_spec(n).knobs["ctas"] for n in ("nccl", "pynccl", "pynccl_symm") if _known(n)}
    assert len(ctas) <= 1


def _known(name: str) -> bool:
    try:
        get_spec(name)
    except KeyError:
        return False
    return True
