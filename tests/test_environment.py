"""bench.environment: the one table of the variables the project reads, and the one reading."""

from __future__ import annotations

import pytest
import torch

from bench import environment
from bench.backends import get_spec
from bench.backends.base import CommContext
from tuner.runtime.overrides import parse_overrides


def test_an_unlisted_variable_cannot_be_read():
    with pytest.raises(KeyError, match="HOME is not listed"):
        environment.get("HOME")
    assert environment.get("ALLREDUCE_AUTOTUNE_FORCE", {}) is None
    assert environment.get("ALLREDUCE_AUTOTUNE_FORCE", {"ALLREDUCE_AUTOTUNE_FORCE": "x"}) == "x"


def test_every_listed_variable_says_what_it_means_and_who_reads_it():
    names = [v.name for v in environment.VARIABLES]
    assert len(names) == len(set(names))
    assert all(v.meaning and v.read_by for v in environment.VARIABLES)


def test_one_parsing_of_the_multicast_switches():
    off = environment.multicast_off
    assert off({}) is None
    assert off({"NCCL_NVLS_ENABLE": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "0"}) is None
    assert off({"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}) == "TORCH_SYMM_MEM_DISABLE_MULTICAST=1"
    assert off({"NCCL_NVLS_ENABLE": "0"}) == "NCCL_NVLS_ENABLE=0"
    assert off({"NVSHMEM_DISABLE_NVLS": "True"}) == "NVSHMEM_DISABLE_NVLS=True"


def test_the_symm_mem_and_vllm_probes_read_the_same_switches(monkeypatch):
    """NCCL_NVLS_ENABLE=0 alone kept vLLM's symmetric memory off but not torch's multimem
    (two parsings); both now read multicast_off."""
    monkeypatch.delenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", raising=False)
    monkeypatch.delenv("NVSHMEM_DISABLE_NVLS", raising=False)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    ctx = CommContext(0, 2, 0, 2, 1, torch.device("cuda", 0), None)
    reason = get_spec("symm_mem_multimem").probe(ctx)
    assert reason == "no NVLink multicast (NCCL_NVLS_ENABLE=0: kept off on this machine)"


def test_the_overrides_read_through_the_table(monkeypatch):
    monkeypatch.setenv("ALLREDUCE_AUTOTUNE_FORCE", "gloo")
    assert parse_overrides()["force"] == "gloo"
