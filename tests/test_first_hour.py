"""What a newcomer meets in the first hour (issue 20): their runs kept apart from the reference
data, a default sweep of what this machine can run, figures that compare like with like, a
sweep that measured nothing failing, a table from the default sweep loading without warnings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from bench.analysis import plots
from bench.analysis.results import ResultsWriter, write_meta
from bench.launch.config import RUNS_ROOT, left_out_line, parse_sweep_config

REPO = Path(__file__).resolve().parents[1]
KEY = "cpu-test-2c"


def test_runs_go_where_the_reference_data_does_not() -> None:
    assert RUNS_ROOT == "runs"
    assert f"/{RUNS_ROOT}/" in (REPO / ".gitignore").read_text().splitlines()


def test_the_default_sweep_measures_what_can_run_here() -> None:
    from bench import backends as registry

    cfg = parse_sweep_config(["--world-size", "2", "--device", "cpu"])
    assert "gloo" in cfg.backends
    assert not {"nccl", "pynccl", "custom_one_shot"} & set(cfg.backends)  # GPU ones: left out
    assert {"nccl", "pynccl", "custom_one_shot"} <= set(cfg.left_out)
    assert set(cfg.backends) | set(cfg.left_out) == set(registry.known_names())
    line = left_out_line(cfg.left_out)
    assert "\n" not in line and "--backends all" in line and "--device cuda" in line
    # named explicitly, or all: every one is kept, to be recorded as skipped rows
    assert parse_sweep_config(["--world-size", "2", "--backends", "all"]).backends == (
        registry.known_names()
    )
    explicit = parse_sweep_config(["--world-size", "2", "--backends", "nccl"])
    assert explicit.backends == ["nccl"] and explicit.left_out == {}


def test_the_mpi_peer_counts_as_runnable_under_mpirun_before_launch() -> None:
    from bench.peers import installed

    if not installed("mpi4py"):
        pytest.skip("mpi4py is not installed here")
    torchrun = parse_sweep_config(["--world-size", "2", "--device", "cpu"])
    mpirun = parse_sweep_config(["--world-size", "2", "--device", "cpu", "--launcher", "mpirun"])
    assert "mpi" in torchrun.left_out and "mpi" in mpirun.backends


def test_a_sweep_that_measured_nothing_exits_non_zero(tmp_path, run_cli) -> None:
    proc = run_cli(
        "bench", "sweep", "--world-size", "2", "--device", "cpu", "--backends", "nccl",
        "-b", "1K", "-e", "1K", "--dtypes", "float32", "-q", "--out", tmp_path / "run",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bench: error:")]
    assert len(errors) == 1 and "no point was measured" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _row(backend: str, nbytes: int, latency_us: float | None, run_id: str = "r1") -> dict:
    return dict(
        run_id=run_id, hardware_key=KEY, backend=backend, world_size=2, nnodes=1,
        dtype="float32", bytes=nbytes, count=nbytes // 4, mode="eager", iters=5,
        latency_us=latency_us, p10_us=latency_us, p90_us=latency_us,
        algbw_gbps=latency_us and 1.0, busbw_gbps=latency_us and 1.0,
        correct=None if latency_us is None else True,
        max_abs_err=None if latency_us is None else 0.0,
        skipped_reason=None if latency_us is not None else "needs a CUDA GPU",
    )  # fmt: skip


SIZES = [1024, 4096, 16384, 65536]


def _frame(skip_nccl: bool = True) -> pd.DataFrame:
    rows = []
    for nbytes in SIZES:
        rows.append(_row("gloo", nbytes, 100.0))
        rows.append(_row("shm_one_shot", nbytes, 10.0))
        if skip_nccl:
            rows.append(_row("nccl", nbytes, None))
    return pd.DataFrame(rows)


def test_the_baseline_is_the_default_that_was_measured() -> None:
    assert plots.default_baseline(_frame(skip_nccl=True)) == "gloo"  # skipped rows: not nccl
    measured = pd.concat([_frame(), pd.DataFrame([_row("nccl", 1024, 50.0)])])
    assert plots.default_baseline(measured) == "nccl"


def test_gains_and_the_oracle_cover_the_same_points() -> None:
    frame = _frame()

    def table(world_size, dtype, mode, nbytes):  # routes the large sizes to an unmeasured peer
        return "shm_one_shot" if nbytes <= 4096 else "mpi"

    gains = plots.gain_table(frame, {"T.json": table}, "gloo")
    unmeasured = gains[(gains["choice"] == "T.json") & gains["gain"].isna()]
    assert sorted(unmeasured["bytes"]) == [16384, 65536]  # reported, not dropped
    assert set(unmeasured["note"]) == {"picks mpi, not measured correctly in this run"}
    fig = plots.plot_gain(gains)
    title = fig._suptitle.get_text()
    assert "T.json picks mpi" in title and "(2 points)" in title
    lines = {
        line.get_label(): list(line.get_xdata())
        for ax in fig.axes
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }
    assert lines and all(sizes == [1024, 4096] for sizes in lines.values()), lines


def _thresholds(path: Path, run_ids: list[str]) -> Path:
    table = {
        "hardware_key": KEY, "world_size": 2, "dtype": "float32", "mode": "eager",
        "rules": [{"max_bytes": None, "algorithm": "shm_one_shot"}],
        "max_size": {"shm_one_shot": 65536},
        "evidence": {"run_id": ",".join(run_ids), "run_ids": run_ids, "points": 4,
                     "regret_vs_oracle": 0.0, "gain_vs_nccl_geomean": None},
    }  # fmt: skip
    path.write_text(json.dumps({"schema_version": 1, "generated_by": {}, "tables": [table]}))
    return path


def _run(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    run = tmp_path / KEY / "mine"
    with ResultsWriter(run) as writer:
        for row in _frame().to_dict("records"):
            writer.append({k: (None if isinstance(v, float) and math.isnan(v) else v)
                           for k, v in row.items()})  # fmt: skip
    write_meta(run, {"run_id": "r1", "hardware_key": KEY, "arguments": {"device": "cpu"}})
    from bench.analysis.results import read_results

    return run, read_results(run)


def test_a_table_is_used_only_when_named_or_fitted_from_the_run(tmp_path) -> None:
    run, frame = _run(tmp_path)
    other = _thresholds(tmp_path / KEY / "thresholds.json", ["someone-else"])
    assert plots.run_thresholds(run, frame) == (None, None)  # beside it, fitted on other runs
    assert "gain" not in plots.figure_names(run, frame)
    named, tables = plots.run_thresholds(run, frame, other)
    assert named == other and tables
    assert "gain" in plots.figure_names(run, frame, thresholds=other)
    fitted = _thresholds(run / "thresholds.json", ["r1"])
    assert plots.run_thresholds(run, frame)[0] == fitted


def test_report_names_the_table_in_the_figure_and_the_output(tmp_path, capsys) -> None:
    from bench.cli import main

    run, _ = _run(tmp_path)
    table = _thresholds(tmp_path / "T.json", ["someone-else"])
    assert main(["report", str(run), "--plots"]) == 0
    assert "# no gain figure" in capsys.readouterr().out and not (run / "gain.png").exists()
    assert main(["report", str(run), "--plots", "--thresholds", str(table)]) == 0
    out = capsys.readouterr().out
    assert f"# rules compared: {table}" in out and (run / "gain.png").is_file()


def test_tuner_show_states_reuse_and_fits_long_params(tmp_path) -> None:
    from tuner.runtime.schema import Rule, Table, Thresholds
    from tuner.table.show import table_lines

    params = {"chunk_bytes": 4194304, "native": -1, "spin": -1, "threads": -1, "yield_us": -1}
    rules = (Rule(65536, "shm_one_shot", params), Rule(None, "gloo"))
    evidence = {"run_id": "r1", "points": 4, "regret_vs_oracle": 0.0}
    tables = tuple(
        Table(KEY, 2, dtype, "eager", rules, {"shm_one_shot": 65536}, evidence)
        for dtype in ("bfloat16", "float32")
    )
    lines = table_lines(Thresholds(tables=tables))
    head = next(line for line in lines if "algorithm" in line)
    rule = next(line for line in lines if "shm_one_shot" in line and "yield_us=-1" in line)
    assert head.index("max_size") + len("max_size") == len(rule)  # right column stays aligned
    assert any("float16 eager follows the bfloat16 eager rules" in line for line in lines)
