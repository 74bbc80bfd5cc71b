"""vLLM's static choice re-enacted, and the vLLM-style export of a table."""

from __future__ import annotations

import pandas as pd

from tuner.runtime.schema import Rule, Table, Thresholds
from tuner.table.formats.common import capability_of
from tuner.table.formats.vllm import format_vllm, vllm_dicts
from tuner.table.vllm import MiB, reenact, static_choice

EVIDENCE = {"run_id": "r", "points": 1, "regret_vs_oracle": 0.0, "gain_vs_nccl_geomean": None}


def test_static_choice_follows_vllms_order_and_bounds():
    # H100/H200, symmetric memory with multicast: custom AR below min(8 MiB, table)
    on = {"multicast": True}
    assert static_choice("9.0", 8, "bfloat16", 64 << 10, **on) == "custom_one_shot"
    assert static_choice("9.0", 8, "bfloat16", 256 << 10, **on) == "symm_mem_multimem"
    assert static_choice("9.0", 4, "bfloat16", 1 << 20, **on) == "custom_two_shot"
    assert static_choice("9.0", 2, "bfloat16", 4 << 20, **on) == "custom_one_shot"
    assert static_choice("9.0", 2, "bfloat16", 16 << 20, **on) == "symm_mem_two_shot"
    assert static_choice("9.0", 2, "bfloat16", 64 * MiB, **on) == "pynccl"
    assert static_choice("9.0", 8, "float32", 256 << 10, **on) == "pynccl"  # symm mem: bf16
    # without multicast vLLM's symm-mem communicator is off: custom AR up to its 8 MiB default
    assert static_choice("9.0", 8, "bfloat16", 4 << 20) == "custom_two_shot"
    assert static_choice("9.0", 8, "bfloat16", 8 << 20) == "pynccl"
    assert static_choice("9.0", 3, "bfloat16", 1024) == "pynccl"  # world size 3: no custom AR
    assert static_choice("9.0", 2, "bfloat16", 1000) == "pynccl"  # not a multiple of 16
    assert static_choice(None, 2, "float32", 1024) is None


def test_reenact_on_a_results_frame():
    rows = pd.DataFrame(
        [
            {
                "hardware_key": "h200",
                "world_size": 2,
                "dtype": "bfloat16",
                "mode": "graph",
                "bytes": b,
                "backend": n,
                "latency_us": v,
                "correct": True,
            }
            for b, n, v in [
                (1024, "custom_one_shot", 5.0),
                (1024, "nccl", 20.0),
                (16 << 20, "nccl", 300.0),
                (16 << 20, "custom_one_shot", 280.0),
            ]
        ]
    )
    out = reenact(rows, "9.0")
    assert list(out["vllm_backend"]) == ["custom_one_shot", "nccl"]  # pynccl not measured
    assert list(out["latency_us"]) == [5.0, 300.0]


def test_export_walks_rules_in_vllms_order():
    rules = (
        Rule(65536, "custom_one_shot"),
        Rule(1 << 20, "custom_two_shot"),
        Rule(8 << 20, "symm_mem_two_shot"),
        Rule(None, "nccl"),
    )
    table = Table(
        "nvidia-h200-x8-nvlink",
        8,
        "bfloat16",
        "graph",
        rules,
        {"custom_one_shot": 65536, "custom_two_shot": 1 << 20, "symm_mem_two_shot": 8 << 20},
        EVIDENCE,
    )
    odd = Table(
        "nvidia-h200-x8-nvlink",
        4,
        "bfloat16",
        "graph",
        (
            Rule(65536, "symm_mem_two_shot"),
            Rule(1 << 20, "nccl"),
            Rule(None, "custom_two_shot", {"blocks": 16}),
        ),
        {"symm_mem_two_shot": 65536, "custom_two_shot": 64 << 20},
        EVIDENCE,
    )
    thresholds = Thresholds(tables=(table, odd))
    dicts, notes, used = vllm_dicts(thresholds)
    assert used == ("bfloat16", "graph")
    assert dicts["CUSTOM_ALL_REDUCE_MAX_SIZES"] == {"9.0": {8: (1 << 20) + 1}}
    assert dicts["SYMM_MEM_ALL_REDUCE_MAX_SIZES"] == {"9.0": {8: (8 << 20) + 1, 4: 65537}}
    assert any("ws4: not expressible: (1M .. inf] custom_two_shot" in n for n in notes)
    text = format_vllm(thresholds, "T.json")
    assert "CUSTOM_ALL_REDUCE_MAX_SIZES = {\n    '9.0': {\n        8: 1 * MiB + 1,  # 1M" in text
    assert capability_of("nvidia-h100-80gb-hbm3-x8-nvlink") == "9.0"
    assert capability_of("cpu-amd-epyc-64c") == "cpu-amd-epyc-64c"
