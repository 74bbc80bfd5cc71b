"""Pure functions: sizes, bandwidths, statistics, inputs, the results file."""

from __future__ import annotations

import csv

import pytest
import torch

from bench.analysis.results import (
    COLUMNS,
    ResultsWriter,
    RunDirLocked,
    SchemaError,
    completed_points,
    read_results,
)
from bench.run.inputs import check_result, fill_input, reference_sum
from bench.run.timing import bandwidths_gbps, summarize
from bench.sizes import format_size, parse_size, size_range


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1K", 1024),
        ("4KiB", 4096),
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("512", 512),
        ("2kb", 2048),
        (" 8 M ", 8 << 20),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "1.5M", "-1K", "12Q", "0", "1KK"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_size_range_and_format():
    assert size_range(1024, 8192, 2) == [1024, 2048, 4096, 8192]
    assert size_range(1024, 5000, 4) == [1024, 4096]
    assert [format_size(s) for s in (1024, 1536, 64 << 20, 1 << 30)] == ["1K", "1536", "64M", "1G"]
    with pytest.raises(ValueError):
        size_range(10, 5)


def test_bandwidths_follow_nccl_tests():
    algbw, busbw = bandwidths_gbps(1_000_000, 10.0, 8)  # 1 MB in 10 us
    assert algbw == pytest.approx(100.0)
    assert busbw == pytest.approx(100.0 * 2 * 7 / 8)
    _, busbw1 = bandwidths_gbps(1_000_000, 10.0, 1)
    assert busbw1 == pytest.approx(100.0)


def test_summarize_median_and_percentiles():
    stats = summarize([float(v) for v in range(1, 102)], 1000, 2)
    assert stats.latency_us == pytest.approx(51.0)
    assert stats.p10_us == pytest.approx(11.0)
    assert stats.p90_us == pytest.approx(91.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8, 128])
def test_inputs_sum_exactly(dtype, world_size):
    count = 1000
    parts = [fill_input(torch.empty(count, dtype=dtype), r, seed=7) for r in range(world_size)]
    total = parts[0].clone()
    for p in parts[1:]:
        total += p  # summed in the low precision, in rank order
    assert check_result(total, 0, world_size, seed=7) == 0.0
    assert any(p.abs().sum() > 0 for p in parts)
    assert not torch.equal(parts[0], parts[-1]) or world_size == 1


def test_check_result_catches_one_wrong_element_and_nan():
    ref = reference_sum(300, 4, seed=3, device=torch.device("cpu")).to(torch.bfloat16)
    assert check_result(ref, 0, 4, 3) == 0.0
    bad = ref.clone()
    bad[123] += 1
    assert check_result(bad, 0, 4, 3) == 1.0
    bad[5] = float("nan")
    assert check_result(bad, 0, 4, 3) == float("inf")
    # the seed matters: another point's reference differs
    assert check_result(ref, 0, 4, 4) > 0


def _row(**kw):
    row = dict.fromkeys(COLUMNS, None)
    row.update(
        run_id="r",
        hardware_key="hk",
        backend="gloo",
        world_size=2,
        nnodes=1,
        dtype="float32",
        bytes=1024,
        count=256,
        mode="eager",
        iters=5,
        latency_us=10.0,
        correct=True,
        max_abs_err=0.0,
    )
    row.update(kw)
    return row


def test_results_writer_appends_and_locks(tmp_path):
    with ResultsWriter(tmp_path) as writer:
        writer.append(_row())
        with pytest.raises(RunDirLocked):
            ResultsWriter(tmp_path)
        writer.append(_row(bytes=2048, latency_us=None, correct=None, skipped_reason="why"))
    with open(tmp_path / "results.csv") as fh:
        assert tuple(next(csv.reader(fh))) == COLUMNS
    frame = read_results(tmp_path)
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 2 and frame["skipped_reason"].iloc[1] == "why"
    assert completed_points(tmp_path) == {
        ("gloo", 2, "float32", 1024, "eager"),
        ("gloo", 2, "float32", 2048, "eager"),
    }
    with ResultsWriter(tmp_path) as writer:  # reopening appends, header once
        writer.append(_row(bytes=4096))
    assert len(read_results(tmp_path)) == 3


def test_results_refuses_wrong_columns(tmp_path):
    (tmp_path / "results.csv").write_text("run_id,backend,speed\nx,gloo,1\n")
    with pytest.raises(SchemaError, match="missing"):
        read_results(tmp_path)
    with pytest.raises(SchemaError):
        ResultsWriter(tmp_path)


FSIZE_CHILD = """
import errno, resource, sys
from bench.analysis.results import ResultsWriter
sys.path.insert(0, sys.argv[2])
from test_units import _row

writer = ResultsWriter(sys.argv[1])
limit = writer.path.stat().st_size + 500  # room for about three rows, then EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
for n in range(100):
    try:
        writer.append(_row(bytes=1024 * (n + 1)))
    except OSError as exc:
        print(errno.errorcode[exc.errno], writer.rows, limit)
        break
"""


