"""`tuner export --format sglang-env | nccl-tuner | nccl-env` against golden files: a committed
example table (tests/data/export/h200-example.json) and the committed H200 run's table; and the
one-line refusals of what a format cannot express."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tuner.runtime.schema import Rule, Thresholds, load
from tuner.table.formats import ExportError, export
from tuner.table.formats.sglang import sglang_settings

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = "tests/data/export/h200-example.json"
H200_RUN = "results/nvidia-h200-x1-single/thresholds.json"
GOLDEN = REPO / "tests/data/export"

CASES = [  # (table, format, options, golden file)
    (EXAMPLE, "sglang-env", {"world_size": 8}, "h200-example.sglang-env.txt"),
    (
        EXAMPLE,
        "sglang-env",
        {"world_size": 4, "mode": "graph"},
        "h200-example.ws4-graph.sglang-env.txt",
    ),
    (EXAMPLE, "nccl-tuner", {}, "h200-example.nccl-tuner.csv"),
    (EXAMPLE, "nccl-env", {"world_size": 4}, "h200-example.ws4.nccl-env.txt"),
    (H200_RUN, "nccl-tuner", {}, "h200-x1-single.nccl-tuner.csv"),
]


@pytest.mark.parametrize("table,fmt,options,golden", CASES, ids=[c[3] for c in CASES])
def test_format_matches_its_golden_file(table, fmt, options, golden):
    text = export(load(REPO / table), fmt, table, **options)
    assert text == (GOLDEN / golden).read_text()


def test_nccl_tuner_rows_are_what_the_example_plugin_parses():
    """Ten comma-separated fields, names from the plugin's own lists, inclusive bounds that
    continue each other, and every size covered once per world size and regBuff."""
    text = (GOLDEN / "h200-example.nccl-tuner.csv").read_text()
    rows = [line.split(",") for line in text.splitlines() if line and not line.startswith("#")]
    assert rows and all(len(r) == 10 for r in rows)
    for row in rows:
        assert (
            row[0] == "allreduce"
            and row[3] in ("ring", "tree")
            and row[4] in ("simple", "ll", "ll128")
        )
        assert int(row[1]) <= int(row[2]) and row[7] in ("4", "8") and row[9] in ("-1", "0", "1")
    ws8 = [r for r in rows if r[7] == "8"]
    assert [int(r[1]) for r in ws8[1:]] == [int(r[2]) + 1 for r in ws8[:-1]]


def _example(world_size: int = 8, mode: str = "graph"):
    thresholds = load(REPO / EXAMPLE)
    return next(t for t in thresholds.tables if t.world_size == world_size and t.mode == mode)


def _with_rules(table, *rules, max_size=None):
    sizes = max_size or {
        r.algorithm: r.max_bytes or 1 << 26
        for r in rules
        if r.algorithm.startswith(("custom", "symm"))
    }
    return dataclasses.replace(table, rules=tuple(rules), max_size=sizes)


@pytest.mark.parametrize(
    "rules,message",
    [
        (
            (Rule(65536, "custom_two_shot"), Rule(1 << 20, "custom_one_shot"), Rule(None, "nccl")),
            "custom_one_shot after custom_two_shot",
        ),
        (
            (Rule(65536, "symm_mem_one_shot"), Rule(None, "nccl")),
            "symm_mem_one_shot: SGLang has no torch one-shot path",
        ),
        (
            (Rule(65536, "nccl"), Rule(1 << 20, "custom_one_shot"), Rule(None, "nccl")),
            "custom all-reduce after another range",
        ),
        (
            (
                Rule(65536, "custom_one_shot"),
                Rule(1 << 20, "symm_mem_two_shot"),
                Rule(None, "nccl"),
            ),
            "SGLang's torch symmetric memory is symm_mem_multimem below 128M here",
        ),
        ((Rule(None, "custom_one_shot"),), "needs an upper bound"),
    ],
)
def test_sglang_env_refuses_what_sglang_cannot_follow(rules, message):
    with pytest.raises(ExportError, match=message) as err:
        sglang_settings(_with_rules(_example(), *rules))
    assert "\n" not in str(err.value) and "ws8 bfloat16 graph" in str(err.value)


def test_sglang_env_takes_torch_symm_mem_where_its_bound_is_sglangs():
    table = _with_rules(
        _example(),
        Rule(65536, "custom_one_shot"),
        Rule((128 << 20) - 1, "symm_mem_multimem"),
        Rule(None, "pynccl"),
    )
    env, flags, _ = sglang_settings(table)
    assert flags == ["--enable-torch-symm-mem"]
    assert env["SGLANG_FORCE_CUSTOM_ALL_REDUCE_V2_PULL_SIZE_KB"] == 64


def test_formats_refuse_in_one_line():
    example = load(REPO / EXAMPLE)
    cpu = load(REPO / "results/cpu-intel-xeon-processor-2c/thresholds.json")
    cases = [
        (example, "nccl-env", {}, "the NCCL rules differ by size or table"),
        (example, "sglang-env", {}, "pick one with --world-size"),
        (example, "sglang-env", {"world_size": 4}, "pick one with --mode"),
        (example, "nccl-tuner", {"dtype": "float16"}, "no table for float16"),
        (
            cpu,
            "sglang-env",
            {"dtype": "float32", "world_size": 2, "mode": "eager"},
            "not a GPU SGLang knows",
        ),
    ]
    two_nodes = Thresholds(
        tables=(_example(), dataclasses.replace(_example(), hardware_key="nvidia-b200-x8-nvlink"))
    )
    cases.append((two_nodes, "nccl-tuner", {}, "per node type"))
    for thresholds, fmt, options, message in cases:
        with pytest.raises(ExportError, match=message) as err:
            export(thresholds, fmt, "T.json", **options)
        assert "\n" not in str(err.value)
