"""bench.analysis.plots on small synthetic runs: the numbers behind the figures, and the PNG files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

from bench.analysis import plots
from bench.analysis.results import ResultsWriter, busbw_factor, read_results, write_meta
from bench.cli import main

KEY = "cpu-test-2c"
SIZES = [1024 * 4**i for i in range(6)]  # 1K .. 1M


def _row(
    backend: str,
    nbytes: int,
    latency_us: float | None,
    dtype: str = "float32",
    correct: bool | None = True,
    reason: str = "",
    world_size: int = 2,
) -> dict:
    algbw = nbytes / latency_us / 1e3 if latency_us else None
    return dict(
        run_id="r1",
        hardware_key=KEY,
        backend=backend,
        world_size=world_size,
        nnodes=1,
        dtype=dtype,
        bytes=nbytes,
        count=nbytes // 4,
        mode="eager",
        iters=5,
        latency_us=latency_us,
        p10_us=latency_us and latency_us * 0.9,
        p90_us=latency_us and latency_us * 1.2,
        algbw_gbps=algbw,
        busbw_gbps=algbw and algbw * busbw_factor(world_size),
        correct=None if latency_us is None else correct,
        max_abs_err=None if latency_us is None else (0.0 if correct else 3.0),
        skipped_reason=reason,
    )


def _rows() -> list[dict]:
    rows = []
    for nbytes in SIZES:
        rows.append(_row("gloo", nbytes, 100.0 + nbytes / 1000))  # flat then slow
        rows.append(_row("shm_one_shot", nbytes, 10.0 + nbytes / 200))  # fast then slower
        rows.append(_row("shm_two_shot", nbytes, None, reason="world size 2: use one-shot"))
    rows[4]["correct"], rows[4]["max_abs_err"] = False, 3.0  # shm_one_shot at 4K: wrong sum
    return rows


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    machine = tmp_path / KEY
    run = machine / "r1"
    with ResultsWriter(run) as writer:
        for row in _rows():
            writer.append(row)
    write_meta(
        run,
        {
            "fingerprint": {"hardware_key": KEY, "cpu": {"model": "test", "cores": 2}},
            "arguments": {"device": "cpu"},
        },
    )
    (machine / "thresholds.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "generated_by": {"tool": "test"},
                "tables": [
                    {
                        "hardware_key": KEY,
                        "world_size": 2,
                        "dtype": "float32",
                        "mode": "eager",
                        "rules": [
                            {"max_bytes": 16384, "algorithm": "shm_one_shot"},
                            {"max_bytes": None, "algorithm": "gloo"},
                        ],
                        "max_size": {"shm_one_shot": 16384},
                        "evidence": {
                            "run_id": "r1",
                            "points": 18,
                            "regret_vs_oracle": 0.0,
                            "gain_vs_nccl_geomean": None,
                        },
                    }
                ],
            }
        )
    )
    return run


def test_winners_and_crossovers(run_dir: Path) -> None:
    frame = read_results(run_dir)
    best = plots.winners(frame).set_index("bytes")
    # the wrong 4K row of shm_one_shot never wins
    assert best.loc[4096, "backend"] == "gloo"
    assert best.loc[1024, "backend"] == "shm_one_shot"
    assert best.loc[1024, "runner_up"] == "gloo"
    assert best.loc[1024, "margin"] == pytest.approx((100 + 1.024) / (10 + 1024 / 200))
    # 1K shm, 4K gloo (wrong shm), 16K shm, 64K.. gloo
    cross = plots.crossovers(frame)
    assert list(zip(cross.from_backend, cross.to_backend, cross.last_bytes, strict=True)) == [
        ("shm_one_shot", "gloo", 1024),
        ("gloo", "shm_one_shot", 4096),
        ("shm_one_shot", "gloo", 16384),
    ]


def test_rules_and_gain(run_dir: Path) -> None:
    frame = read_results(run_dir)
    tables = plots.tables_by_group(run_dir.parent / "thresholds.json", KEY)
    tuned = plots.table_chooser(tables)
    assert [tuned(2, "float32", "eager", s) for s in (1, 16384, 16385)] == [
        "shm_one_shot",
        "shm_one_shot",
        "gloo",
    ]
    assert tuned(4, "float32", "eager", 1) is None  # no table: no opinion
    assert plots.tables_by_group(run_dir.parent / "thresholds.json", "other-machine") == {}
    assert plots.default_baseline(frame) == "gloo"

    gains = plots.gain_table(frame, {"tuned": tuned}, "gloo").set_index(["choice", "bytes"])
    assert gains.loc[("tuned", 1024), "gain"] == pytest.approx((100 + 1.024) / (10 + 5.12))
    assert gains.loc[("tuned", 1048576), "gain"] == pytest.approx(1.0)
    assert math.isnan(gains.loc[("tuned", 4096), "gain"])  # picks the wrong row: no gain
    assert "not measured correctly" in gains.loc[("tuned", 4096), "note"]
    assert (gains.xs("oracle")["gain"] >= 1.0).all()
    assert plots.geomean([2.0, 8.0, float("nan")]) == pytest.approx(4.0)


def test_status_hides_nothing(run_dir: Path) -> None:
    status = plots.status_table(read_results(run_dir)).set_index("backend")
    assert status.loc["shm_one_shot", "WRONG"] == 1
    assert status.loc["shm_one_shot", "correct"] == len(SIZES) - 1
    assert status.loc["shm_two_shot", "skipped"] == len(SIZES)
    assert status.loc["shm_two_shot", "reasons"] == "world size 2: use one-shot"


def test_hardware_limit() -> None:
    limit, why = plots.hardware_limit({"fingerprint": {"hardware_key": KEY}})
    assert limit is None and "CPU" in why
    gpu = {"gpus": [{"name": "NVIDIA H200"}] * 8}
    limit, why = plots.hardware_limit(
        {"fingerprint": {"hardware_key": "nvidia-h200-x8-nvlink", "gpu": gpu}}
    )
    assert limit == 450.0 and "NVLink" in why
    limit, why = plots.hardware_limit(
        {"fingerprint": {"hardware_key": "nvidia-h200-x1-single", "gpu": gpu}}
    )
    assert limit is None and "single" in why


def test_study_and_pareto_figures() -> None:
    trials = pd.DataFrame(
        {"number": [0, 1, 2, 3], "value": [3.0, 2.0, None, 2.5], "study": ["ws2"] * 4}
    )
    assert isinstance(plots.plot_convergence(trials), Figure)
    many = pd.DataFrame(
        {
            "number": [0, 1] * 20,
            "value": [2.0, 1.0] * 20,
            "study": [f"s{i // 2}" for i in range(40)],
        }
    )
    assert isinstance(plots.plot_convergence(many, relative=True), Figure)
    points = pd.DataFrame(
        {"memory_bytes": [0, 1 << 20, 1 << 22, 1 << 21], "regret": [0.5, 0.1, 0.0, 0.2]}
    )
    assert isinstance(plots.plot_pareto(points), Figure)
    assert isinstance(plots.plot_pareto(points.iloc[:0]), Figure)


def test_report_plots_writes_pngs(run_dir: Path, capsys) -> None:
    # the run has a wrong row: report exits 1, and still writes every figure
    assert main(["report", str(run_dir), "--plots"]) == 1
    printed = capsys.readouterr().out
    for name in ("latency", "busbw", "winners", "status", "gain"):
        path = run_dir / f"{name}.png"
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG", name
        assert f"# figure: {path}" in printed
    assert plots.find_runs(run_dir.parent.parent) == [run_dir]
    assert set(plots.load_runs(run_dir.parent)["run_dir"]) == {str(run_dir)}
