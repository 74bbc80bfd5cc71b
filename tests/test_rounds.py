"""The sweep's rounds: backends measured side by side in a rotating order, each round's
figure kept, a point's row made of its rounds; backends whose buffers do not fit at once are
measured in groups. Real ranks (2, gloo + shared memory), real files."""

from __future__ import annotations

import json
import os
import statistics
import textwrap

import pandas as pd
import pytest
from rank_tools import subprocess_path

from bench.analysis.results import ROUND_COLUMNS, read_results
from bench.run.rounds import PointRounds, RoundFigure, lacks_memory, per_round, round_order

FAST = ["--timeout", "60", "-q", "--dtypes", "float32"]


def test_round_order_rotates_every_backend_through_every_place():
    names = ["a", "b", "c"]
    orders = [round_order(names, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for name in names:  # each backend leads once, is last once
        assert sorted(order.index(name) for order in orders) == [0, 1, 2]
    assert round_order(names, 3) == names and round_order([], 2) == []


def test_iterations_are_spread_over_the_rounds():
    assert per_round(20, 5) == 4 and per_round(21, 5) == 5 and per_round(5, 5) == 1
    assert per_round(0, 5) == 1  # at least one warm-up call a round
    assert per_round(3, 1) == 3


def test_a_point_is_the_median_of_its_rounds_and_p10_p90_of_every_iteration():
    point = PointRounds()
    rounds = [(10.0, (9.0, 10.0, 11.0)), (30.0, (29.0, 30.0, 31.0)), (12.0, (12.0, 12.0, 12.0))]
    for r, (median, samples) in enumerate(rounds):
        point.add(r, RoundFigure(median, samples, position=r % 2))
    stats = point.stats(nbytes=1000, world_size=2)
    assert stats.latency_us == 12.0  # the middle round, not the mean (17.3)
    pooled = sorted(t for _, samples in rounds for t in samples)
    assert stats.p10_us == pytest.approx(pd.Series(pooled).quantile(0.1))
    assert stats.p90_us == pytest.approx(pd.Series(pooled).quantile(0.9))
    assert stats.algbw_gbps == pytest.approx(1000 / 12.0 / 1e3)
    assert point.missing(4) == [3]


def test_memory_failures_are_told_apart_from_other_reasons():
    assert lacks_memory("create failed: OutOfMemoryError: CUDA out of memory. Tried to ...")
    assert lacks_memory("create failed: OSError: [Errno 28] No space left on device")
    assert not lacks_memory("needs cuda tensors; these ranks run on cpu")
    # a segment /dev/shm cannot hold is a want of memory too (the backends are then grouped)
    from bench.backends.shm_segment import shm_dir_reason

    too_big = shm_dir_reason(1 << 60)
    if too_big is not None and "MiB free" in too_big:  # None: no /dev/shm here at all
        assert lacks_memory(f"create failed: OSError: {too_big}")


def test_every_backend_measures_each_size_in_each_round_side_by_side(run_cli, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "bench",
        "sweep",
        "--world-size",
        "2",
        "--backends",
        "gloo,shm_one_shot,shm_two_shot",
        "-b",
        "1K",
        "-e",
        "4K",
        "--rounds",
        "3",
        "-n",
        "6",
        "--block-ms",
        "0",  # exactly the share of --iters: 2 timed iterations a block
        "--out",
        out,
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rounds = pd.read_csv(out / "rounds.csv")
    assert tuple(rounds.columns) == ROUND_COLUMNS
    results = read_results(out)
    assert len(results) == 9 and results["correct"].all()
    # every point: rounds 0, 1, 2, two timed iterations each (6 over 3 rounds)
    per_point = rounds.groupby(["backend", "bytes"])["round"].apply(sorted)
    assert per_point.map(lambda r: r == [0, 1, 2]).all() and len(per_point) == 9
    assert (rounds["iters"] == 2).all()
    assert rounds["samples_us"].map(lambda s: len(s.split())).eq(2).all()
    # per size and round, the three backends hold places 0, 1, 2; the leader changes per round
    places = rounds.groupby(["bytes", "round"])["position"].apply(sorted)
    assert places.map(lambda p: p == [0, 1, 2]).all()
    leaders = rounds[rounds["position"] == 0].groupby("bytes")["backend"].nunique()
    assert (leaders == 3).all()
    # the point's latency is the median of its round figures; iters the sum of the rounds'
    for row in results.itertuples():
        mine = rounds[(rounds["backend"] == row.backend) & (rounds["bytes"] == row.bytes)]
        assert row.latency_us == pytest.approx(statistics.median(mine["latency_us"]), rel=1e-5)
        assert row.iters == 6
    meta = json.loads((out / "meta.json").read_text())
    assert meta["rounds"] == 3
    assert meta["backend_groups"] == [["gloo", "shm_one_shot", "shm_two_shot"]]
    noise = meta["noise"]
    assert noise["ranks_per_host"] == 2 and noise["cores"] >= 1
    assert len(noise["load_before"]) == 3 and len(noise["load_after"]) == 3
    assert noise["oversubscribed"] == (noise["cores"] < 2)


HUNGRY = textwrap.dedent("""
    # Two backends whose buffers do not fit together: creating one while the other is held
    # fails as a GPU allocation does when memory runs out.
    import torch.distributed as dist
    from bench.backends import register
    from bench.backends.base import BackendSpec

    HELD = []

    class Hungry:
        in_place = True

        def __init__(self, name, ctx):
            if HELD:
                raise RuntimeError(f"CUDA out of memory: {HELD[0]} holds the buffer")
            self.name, self.group = name, ctx.cpu_group
            HELD.append(name)

        def can_take(self, tensor):
            return None

        def all_reduce(self, tensor):
            dist.all_reduce(tensor, group=self.group)
            return tensor

        def release(self):
            HELD.remove(self.name)

    for name in ("hungry_a", "hungry_b"):
        register(BackendSpec(name=name, device="cpu", probe=lambda ctx: None,
                             create=lambda ctx, max_bytes, name=name, **kw: Hungry(name, ctx)))
""")


def test_backends_that_do_not_fit_together_are_measured_in_groups(run_cli, tmp_path):
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "hungry.py").write_text(HUNGRY)
    env = {
        "ALLREDUCE_AUTOTUNE_PLUGINS": "hungry",
        "PYTHONPATH": os.pathsep.join([str(plugin), subprocess_path()]),
    }
    out = tmp_path / "run"
    args = ["--world-size", "2", "--backends", "hungry_a,hungry_b", "-b", "1K", "-e", "2K"]
    proc = run_cli("bench", "sweep", *args, "--rounds", "2", "--out", out, *FAST, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["backend_groups"] == [["hungry_a"], ["hungry_b"]]
    assert "do not fit at once: measuring hungry_b after hungry_a" in proc.stderr
    results = read_results(out)
    assert len(results) == 4 and results["correct"].all()
    rounds = pd.read_csv(out / "rounds.csv")
    assert len(rounds) == 8 and (rounds["position"] == 0).all()  # alone in its group
    # the two groups were never side by side: their rounds never pair
    from bench.analysis.rounds import read_rounds

    seen = read_rounds(out).groupby("backend")["round"].apply(set)
    assert not seen["hungry_a"] & seen["hungry_b"]


def test_a_fast_point_times_more_iterations_in_its_block(run_cli, tmp_path):
    out = tmp_path / "run"
    args = ["--world-size", "2", "--backends", "shm_one_shot", "-b", "1K", "-e", "1K"]
    proc = run_cli("bench", "sweep", *args, "--rounds", "2", "-n", "2", "--out", out, *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rounds = pd.read_csv(out / "rounds.csv")
    # a 1 KiB shm all-reduce takes microseconds: 2 ms of it is far more than 1 iteration, and
    # never more than the cap; the point's row counts every iteration of its rounds
    assert (rounds["iters"] > 1).all() and (rounds["iters"] <= 200).all()
    assert read_results(out)["iters"].iloc[0] == rounds["iters"].sum()
