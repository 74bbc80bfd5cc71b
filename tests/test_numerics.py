"""A point's arithmetic: same bits on every rank, the reference arithmetic, error vs float64."""

from __future__ import annotations

import csv
import json
import os
import textwrap

import pytest
import torch
from rank_tools import subprocess_path

from bench.analysis.results import COLUMNS, NUMERICS_COLUMNS, ResultsWriter, read_results
from bench.run.numerics import (
    NUMERICS_OTHER,
    NUMERICS_REFERENCE,
    combine,
    local_numerics,
    random_input,
    reference,
)

FAST = ["--iters", "2", "--warmup", "1", "--rounds", "2", "--timeout", "120", "-q"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_arithmetic_and_its_error(dtype):
    count, ws = 4096, 4
    exact, ref = reference(dtype, count, ws)
    digest, is_ref, err_ulp = local_numerics(ref, dtype, ws, count)
    assert is_ref and digest is not None
    if dtype != torch.float32:  # one rounding of a float32 sum of 4: the float64 sum rounded
        assert err_ulp <= 0.5
    # the same values summed in another order, in the dtype each step: not the reference
    xs = [random_input(dtype, count, r) for r in range(ws)]
    other = (xs[3] + xs[2]) + (xs[1] + xs[0])
    _, is_ref, other_ulp = local_numerics(other, dtype, ws, count)
    assert not is_ref and other_ulp > 0.5
    # the wrong size is no figure at all
    assert local_numerics(ref[:-1], dtype, ws, count) == (None, False, float("inf"))


def test_inputs_are_seeded_per_rank_and_size_and_span_magnitudes():
    a = random_input(torch.float32, 1000, 0)
    assert torch.equal(a, random_input(torch.float32, 1000, 0))
    assert not torch.equal(a, random_input(torch.float32, 1000, 1))
    assert not torch.equal(a[:999], random_input(torch.float32, 999, 0))
    magnitude = a.abs()
    assert magnitude.max() / magnitude[magnitude > 0].min() > 2**10


def test_ranks_with_different_bits_are_not_the_same():
    agreed = combine([(7, True, 0.5), (7, True, 0.25)])
    assert agreed.same_bits and agreed.numerics == NUMERICS_REFERENCE and agreed.max_err_ulp == 0.5
    split = combine([(7, True, 0.5), (8, False, 2.0)])
    assert not split.same_bits and split.numerics == NUMERICS_OTHER and split.max_err_ulp == 2.0
    assert not combine([(None, False, float("inf"))] * 2).same_bits


def _legacy_table(path):
    legacy = [c for c in COLUMNS if c not in NUMERICS_COLUMNS]
    row = dict.fromkeys(legacy, "")
    row.update(
        run_id="old",
        hardware_key="hk",
        backend="gloo",
        world_size="2",
        nnodes="1",
        dtype="float32",
        bytes="1024",
        count="256",
        mode="eager",
        iters="5",
        latency_us="10",
        correct="True",
        max_abs_err="0",
    )
    with open(path / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=legacy)
        writer.writeheader()
        writer.writerow(row)
    return row


def test_a_run_written_before_the_numerics_reads_them_as_unknown(tmp_path):
    _legacy_table(tmp_path)
    frame = read_results(tmp_path)
    assert list(frame.columns) == list(COLUMNS)
    assert frame["same_bits"].isna().all() and frame["numerics"].isna().all()
    assert frame["max_err_ulp"].isna().all() and bool(frame["correct"].iloc[0])
    # resumed: rewritten with today's columns, its row kept, new rows appended
    with ResultsWriter(tmp_path) as writer:
        row = {c: None for c in COLUMNS}
        row.update(read_results(tmp_path).iloc[0].to_dict(), bytes=2048, count=512)
        row.update(same_bits=True, numerics="reference", max_err_ulp=0.5)
        writer.append(row)
    frame = read_results(tmp_path)
    assert len(frame) == 2 and frame["numerics"].tolist()[1] == "reference"
    assert frame["numerics"].isna().tolist() == [True, False]


def test_sweep_writes_numerics_and_a_rank_divergent_sum_is_not_correct(run_cli, tmp_path):
    """A backend exact on integers whose ranks differ in the last bit on floats: the exact
    check passes it, the numerics do not."""
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "split_bits.py").write_text(
        textwrap.dedent("""
        import torch
        import torch.distributed as dist
        from bench.backends import register
        from bench.backends.base import BackendSpec

        class SplitBits:
            name, in_place = "split_bits", True
            def __init__(self, ctx):
                self.group, self.rank = ctx.cpu_group, ctx.rank
            def can_take(self, tensor):
                return None
            def all_reduce(self, tensor):
                dist.all_reduce(tensor, group=self.group)
                flat = tensor.view(-1)
                if self.rank == 1 and not torch.equal(flat, flat.round()):
                    flat[0] = torch.nextafter(flat[0], flat[0] + 1)
                return tensor
            def release(self):
                pass

        register(BackendSpec(name="split_bits", device="cpu", probe=lambda ctx: None,
                             create=lambda ctx, max_bytes, **kw: SplitBits(ctx)))
    """)
    )
    out = tmp_path / "run"
    env = {
        "ALLREDUCE_AUTOTUNE_PLUGINS": "split_bits",
        "PYTHONPATH": os.pathsep.join([str(plugin), subprocess_path()]),
    }
    proc = run_cli(
        "bench",
        "sweep",
        "--world-size",
        "2",
        "--backends",
        "split_bits,shm_one_shot",
        "-b",
        "1K",
        "-e",
        "2K",
        "--dtypes",
        "bfloat16",
        "--out",
        out,
        *FAST,
        env=env,
    )
    assert proc.returncode in (0, 1), proc.stderr
    frame = read_results(out)
    split = frame[frame["backend"] == "split_bits"]
    assert len(split) == 2 and (split["max_abs_err"] == 0).all()
    assert not split["correct"].any() and not split["same_bits"].any()
    shm = frame[frame["backend"] == "shm_one_shot"]
    assert len(shm) == 2 and shm["correct"].all() and shm["same_bits"].all()
    assert set(shm["numerics"]) <= {"reference", "other"} and shm["max_err_ulp"].notna().all()


