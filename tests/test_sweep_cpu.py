"""`bench sweep` end to end on CPU, as a user runs it: real ranks, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
from rank_tools import subprocess_path

from bench.analysis.results import COLUMNS, POINT_KEY, read_results

FAST = ["--iters", "3", "--warmup", "1", "--timeout", "60", "-q"]


def test_sweep_two_ranks_gloo_every_dtype(run_cli, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "bench",
        "sweep",
        "--world-size",
        "2",
        "--backends",
        "gloo",
        "-b",
        "1K",
        "-e",
        "16K",
        "--dtypes",
        "float32,bfloat16,float16",
        "--out",
        out,
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr
    frame = read_results(out)
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 5 * 3
    assert frame["correct"].all() and (frame["max_abs_err"] == 0).all()
    assert set(frame["bytes"]) == {1024, 2048, 4096, 8192, 16384}
    assert (frame["world_size"] == 2).all() and (frame["nnodes"] == 1).all()
    assert (frame["p10_us"] <= frame["latency_us"]).all()
    assert (frame["latency_us"] <= frame["p90_us"]).all()
    # busbw = algbw * 2(n-1)/n, algbw = bytes / latency
    assert frame["busbw_gbps"].to_numpy() == pytest.approx(frame["algbw_gbps"].to_numpy())
    assert frame["algbw_gbps"].to_numpy() == pytest.approx(
        (frame["bytes"] / frame["latency_us"] / 1e3).to_numpy(), rel=1e-4
    )
    assert (
        frame["count"] * frame["dtype"].map({"float32": 4, "bfloat16": 2, "float16": 2})
        == frame["bytes"]
    ).all()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["hardware_key"] == frame["hardware_key"].iloc[0]
    assert meta["fingerprint"]["cpu"]["cores"] >= 1 and "finished" in meta
    assert "busbw" in proc.stdout and "gloo" in proc.stdout  # the nccl-tests-like table


def test_sweep_four_ranks_and_graph_mode_skips_on_cpu(run_cli, tmp_path):
    out = tmp_path / "run4"
    proc = run_cli(
        "bench",
        "sweep",
        "--world-size",
        "4",
        "--backends",
        "gloo",
        "-b",
        "4K",
        "-e",
        "8K",
        "--dtypes",
        "float32",
        "--modes",
        "eager,graph",
        "--out",
        out,
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr
    frame = read_results(out)
    eager = frame[frame["mode"] == "eager"]
    graph = frame[frame["mode"] == "graph"]
    assert len(eager) == 2 and eager["correct"].all() and (eager["world_size"] == 4).all()
    assert len(graph) == 2 and graph["latency_us"].isna().all()
    assert graph["skipped_reason"].str.contains("CUDA").all()


def test_resume_measures_only_missing_points(run_cli, tmp_path):
    args = [
        "--world-size",
        "2",
        "--backends",
        "gloo",
        "-b",
        "1K",
        "-e",
        "32K",
        "--dtypes",
        "float32",
        *FAST,
    ]
    from bench.launch.config import parse_sweep_config
    from bench.run.worker import point_plan

    # the points a whole sweep writes, from its plan (a second sweep to learn them: waste)
    planned = sorted((b, "2", d, str(n), m) for b, d, m, n in point_plan(parse_sweep_config(args)))
    part = tmp_path / "part"
    assert run_cli("bench", "sweep", *args, "--out", part).returncode == 0
    lines = (part / "results.csv").read_text().splitlines(keepends=True)
    (part / "results.csv").write_text("".join(lines[:3]))  # as if killed after 2 points
    kept = pd.read_csv(part / "results.csv")
    proc = run_cli("bench", "sweep", *args, "--resume", part)
    assert proc.returncode == 0, proc.stderr
    resumed = read_results(part)
    keys = lambda f: sorted(map(tuple, f[list(POINT_KEY)].astype(str).to_numpy()))  # noqa: E731
    assert keys(resumed) == planned
    assert len(resumed) == len(set(keys(resumed)))
    # the rows measured before the interruption are untouched
    assert resumed["latency_us"].iloc[:2].tolist() == pytest.approx(kept["latency_us"].tolist())
    assert resumed["run_id"].nunique() == 1

    # a run measured on another machine is not continued here: one line, nothing written
    meta = json.loads((part / "meta.json").read_text())
    here = meta["hardware_key"]
    meta["hardware_key"] = "gpu-elsewhere-8x"
    (part / "meta.json").write_text(json.dumps(meta))
    (part / "results.csv").write_text("".join(lines[:3]))
    before = (part / "results.csv").read_bytes()
    proc = run_cli("bench", "sweep", *args, "--resume", part)
    assert proc.returncode == 2, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "gpu-elsewhere-8x" in line]
    assert len(said) == 1 and here in said[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert (part / "results.csv").read_bytes() == before
    assert json.loads((part / "meta.json").read_text())["hardware_key"] == "gpu-elsewhere-8x"


def test_worker_under_users_own_torchrun(tmp_path, subprocess_env):
    out = tmp_path / "trun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "bench.run.worker",
        "--world-size",
        "2",
        "--backends",
        "gloo",
        "-b",
        "1K",
        "-e",
        "2K",
        "--dtypes",
        "float32",
        "--out",
        str(out),
        *FAST,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    frame = read_results(out)
    assert len(frame) == 2 and frame["correct"].all()


def test_wrong_sum_is_reported_loudly(run_cli, tmp_path):
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "broken_sum.py").write_text(
        textwrap.dedent("""
        import torch.distributed as dist
        from bench.backends import register
        from bench.backends.base import BackendSpec

        class OffByOne:
            name, in_place = "broken_sum", True
            def __init__(self, ctx):
                self.group = ctx.cpu_group
            def can_take(self, tensor):
                return None
            def all_reduce(self, tensor):
                dist.all_reduce(tensor, group=self.group)
                tensor.view(-1)[-1] += 1  # one wrong element
                return tensor
            def release(self):
                pass

        register(BackendSpec(name="broken_sum", device="cpu", probe=lambda ctx: None,
                             create=lambda ctx, max_bytes, **kw: OffByOne(ctx)))
    """)
    )
    out = tmp_path / "bad"
    env = {
        "ALLREDUCE_AUTOTUNE_PLUGINS": "broken_sum",
        "PYTHONPATH": os.pathsep.join([str(plugin), subprocess_path()]),
    }
    proc = run_cli(
        "bench",
        "sweep",
        "--world-size",
        "2",
        "--backends",
        "broken_sum,gloo",
        "-b",
        "1K",
        "-e",
        "2K",
        "--dtypes",
        "float32",
        "--out",
        out,
        *FAST,
        env=env,
    )
    assert proc.returncode == 1
    assert "WRONG SUM" in proc.stdout and "broken_sum" in proc.stdout
    frame = read_results(out)
    broken = frame[frame["backend"] == "broken_sum"]
    assert len(broken) == 2 and not broken["correct"].any()
    assert (broken["max_abs_err"] == 1).all()
    assert frame[frame["backend"] == "gloo"]["correct"].all()
