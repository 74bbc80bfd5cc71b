"""The tuner's command line as a user runs it: live on CPU with a small grid, fit / show /
export on a real sweep, and one-line refusals of bad input (exit 2, no traceback)."""

from __future__ import annotations

import json

import pytest

from tuner.runtime.schema import load


@pytest.mark.slow
def test_live_on_cpu_with_a_small_grid(run_cli, tmp_path):
    from bench.backends import get_spec

    knobs = get_spec("shm_one_shot").knobs  # every knob but chunk_bytes fixed at its default
    fixed = {k: v[0] for k, v in knobs.items() if k != "chunk_bytes"}
    out = tmp_path / "T.json"
    params = [f"--param=shm_one_shot.{k}={v}" for k, v in fixed.items()]
    result = run_cli(
        "tuner",
        "live",
        "--world-size",
        "2",
        "--backends",
        "gloo,shm_one_shot",
        "-b",
        "1K",
        "-e",
        "16K",
        "-f",
        "4",
        "--dtypes",
        "float32",
        "-n",
        "4",
        "-w",
        "1",
        "--rounds",
        "2",
        *params,
        "-o",
        out,
        "--patience",
        "2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    thresholds = load(out)
    (table,) = thresholds.tables
    assert table.world_size == 2 and table.evidence["source"] == "live"
    assert {r.algorithm for r in table.rules} <= {"gloo", "shm_one_shot"}
    summary = json.loads((tmp_path / "T.live.json").read_text())
    assert (tmp_path / "T.study.db").is_file()
    (group,) = summary["groups"]
    assert [p["nbytes"] for p in group["points"]] == [1024, 4096, 16384]
    grid = 1 + len(knobs["chunk_bytes"])  # gloo + shm_one_shot x chunk sizes
    for point in group["points"]:
        assert point["grid"] == grid
        assert 1 <= point["measured"] <= point["grid"]
        assert point["best"] is not None
        if point["best"][0] == "shm_one_shot":
            assert all(point["best"][1][k] == v for k, v in fixed.items())
    assert f"configurations measured of {3 * grid} in the grid" in result.stdout


def _tuner(capsys, *args) -> tuple[int, str, str]:
    """The tuner's CLI in this process (the same entry point as the console script)."""
    from tuner.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_fit_show_export_on_a_real_sweep(run_cli, tmp_path, capsys):
    run = tmp_path / "run"
    sweep = run_cli(
        "bench",
        "sweep",
        "--world-size",
        "2",
        "--backends",
        "gloo,shm_one_shot,shm_two_shot",
        "-b",
        "1K",
        "-e",
        "64K",
        "-f",
        "4",
        "--dtypes",
        "float32",
        "-n",
        "4",
        "-w",
        "1",
        "--out",
        run,
        "-q",
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    out, db, pareto = tmp_path / "T.json", tmp_path / "s.db", tmp_path / "p.csv"
    code, stdout, err = _tuner(capsys, "fit", run, "-o", out, "--study-db", db, "--pareto", pareto)
    assert code == 0, err
    assert "Pareto front" in stdout and "regret vs oracle" in stdout
    (table,) = load(out).tables
    assert table.evidence["points"] == 12 and table.evidence["baseline"] == "gloo"
    assert pareto.read_text().startswith("hardware_key,world_size,dtype,mode,label,memory_bytes")
    code, stdout, _ = _tuner(capsys, "fit", run, "-o", out, "--study-db", db)
    assert "0 trials added, 12 already in the study" in stdout
    code, stdout, _ = _tuner(capsys, "show", out)
    assert code == 0 and "world_size 2  float32  eager" in stdout
    code, stdout, _ = _tuner(capsys, "export", "--format", "vllm", out)
    assert code == 0 and "(tables for float32, eager)" in stdout
    # --backends: the rows of the others are left out (an experiment's own variants)
    code, stdout, err = _tuner(capsys, "fit", run, "-o", out, "--backends", "gloo,shm_two_shot")
    assert code == 0, err
    (table,) = load(out).tables
    assert table.evidence["points"] == 8
    assert {r.algorithm for r in table.rules} <= {"gloo", "shm_two_shot"}
    code, _, err = _tuner(capsys, "fit", run, "-o", out, "--backends", "mpi")
    assert code == 2 and "of --backends mpi" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["fit", "/nonexistent/run", "-o", "T.json"], "RUN_DIR: /nonexistent/run: not a run"),
        (["show", "/nonexistent.json"], "no such file"),
        (["export", "--format", "csv", "x.json"], "--format: expected vllm"),
        (["fit", "."], "-o/--output"),
        (["live", "--world-size", "2", "-o", "T.json", "--patience", "0"], "--patience: expected"),
        (["live", "--world-size", "2", "-o", "T.json", "--dtypes", "int3"], "--dtypes: unknown"),
        (["live", "--world-size", "2", "-o", "T.json", "--out", "x"], "--out: not used"),
        (["bogus"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _tuner(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_the_console_script_refuses_in_one_line(run_cli, tmp_path):
    bad = tmp_path / "T.json"
    bad.write_text('{"schema_version": 1, "generated_by": {}, "tables": [{}]}')
    result = run_cli("tuner", "show", bad)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip() == f"tuner: error: {bad}: tables[0].hardware_key: missing "
        "(required field)"
    )


def test_bad_workload_is_refused(capsys, tmp_path):
    hist = tmp_path / "w.csv"
    hist.write_text("size,n\n1K,3\n")
    (tmp_path / "run").mkdir()
    code, _, err = _tuner(
        capsys, "fit", tmp_path / "run", "-o", tmp_path / "T.json", "--workload", hist
    )
    assert code == 2 and "--workload" in err and "expected columns bytes,count" in err


def test_tuner_live_states_no_search_default_of_its_own(tmp_path):
    """The search's defaults live in SearchOptions only: tuner live passes on what the command
    line gives, nothing else (issue 22)."""
    from tuner.search.live import LiveOptions, parse_live
    from tuner.search.options import SearchOptions

    base = ["--world-size", "2", "-o", str(tmp_path / "T.json")]
    _, opts = parse_live(base)
    assert opts.search == {}
    assert opts.cache_backends == LiveOptions("", "").cache_backends
    options = SearchOptions(**opts.search, run_id=opts.run_id, exhaustive=opts.grid)
    assert options.patience == SearchOptions().patience
    _, opts = parse_live([*base, "--patience", "7", "--budget-fraction", "none", "--seed", "0"])
    assert opts.search == {"patience": 7, "budget_fraction": None, "seed": 0}