def _run_with(path, rows):
    from bench.analysis.results import write_meta

    base = dict.fromkeys(COLUMNS, None)
    base.update(
        run_id="r1",
        hardware_key="cpu-test-2c",
        world_size=2,
        nnodes=1,
        dtype="bfloat16",
        mode="eager",
        iters=5,
        correct=True,
        max_abs_err=0.0,
        same_bits=True,
    )
    with ResultsWriter(path) as writer:
        for row in rows:
            writer.append({**base, "count": row["bytes"] // 2, **row})
    write_meta(path, {"run_id": "r1", "hardware_key": "cpu-test-2c"})


def test_fit_numerics_exact_keeps_the_reference_and_says_so(tmp_path, capsys):
    from tuner.cli import main as tuner_main
    from tuner.runtime.schema import load

    run = tmp_path / "run"
    _run_with(
        run,
        [
            # gloo is faster everywhere but does not follow the reference arithmetic
            *(
                {"backend": "gloo", "bytes": b, "latency_us": 10.0, "numerics": "other"}
                for b in (1024, 2048, 4096)
            ),
            *(
                {"backend": "shm_one_shot", "bytes": b, "latency_us": 20.0, "numerics": "reference"}
                for b in (1024, 2048, 4096)
            ),
        ],
    )
    fast, exact = tmp_path / "any.json", tmp_path / "exact.json"
    assert tuner_main(["fit", str(run), "-o", str(fast), "-q"]) == 0
    assert tuner_main(["fit", str(run), "-o", str(exact), "-q", "--numerics", "exact"]) == 0
    any_table, exact_table = load(fast).tables[0], load(exact).tables[0]
    assert {r.algorithm for r in any_table.rules} == {"gloo"} and any_table.numerics == "any"
    assert {r.algorithm for r in exact_table.rules} == {"shm_one_shot"}
    assert exact_table.numerics == "exact"
    assert json.loads(exact.read_text())["tables"][0]["numerics"] == "exact"
    assert "numerics" not in json.loads(fast.read_text())["tables"][0]
    capsys.readouterr()
    assert tuner_main(["show", str(exact)]) == 0
    assert "numerics exact" in capsys.readouterr().out
    # a file written before the field loads as "any"
    assert load(fast).tables[0].numerics == "any"