def test_a_row_that_cannot_be_written_whole_is_cut_off(tmp_path, subprocess_env):
    """A file-size limit (RLIMIT_FSIZE) stops a row half-way: the writer raises the OS error
    and cuts the half row off, so the table ends with its last whole row."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_CHILD, str(tmp_path), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    code, rows, limit = proc.stdout.split()
    assert code == "EFBIG" and 1 <= int(rows) < 10, proc.stdout + proc.stderr
    data = (tmp_path / "results.csv").read_bytes()
    assert data.endswith(b"\n") and len(data) <= int(limit)
    assert len(read_results(tmp_path)) == int(rows) == data.count(b"\n") - 1


def test_a_removed_table_is_noticed_and_written_again(tmp_path):
    from bench.analysis.results import TableRemoved, count_rows

    run = tmp_path / "run"
    with ResultsWriter(run) as writer:
        writer.append(_row())
        kept = (run / "results.csv").read_bytes()
        (run / "results.csv").unlink()
        with pytest.raises(TableRemoved):
            writer.append(_row(bytes=2048))
        writer.restore()
        assert (run / "results.csv").read_bytes().startswith(kept)
        assert count_rows(run) == writer.rows == 2
        writer.append(_row(bytes=4096))
    assert count_rows(run) == 3 and len(read_results(run)) == 3


def test_a_half_written_row_is_left_out_when_read(tmp_path):
    from bench.analysis.results import count_rows

    with ResultsWriter(tmp_path) as writer:
        writer.append(_row())
        writer.append(_row(bytes=2048))
    data = (tmp_path / "results.csv").read_bytes()
    (tmp_path / "results.csv").write_bytes(data[:-25])  # a crash in the middle of a row
    assert len(read_results(tmp_path)) == count_rows(tmp_path) == 1
    assert completed_points(tmp_path) == {("gloo", 2, "float32", 1024, "eager")}


def test_a_row_cut_short_before_a_newline_is_never_kept(tmp_path):
    """A row cut mid-way that still ends in a newline (and one glued onto the next) is left
    out by every reader and dropped when the table is reopened, so the point measured again
    is its only row (issue 21)."""
    from bench.analysis.results import count_rows

    with ResultsWriter(tmp_path) as writer:
        writer.append(_row())
        writer.append(_row(bytes=2048))
        writer.append(_row(bytes=4096, latency_us=None, correct=None, skipped_reason="why"))
    lines = (tmp_path / "results.csv").read_bytes().splitlines(keepends=True)
    cut_row = lines[2][: len(lines[2]) // 2] + b"\n"
    cut_reason = lines[3][: lines[3].rindex(b",") + 1] + b"\r\n"  # says neither latency nor why
    (tmp_path / "results.csv").write_bytes(lines[0] + lines[1] + cut_row + cut_reason)
    assert completed_points(tmp_path) == {("gloo", 2, "float32", 1024, "eager")}
    assert len(read_results(tmp_path)) == count_rows(tmp_path) == 1
    with ResultsWriter(tmp_path) as writer:
        assert writer.dropped == 2 and writer.rows == 1
        writer.append(_row(bytes=2048))
    frame = read_results(tmp_path)
    assert sorted(frame["bytes"]) == [1024, 2048]
    glued = lines[1][:-10] + lines[2]  # a row with more fields than columns
    (tmp_path / "results.csv").write_bytes(lines[0] + glued + lines[3])
    assert completed_points(tmp_path) == {("gloo", 2, "float32", 4096, "eager")}


def test_a_cell_of_the_wrong_kind_is_refused_naming_line_and_column(tmp_path):
    with ResultsWriter(tmp_path) as writer:
        writer.append(_row())
    text = (tmp_path / "results.csv").read_text().replace(",1024,", ",big,")
    (tmp_path / "results.csv").write_text(text)
    for read in (completed_points, read_results, ResultsWriter):
        with pytest.raises(SchemaError, match="line 2: bytes: expected a whole number"):
            read(tmp_path)


def test_a_finished_writer_leaves_no_lock_and_a_new_run_claims_the_directory(tmp_path):
    from bench.analysis.results import RunDirTaken, count_rows

    with ResultsWriter(tmp_path, claim=True) as writer:
        assert (tmp_path / ".lock").exists()
        writer.append(_row())
    assert not (tmp_path / ".lock").exists()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RunDirTaken, match="already holds a run"):
        ResultsWriter(tmp_path, claim=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with ResultsWriter(tmp_path) as writer:  # a resume appends
        writer.append(_row(bytes=2048))
    assert count_rows(tmp_path) == 2


def test_meta_of_the_wrong_shape_is_refused_naming_the_field(tmp_path):
    from bench.analysis.results import read_meta

    for text, field in (
        ("[]", "expected a JSON object"),
        ('{"arguments": []}', "arguments: expected an object"),
        ('{"fingerprint": {"gpu": {"gpus": 3}}}', "fingerprint.gpu.gpus: expected a list"),
    ):
        (tmp_path / "meta.json").write_text(text)
        with pytest.raises(SchemaError, match=field):
            read_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"run_id": "r", "arguments": null}')
    assert read_meta(tmp_path)["run_id"] == "r"
