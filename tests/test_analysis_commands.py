"""`bench report --index` and `bench compare`, through parsers built from the modules' own
`add_arguments` (the CLI wires the same functions)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from bench.analysis import compare, index, report
from bench.analysis.stats import geomean
from bench.launch.flags import UsageError

REPO = Path(__file__).resolve().parents[1]
MACHINE = REPO / "results" / "cpu-intel-xeon-processor-2c"
RUN = "20261129-003141-bf16-ws2"


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    """A results folder: one committed run, its machine's thresholds.json, a log beside them,
    an Optuna study (made, not committed) and a README with index markers."""
    root = tmp_path / "results"
    machine = root / MACHINE.name
    shutil.copytree(MACHINE / RUN, machine / RUN, ignore=shutil.ignore_patterns("*.png"))
    shutil.copy(MACHINE / "thresholds.json", machine / "thresholds.json")
    (machine / "notes").mkdir()
    (machine / "notes" / "run.log").write_text("log\n")
    (machine / "notes" / "study.db").write_bytes(b"")
    (root / "README.md").write_text(
        f"# head\n\n{index.BEGIN} generated -->\nold\n{index.END}\ntail\n"
    )
    return root


def test_report_index_writes_between_the_markers(results: Path, capsys) -> None:
    readme = results / "README.md"
    args = _parse(report, ["--index", str(results), "--write", str(readme)])
    assert report.run(args) == 0
    text = readme.read_text()
    assert text.startswith("# head\n\n<!-- index: generated -->\n## Committed runs\n")
    assert text.endswith(f"{index.END}\ntail\n") and "\nold\n" not in text
    rel = f"{MACHINE.name}/{RUN}"
    # the figures --plots draws are linked whether drawn yet or not; gain beside thresholds.json
    assert f"- figures: [busbw]({rel}/busbw.png), [gain]({rel}/gain.png)" in text
    assert "| 2 | bfloat16 | eager | 1K: shm_two_shot 18.5 us vs 380.3 us (x20.5)" in text
    assert f"### [`{MACHINE.name}/thresholds.json`]({MACHINE.name}/thresholds.json)" in text
    assert f"[run.log]({MACHINE.name}/notes/run.log)" in text
    assert "study.db" not in text  # made by a tuner run, never committed evidence
    # without --write the same index is printed (links relative to ROOT)
    assert report.run(_parse(report, ["--index", str(results)])) == 0
    assert capsys.readouterr().out.strip() in text


def test_report_index_plots_draws_every_run(results: Path, capsys) -> None:
    assert report.run(_parse(report, ["--index", str(results), "--plots"])) == 0
    drawn = sorted(p.name for p in (results / MACHINE.name / RUN).glob("*.png"))
    assert drawn == ["busbw.png", "gain.png", "latency.png", "status.png", "winners.png"]
    assert "# figure: " in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["some-run", "--index"], "not both"),
        (["--write", "README.md"], "--write"),
        ([], "run directory"),
    ],
)
def test_report_bad_input_names_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        report.run(_parse(report, argv))


def test_report_index_refuses_a_file_without_markers(results: Path) -> None:
    (results / "README.md").write_text("# no markers\n")
    with pytest.raises(UsageError, match="markers"):
        report.run(_parse(report, ["--index", str(results), "--write", str(results / "README.md")]))


def test_report_names_a_bad_thresholds_file(results: Path) -> None:
    (results / MACHINE.name / "thresholds.json").write_text('{"schema_version": 1}')
    with pytest.raises(UsageError, match="thresholds.json"):
        report.run(_parse(report, ["--index", str(results)]))


def test_geomean_leaves_out_nan_and_says_empty() -> None:
    assert geomean([2.0, 8.0, float("nan"), 0.0]) == pytest.approx(4.0)
    assert geomean([], empty=None) is None


def test_compare_labels_and_baseline() -> None:
    assert compare.short_labels(["shm_one_shot", "shm_two_shot"]) == (
        "shm",
        {"shm_one_shot": "one-shot", "shm_two_shot": "two-shot"},
        {"shm_one_shot": "one", "shm_two_shot": "two"},
    )
    assert compare.short_labels(["nccl"]) == ("", {"nccl": "nccl"}, {"nccl": "nccl"})
    backends = ["gloo", "mpi", "shm_one_shot"]
    assert compare.parse_baseline("best-of:gloo,mpi", backends).label == "best(gloo,mpi)"
    with pytest.raises(ValueError, match="not among"):
        compare.parse_baseline("nccl", backends)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--baseline", "nccl"], "--baseline"),
        (["--backends", "gloo"], "--backends"),
        (["--world-sizes", "2,x"], "--world-sizes"),
        (["-e", "64Q"], "--max-bytes"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_compare_bad_input_names_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        compare.run(_parse(compare, argv))


def test_compare_reads_existing_runs(capsys) -> None:
    runs = sorted(str(p) for p in MACHINE.glob("20261129-002446-shm-vs-gloo-ws*"))
    assert compare.run(_parse(compare, ["--runs", *runs])) == 0
    out = capsys.readouterr().out
    assert "fastest of 3 full sweeps per world size (slowest in brackets)" in out
    assert "| ws | size | gloo (us) | one-shot (us) | two-shot (us) | one/gloo | two/gloo |" in out
    assert "| 2 | 1K | 329.3 (3227) | 10.2 (12) | 19.2 (127) | 0.031 | 0.058 |" in out
    assert (
        "- world size 4: worst best-shm/gloo latency up to 64K = 0.038 (target <= 0.1: met)" in out
    )


@pytest.mark.slow
def test_compare_measures_side_by_side(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    markdown = tmp_path / "compare.md"
    args = _parse(
        compare,
        [
            "--world-sizes",
            "2",
            "--backends",
            "gloo,shm_one_shot",
            "-b",
            "1K",
            "-e",
            "2K",
            "-n",
            "3",
            "-w",
            "1",
            "--out",
            str(tmp_path / "runs"),
            "--markdown",
            str(markdown),
        ],
    )
    assert compare.run(args) == 0
    (run,) = (tmp_path / "runs").glob("*/*-compare-vs-gloo-ws2")
    assert (run / "results.csv").is_file()
    text = markdown.read_text()
    assert text in capsys.readouterr().out  # printed, and written to --markdown
    assert "| ws | size | gloo (us) | shm_one_shot (us) | shm_one_shot/gloo |" in text
    assert "| 2 | 1K |" in text and "| 2 | 2K |" in text
