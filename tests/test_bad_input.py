"""Bad input to `bench` and `tuner`: each case exits 2 with one line on stderr naming the problem,
no traceback, and nothing written or lost (the whole scratch tree is compared before and after).

Cases run in-process through each CLI's `main` (fast); a few also run as real processes to check
the exit code and stderr a user sees. The last test prints how many distinct inputs are covered.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench.analysis.results import COLUMNS, ResultsWriter, write_meta

REPO = Path(__file__).resolve().parents[1]

Build = Callable[[Path], list[str]]


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    program: str  # bench or tuner
    build: Build  # scratch dir -> argv (creating whatever files the case needs)
    names: str  # text the one stderr line must contain (the flag, field or file)


# ------------------------------------------------------------------------ scratch files
ROW = {
    "run_id": "r1",
    "hardware_key": "cpu-test-2c",
    "backend": "gloo",
    "world_size": 2,
    "nnodes": 1,
    "dtype": "float32",
    "bytes": 1024,
    "count": 256,
    "mode": "eager",
    "iters": 5,
    "latency_us": 30.0,
    "p10_us": 29.0,
    "p90_us": 31.0,
    "algbw_gbps": 0.03,
    "busbw_gbps": 0.03,
    "correct": True,
    "max_abs_err": 0.0,
    "same_bits": None,  # numerics unknown, as in runs made before they were measured
    "numerics": None,
    "max_err_ulp": None,
    "skipped_reason": None,
}


def run_dir(tmp: Path, name: str = "run") -> Path:
    """A small, valid run directory (two gloo rows)."""
    path = tmp / name
    with ResultsWriter(path) as writer:
        writer.append(ROW)
        writer.append({**ROW, "bytes": 2048, "count": 512, "latency_us": 31.0})
    write_meta(path, {"run_id": "r1", "hardware_key": "cpu-test-2c"})
    return path


def mixed_numerics_run(tmp: Path) -> Path:
    """1K follows the reference arithmetic, 2K does not (gloo) or is unknown (shm_one_shot)."""
    path = tmp / "mixed"
    known = {"same_bits": True, "max_err_ulp": 0.5}
    with ResultsWriter(path) as writer:
        writer.append({**ROW, **known, "numerics": "reference"})
        writer.append({**ROW, **known, "bytes": 2048, "count": 512, "numerics": "other"})
        writer.append({**ROW, "backend": "shm_one_shot", "bytes": 2048, "count": 512})
    write_meta(path, {"run_id": "r1", "hardware_key": "cpu-test-2c"})
    return path


def other_node_run(tmp: Path, hardware_key: str = "cpu-other-4c", world_size: int = 4) -> Path:
    """A valid run of another node or world size (for --validate)."""
    path = tmp / "other"
    with ResultsWriter(path) as writer:
        writer.append({**ROW, "hardware_key": hardware_key, "world_size": world_size})
    write_meta(path, {"run_id": "r2", "hardware_key": hardware_key})
    return path


def wrong_column_run(tmp: Path) -> Path:
    path = tmp / "wrongcol"
    path.mkdir()
    header = ",".join("latency_ms" if c == "latency_us" else c for c in COLUMNS)
    (path / "results.csv").write_text(header + "\n" + ",".join(["x"] * len(COLUMNS)) + "\n")
    return path


_MOUNTS: list[Path] = []


def read_only(tmp: Path, fill: Callable[[Path], object] | None = None) -> Path:
    """A read-only file system at tmp/ro: a small tmpfs, filled by `fill`, then remounted
    read-only. As root `os.access` says such a folder is writable; only doing it tells."""
    path = tmp / "ro"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"a read-only file system needs `mount -t tmpfs` (root): {mounted.stderr.strip()[:120]}"
        )
    _MOUNTS.append(path)
    if fill is not None:
        fill(path)
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    return path


_LISTENING: list = []


def port_in_use() -> str:
    """A port something listens on (this test process), as another job's would."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _LISTENING.append(sock)
    return str(sock.getsockname()[1])


def header_only(tmp: Path) -> Path:
    """A run directory whose results.csv holds the header and no row (a sweep that failed
    before its first point)."""
    path = tmp / "norows"
    path.mkdir()
    (path / "results.csv").write_text(",".join(COLUMNS) + "\r\n")
    write_meta(path, {"run_id": "r0", "hardware_key": "cpu-test-2c"})
    return path


def _meta_run(tmp: Path, meta_text: str) -> list[str]:
    """--resume of a run whose meta.json is valid JSON of the wrong shape."""
    path = run_dir(tmp)
    (path / "meta.json").write_text(meta_text)
    return [*SWEEP, "--resume", str(path)]


def _edited_rows(tmp: Path, edit: Callable[[dict], None]) -> Path:
    """A run whose first row, whole in its fields, holds a cell of the wrong kind."""
    path = run_dir(tmp)
    with open(path / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    edit(rows[0])
    with open(path / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def with_markers(tmp: Path) -> Path:
    (tmp / "README.md").write_text(
        "# runs\n<!-- index: made by bench report -->\n<!-- end index -->\n"
    )
    return tmp / "README.md"


def _thresholds() -> dict:
    return {
        "schema_version": 1,
        "generated_by": {"tool": "test"},
        "tables": [
            {
                "hardware_key": "cpu-test-2c",
                "world_size": 2,
                "dtype": "float32",
                "mode": "eager",
                "rules": [
                    {"max_bytes": 65536, "algorithm": "shm_one_shot"},
                    {"max_bytes": None, "algorithm": "gloo"},
                ],
                "max_size": {"shm_one_shot": 65536},
                "evidence": {
                    "run_id": "r1",
                    "points": 4,
                    "regret_vs_oracle": 0.0,
                    "gain_vs_nccl_geomean": 1.5,
                },
            }
        ],
    }


def thresholds(
    tmp: Path,
    edit: Callable[[dict], None] | None = None,
    text: str | None = None,
    raw: bytes | None = None,
) -> str:
    path = tmp / "thresholds.json"
    if raw is not None:
        path.write_bytes(raw)
    elif text is not None:
        path.write_text(text)
    else:
        doc = _thresholds()
        if edit:
            edit(doc)
        path.write_text(json.dumps(doc, indent=1))
    return str(path)


def _table(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda doc: edit(doc["tables"][0])


SWEEP = ["sweep", "--world-size", "1", "--backends", "gloo", "-e", "1K", "-q"]


def sweep(*flags: str) -> Build:
    return lambda tmp: [*SWEEP, *flags]


def fixed(*argv: str) -> Build:
    return lambda tmp: list(argv)


# ------------------------------------------------------------------------ the cases
BENCH = [
    Case("ws-zero", "bench", sweep("--world-size", "0"), "--world-size"),
    Case("ws-word", "bench", sweep("--world-size", "two"), "--world-size"),
    Case("ws-negative", "bench", sweep("--world-size", "-3"), "--world-size"),
    Case("min-bytes-unit", "bench", sweep("-b", "1X"), "--min-bytes"),
    Case("sizes-no-memory-holds", "bench", sweep("-b", "256G", "-e", "1T"), "--max-bytes"),
    Case("ranks-beyond-the-cores", "bench", sweep("--world-size", "4096"), "--oversubscribe"),
    Case("min-bytes-decimal", "bench", sweep("-b", "1.5K"), "--min-bytes"),
    Case("max-bytes-zero", "bench", sweep("-e", "0"), "--max-bytes"),
    Case("min-above-max", "bench", sweep("-b", "64M", "-e", "1K"), "--min-bytes"),
    Case("factor-one", "bench", sweep("-f", "1"), "--factor"),
    Case("backend-unknown", "bench", sweep("--backends", "gloo,magic_ar"), "magic_ar"),
    Case("backend-empty", "bench", sweep("--backends", ","), "--backends"),
    Case("dtype-unknown", "bench", sweep("--dtypes", "int8"), "--dtypes"),
    Case("mode-unknown", "bench", sweep("--modes", "fast"), "--modes"),
    Case("device-unknown", "bench", sweep("--device", "tpu"), "--device"),
    Case("iters-zero", "bench", sweep("--iters", "0"), "--iters"),
    Case("warmup-negative", "bench", sweep("--warmup", "-1"), "--warmup"),
    Case("rounds-zero", "bench", sweep("--rounds", "0"), "--rounds"),
    Case("rounds-negative", "bench", sweep("--rounds", "-3"), "--rounds"),
    Case("rounds-not-integer", "bench", sweep("--rounds", "2.5"), "--rounds"),
    Case("block-ms-negative", "bench", sweep("--block-ms", "-1"), "--block-ms"),
    Case("block-ms-not-number", "bench", sweep("--block-ms", "lots"), "--block-ms"),
    Case("timeout-zero", "bench", sweep("--timeout", "0"), "--timeout"),
    Case("timeout-word", "bench", sweep("--timeout", "soon"), "--timeout"),
    Case("nnodes-no-port", "bench", sweep("--nnodes", "2", "--world-size", "2"), "--master-port"),
    Case(
        "node-rank-too-big",
        "bench",
        sweep("--nnodes", "2", "--node-rank", "2", "--world-size", "2", "--master-port", "29500"),
        "--node-rank",
    ),
    Case(
        "ws-not-split",
        "bench",
        sweep("--world-size", "3", "--nnodes", "2", "--master-port", "29500"),
        "--world-size",
    ),
    Case("port-too-big", "bench", sweep("--master-port", "70000"), "--master-port"),
    Case("param-syntax", "bench", sweep("--param", "chunk=4"), "--param"),
    Case("param-backend", "bench", sweep("--param", "magic_ar.blocks=4"), "--param"),
    Case("param-knob", "bench", sweep("--param", "gloo.blocks=4"), "blocks"),
    Case("flag-unknown", "bench", sweep("--bogus-flag"), "--bogus-flag"),
    Case("resume-no-table", "bench", lambda t: [*SWEEP, "--resume", str(t)], "--resume"),
    Case(
        "resume-and-out",
        "bench",
        lambda t: [*SWEEP, "--resume", str(run_dir(t)), "--out", str(t / "other")],
        "--resume",
    ),
    Case(
        "resume-wrong-column",
        "bench",
        lambda t: [*SWEEP, "--resume", str(wrong_column_run(t))],
        "latency_ms",
    ),
    Case(
        "resume-corrupt-meta",
        "bench",
        lambda t: (
            lambda r: (r / "meta.json").write_text('{"run_id": ') and [*SWEEP, "--resume", str(r)]
        )(run_dir(t)),
        "--resume",
    ),
    Case(
        "resume-binary-table",
        "bench",
        lambda t: (
            lambda r: (
                (r / "results.csv").write_bytes(b"\xff\xfe\x00garbage\n")
                and [*SWEEP, "--resume", str(r)]
            )
        )(run_dir(t)),
        "--resume",
    ),
    Case(
        "resume-meta-a-list",
        "bench",
        lambda t: _meta_run(t, "[]"),
        "meta.json: expected a JSON object",
    ),
    Case(
        "resume-meta-arguments-a-string",
        "bench",
        lambda t: _meta_run(t, '{"run_id": "r1", "arguments": "fast"}'),
        "arguments: expected an object",
    ),
    Case(
        "resume-meta-params-a-list",
        "bench",
        lambda t: _meta_run(t, '{"run_id": "r1", "arguments": {"params": {"gloo": [1]}}}'),
        "arguments.params.gloo",
    ),
    Case(
        "resume-meta-run-id-a-number",
        "bench",
        lambda t: _meta_run(t, '{"run_id": 7}'),
        "run_id: expected a string",
    ),
    Case(
        "resume-row-bytes-a-word",
        "bench",
        lambda t: [*SWEEP, "--resume", str(_edited_rows(t, lambda r: r.update(bytes="lots")))],
        "bytes: expected a whole number",
    ),
    Case(
        "out-is-file",
        "bench",
        lambda t: (t / "afile").write_text("x") and [*SWEEP, "--out", str(t / "afile")],
        "--out",
    ),
    Case(
        "out-holds-a-run",
        "bench",
        lambda t: [*SWEEP, "--out", str(run_dir(t))],
        "already holds a run",
    ),
    Case(
        "out-table-is-a-dir",
        "bench",
        lambda t: (
            (t / "odd" / "results.csv").mkdir(parents=True) or [*SWEEP, "--out", str(t / "odd")]
        ),
        "--out",
    ),
    Case(
        "out-being-written",
        "bench",
        lambda t: [*SWEEP, "--resume", str(_held_run(t))],
        "being written by another sweep",
    ),
    Case("report-missing-dir", "bench", lambda t: ["report", str(t / "nope")], "nope"),
    Case(
        "report-wrong-column", "bench", lambda t: ["report", str(wrong_column_run(t))], "latency_ms"
    ),
    Case(
        "report-empty-table",
        "bench",
        lambda t: (
            (t / "empty").mkdir()
            or (t / "empty" / "results.csv").write_text("")
            or ["report", str(t / "empty")]
        ),
        "results.csv",
    ),
    Case(
        "report-binary-table",
        "bench",
        lambda t: (
            (t / "bin").mkdir()
            or (t / "bin" / "results.csv").write_bytes(b"\x00\xff\xfe" * 50)
            and ["report", str(t / "bin")]
        ),
        "results.csv",
    ),
    Case(
        "report-bad-cell",
        "bench",
        lambda t: (
            lambda r: (
                (r / "results.csv").write_text(
                    (r / "results.csv").read_text().replace(",30,", ",fast,")
                )
                and ["report", str(r)]
            )
        )(run_dir(t)),
        "latency_us",
    ),
    Case("doctor-ws-zero", "bench", fixed("doctor", "--world-size", "0"), "--world-size"),
    Case("doctor-port-word", "bench", fixed("doctor", "--master-port", "http"), "--master-port"),
    Case(
        "doctor-nnodes-no-port",
        "bench",
        fixed("doctor", "--world-size", "2", "--nnodes", "2"),
        "--master-port",
    ),
    Case("doctor-device", "bench", fixed("doctor", "--device", "tpu"), "--device"),
    Case("command-unknown", "bench", fixed("sweeep"), "sweeep"),
    Case("soak-iters-zero", "bench", fixed("soak", "--iters", "0"), "--iters"),
    Case("soak-one-rank", "bench", fixed("soak", "--world-size", "1"), "--world-size"),
    Case("soak-timeout-word", "bench", fixed("soak", "--timeout", "soon"), "--timeout"),
    Case("report-no-dir", "bench", fixed("report"), "run_dir"),
    # outputs checked by doing: a path that cannot be created, a read-only file system, a
    # file where a folder must go; nothing starts, nothing is left behind
    Case(
        "out-under-proc",
        "bench",
        sweep("--out", "/proc/x/run"),
        "--out: cannot create /proc/x/run: [Errno 2]",
    ),
    Case(
        "out-read-only-fs",
        "bench",
        lambda t: [
            "sweep",
            "--world-size",
            "2",
            "--backends",
            "gloo",
            "-q",
            "--out",
            str(read_only(t) / "run"),
        ],
        "Read-only file system",
    ),
    Case(
        "out-below-a-file",
        "bench",
        lambda t: (t / "afile").write_text("x") and [*SWEEP, "--out", str(t / "afile" / "run")],
        "--out: cannot create",
    ),
    Case(
        "default-out-is-a-file",
        "bench",
        lambda t: (t / "runs").write_text("x") and list(SWEEP),
        "--out (default runs/)",
    ),
    Case(
        "resume-read-only",
        "bench",
        lambda t: [*SWEEP, "--resume", str(read_only(t, run_dir) / "run")],
        "--resume: cannot write in",
    ),
    Case(
        "report-plots-read-only",
        "bench",
        lambda t: ["report", str(read_only(t, run_dir) / "run"), "--plots"],
        "--plots: cannot write in",
    ),
    Case(
        "report-index-plots-read-only",
        "bench",
        lambda t: ["report", "--index", str(read_only(t, run_dir)), "--plots"],
        "--plots",
    ),
    Case(
        "report-index-write-read-only",
        "bench",
        lambda t: [
            "report",
            "--index",
            str(run_dir(t).parent),
            "--write",
            str(read_only(t, with_markers) / "README.md"),
        ],
        "--write: cannot write",
    ),
    Case("report-no-rows", "bench", lambda t: ["report", str(header_only(t))], "holds no row"),
    Case(
        "report-thresholds-missing",
        "bench",
        lambda t: ["report", str(run_dir(t)), "--plots", "--thresholds", str(t / "no.json")],
        "--thresholds",
    ),
    Case(
        "report-thresholds-without-plots",
        "bench",
        lambda t: ["report", str(run_dir(t)), "--thresholds", str(run_dir(t) / "meta.json")],
        "--thresholds",
    ),
    Case(
        "report-thresholds-with-index",
        "bench",
        lambda t: ["report", "--index", str(run_dir(t).parent), "--thresholds", "x.json"],
        "--thresholds",
    ),
    Case(
        "kernels-out-under-proc",
        "bench",
        fixed("kernels", "--out", "/proc/x/k.csv"),
        "--out: cannot create /proc/x/k.csv",
    ),
    Case(
        "soak-out-under-proc",
        "bench",
        fixed("soak", "--out", "/proc/x/soak.md"),
        "--out: cannot create",
    ),
    Case(
        "compare-markdown-read-only",
        "bench",
        lambda t: [
            "compare",
            "--runs",
            str(run_dir(t)),
            "--backends",
            "gloo,shm_one_shot",
            "--markdown",
            str(read_only(t) / "c.md"),
        ],
        "--markdown",
    ),
    Case(
        "compare-out-under-proc",
        "bench",
        fixed("compare", "--out", "/proc/x/runs"),
        "--out: cannot create",
    ),
    # the rendezvous port, tried by listening on it before any rank starts
    Case(
        "master-port-in-use",
        "bench",
        lambda t: [*SWEEP, "--world-size", "2", "--master-port", port_in_use()],
        "Address already in use",
    ),
    Case(
        "doctor-master-port-in-use",
        "bench",
        lambda t: ["doctor", "--world-size", "2", "--master-port", port_in_use()],
        "--master-port: cannot listen",
    ),
    Case("launcher-unknown", "bench", sweep("--launcher", "slurm"), "--launcher"),
    Case(
        "launcher-mpirun-nodes",
        "bench",
        sweep(
            "--launcher", "mpirun", "--nnodes", "2", "--world-size", "2", "--master-port", "29500"
        ),
        "--launcher mpirun",
    ),
]
if not torch.cuda.is_available():
    BENCH.append(Case("device-cuda-absent", "bench", sweep("--device", "cuda"), "--device cuda"))


def _drop_rules(t: dict) -> None:
    del t["rules"]


def _many_rules(t: dict) -> None:
    t["rules"] = [{"max_bytes": 4 * (i + 1), "algorithm": "gloo"} for i in range(10_001)]
    t["rules"][-1]["max_bytes"] = None
    t["max_size"] = {}


TUNER = [
    Case("show-missing", "tuner", lambda t: ["show", str(t / "none.json")], "none.json"),
    Case(
        "show-not-json", "tuner", lambda t: ["show", thresholds(t, text="{tables: [")], "not JSON"
    ),
    Case(
        "show-truncated",
        "tuner",
        lambda t: ["show", thresholds(t, text=json.dumps(_thresholds())[:150])],
        "not JSON",
    ),
    Case(
        "show-binary",
        "tuner",
        lambda t: ["show", thresholds(t, raw=b"\xff\xfe\x00\x01")],
        "thresholds.json",
    ),
    Case("show-a-directory", "tuner", lambda t: ["show", str(t)], "scratch"),
    Case(
        "show-schema-version",
        "tuner",
        lambda t: ["show", thresholds(t, lambda d: d.update(schema_version=2))],
        "schema_version",
    ),
    Case(
        "show-missing-rules",
        "tuner",
        lambda t: ["show", thresholds(t, _table(_drop_rules))],
        "rules",
    ),
    Case(
        "show-no-catch-all",
        "tuner",
        lambda t: [
            "show",
            thresholds(t, _table(lambda x: x["rules"][-1].update(max_bytes=1 << 30))),
        ],
        "max_bytes",
    ),
    Case(
        "show-rules-decrease",
        "tuner",
        lambda t: [
            "show",
            thresholds(
                t, _table(lambda x: x["rules"].insert(1, {"max_bytes": 1024, "algorithm": "gloo"}))
            ),
        ],
        "max_bytes",
    ),
    Case(
        "show-unknown-algorithm",
        "tuner",
        lambda t: [
            "show",
            thresholds(t, _table(lambda x: x["rules"][-1].update(algorithm="magic_ar"))),
        ],
        "algorithm",
    ),
    Case(
        "show-wrong-type",
        "tuner",
        lambda t: ["show", thresholds(t, _table(lambda x: x.update(world_size="eight")))],
        "world_size",
    ),
    Case(
        "show-cpu-key-gpu-algorithm",
        "tuner",
        lambda t: [
            "show",
            thresholds(t, _table(lambda x: x["rules"][-1].update(algorithm="nccl"))),
        ],
        "hardware_key",
    ),
    Case(
        "show-gpu-key-cpu-algorithm",
        "tuner",
        lambda t: [
            "show",
            thresholds(t, _table(lambda x: x.update(hardware_key="nvidia-h200-x8-nvlink"))),
        ],
        "hardware_key",
    ),
    Case(
        "show-graph-on-cpu",
        "tuner",
        lambda t: ["show", thresholds(t, _table(lambda x: x.update(mode="graph")))],
        "mode",
    ),
    Case(
        "show-integer-5000-digits",
        "tuner",
        lambda t: [
            "show",
            thresholds(t, text=json.dumps(_thresholds()).replace("65536,", "9" * 5000 + ",", 1)),
        ],
        "tables[0].rules[0].max_bytes",
    ),
    Case(
        "show-nested-100000",
        "tuner",
        lambda t: ["show", thresholds(t, text="[" * 100_000 + "]" * 100_000)],
        "nested deeper than 32",
    ),
    Case(
        "show-knob-wrong-type",
        "tuner",
        lambda t: [
            "show",
            thresholds(t, _table(lambda x: x["rules"][0].update(params={"chunk_bytes": "big"}))),
        ],
        "tables[0].rules[0].params.chunk_bytes",
    ),
    Case(
        "show-rules-over-limit",
        "tuner",
        lambda t: ["show", thresholds(t, _table(_many_rules))],
        "tables[0].rules: expected at most",
    ),
    Case(
        "export-file-over-limit",
        "tuner",
        lambda t: ["export", thresholds(t, text=" " * (16 * 1024 * 1024 + 1)), "--format", "vllm"],
        "at most 16777216 bytes",
    ),
    Case(
        "export-format",
        "tuner",
        lambda t: ["export", thresholds(t), "--format", "nccl-tests"],
        "--format",
    ),
    Case(
        "export-mode",
        "tuner",
        lambda t: ["export", thresholds(t), "--format", "vllm", "--mode", "lazy"],
        "--mode",
    ),
    Case(
        "fit-missing-dir",
        "tuner",
        lambda t: ["fit", str(t / "nope"), "-o", str(t / "out.json")],
        "nope",
    ),
    Case(
        "fit-wrong-column",
        "tuner",
        lambda t: ["fit", str(wrong_column_run(t)), "-o", str(t / "out.json")],
        "latency_ms",
    ),
    Case(
        "fit-no-results",
        "tuner",
        lambda t: (t / "bare").mkdir() or ["fit", str(t / "bare"), "-o", str(t / "o.json")],
        "results.csv",
    ),
    Case(
        "fit-max-rules",
        "tuner",
        lambda t: ["fit", str(run_dir(t)), "-o", str(t / "o.json"), "--max-rules", "0"],
        "--max-rules",
    ),
    Case(
        "fit-min-gain-over-one",
        "tuner",
        lambda t: ["fit", str(run_dir(t)), "-o", str(t / "o.json"), "--min-gain", "2"],
        "--min-gain",
    ),
    Case(
        "fit-min-gain-not-number",
        "tuner",
        lambda t: ["fit", str(run_dir(t)), "-o", str(t / "o.json"), "--min-gain", "5%"],
        "--min-gain",
    ),
    Case(
        "fit-memory-budget",
        "tuner",
        lambda t: ["fit", str(run_dir(t)), "-o", str(t / "o.json"), "--memory-budget", "12Q"],
        "--memory-budget",
    ),
    Case(
        "fit-workload-missing",
        "tuner",
        lambda t: [
            "fit",
            str(run_dir(t)),
            "-o",
            str(t / "o.json"),
            "--workload",
            str(t / "hist.csv"),
        ],
        "--workload",
    ),
    Case(
        "fit-workload-columns",
        "tuner",
        lambda t: (
            (t / "hist.csv").write_text("size,n\n1K,3\n")
            and ["fit", str(run_dir(t)), "-o", str(t / "o.json"), "--workload", str(t / "hist.csv")]
        ),
        "--workload",
    ),
    Case("fit-no-output", "tuner", lambda t: ["fit", str(run_dir(t))], "-o/--output"),
    Case(
        "fit-numerics-unknown",
        "tuner",
        lambda t: ["fit", str(run_dir(t)), "-o", str(t / "o.json"), "--numerics", "bitwise"],
        "--numerics: expected one of any, exact",
    ),
    Case(
        "fit-numerics-exact-nowhere",
        "tuner",
        lambda t: [
            "fit",
            str(mixed_numerics_run(t)),
            "-o",
            str(t / "o.json"),
            "--numerics",
            "exact",
        ],
        "at 2K: gloo other, shm_one_shot unknown",
    ),
    Case("command-unknown-tuner", "tuner", fixed("tune"), "tune"),
    Case(
        "fit-empty-run",
        "tuner",
        lambda t: ["fit", str(header_only(t)), "-o", str(t / "o.json")],
        "no measured",
    ),
    Case(
        "fit-output-under-proc",
        "tuner",
        lambda t: ["fit", str(run_dir(t)), "-o", "/proc/x/t.json"],
        "-o: cannot create",
    ),
    Case(
        "fit-output-is-a-dir",
        "tuner",
        lambda t: ["fit", str(run_dir(t)), "-o", str(t)],
        "is a directory",
    ),
    Case(
        "fit-output-read-only",
        "tuner",
        lambda t: ["fit", str(run_dir(t)), "-o", str(read_only(t) / "t.json")],
        "Read-only file system",
    ),
    Case(
        "fit-study-db-under-proc",
        "tuner",
        lambda t: ["fit", str(run_dir(t)), "-o", str(t / "o.json"), "--study-db", "/proc/x/s.db"],
        "--study-db: cannot create",
    ),
    Case(
        "fit-pareto-read-only",
        "tuner",
        lambda t: [
            "fit",
            str(run_dir(t)),
            "-o",
            str(t / "o.json"),
            "--pareto",
            str(read_only(t) / "p.csv"),
        ],
        "--pareto",
    ),
    Case(
        "live-output-under-proc",
        "tuner",
        fixed("live", "--world-size", "2", "-o", "/proc/x/t.json"),
        "-o: cannot create",
    ),
    Case(
        "live-study-db-read-only",
        "tuner",
        lambda t: [
            "live",
            "--world-size",
            "2",
            "-o",
            str(t / "t.json"),
            "--study-db",
            str(read_only(t) / "s.db"),
        ],
        "--study-db",
    ),
    Case(
        "fit-study-db-not-a-db",
        "tuner",
        lambda t: (
            (t / "s.db").write_text("not a database")
            and ["fit", str(run_dir(t)), "-o", str(t / "o.json"), "--study-db", str(t / "s.db")]
        ),
        "not an Optuna study database",
    ),
    Case(
        "export-output-under-proc",
        "tuner",
        lambda t: ["export", thresholds(t), "--format", "vllm", "-o", "/proc/x/v.py"],
        "-o: cannot create",
    ),
    Case(
        "fit-validate-other-hardware",
        "tuner",
        lambda t: [
            "fit",
            str(run_dir(t)),
            "-o",
            str(t / "o.json"),
            "--validate",
            str(other_node_run(t)),
        ],
        "holds cpu-other-4c world size 4 (float32 eager); the table(s) need cpu-test-2c world size 2",
    ),
    Case(
        "fit-validate-other-world-size",
        "tuner",
        lambda t: [
            "fit",
            str(run_dir(t)),
            "-o",
            str(t / "o.json"),
            "--validate",
            str(other_node_run(t, "cpu-test-2c", 4)),
        ],
        "--validate",
    ),
    Case(
        "fit-validate-own-run",
        "tuner",
        lambda t: [
            "fit",
            str(run_dir(t)),
            "-o",
            str(t / "o.json"),
            "--validate",
            str(run_dir(t)),
        ],
        "is also a run the table is fitted on",
    ),
    Case(
        "fit-validate-missing",
        "tuner",
        lambda t: ["fit", str(run_dir(t)), "-o", str(t / "o.json"), "--validate", str(t / "no")],
        "--validate",
    ),
    Case(
        "validate-other-hardware",
        "tuner",
        lambda t: ["validate", thresholds(t), str(other_node_run(t))],
        "the table(s) need cpu-test-2c world size 2",
    ),
    Case(
        "validate-bad-table",
        "tuner",
        lambda t: ["validate", thresholds(t, text="{"), str(run_dir(t))],
        "not JSON",
    ),
]
CASES = BENCH + TUNER
# a process refused before it starts: a few cases again as a user sees them
IN_PROCESS_ONLY = {"out-being-written"}  # the lock is held by this test process
AS_PROCESSES = [
    "ws-zero",
    "resume-wrong-column",
    "resume-meta-a-list",
    "sizes-no-memory-holds",
    "doctor-nnodes-no-port",
    "show-truncated",
    "show-nested-100000",
    "fit-wrong-column",
    "out-read-only-fs",
    "report-plots-read-only",
    "master-port-in-use",
]


_HELD: list[int] = []


def _held_run(tmp: Path) -> Path:
    """A run directory whose lock is held, as by a sweep that is writing it."""
    path = run_dir(tmp, "held")
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT)  # a finished run leaves none
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD.append(fd)
    return path


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    while _HELD:
        os.close(_HELD.pop())
    while _MOUNTS:
        subprocess.run(["umount", str(_MOUNTS.pop())], check=False)
    while _LISTENING:
        _LISTENING.pop().close()


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content hash (or 'dir'), for 'nothing written or lost'."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _main(program: str):
    if program == "bench":
        from bench.cli import main
    else:
        from tuner.cli import main
    return main


def _check_refusal(case: Case, rc: int, stdout: str, stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert rc == 2, f"exit code {rc}; stderr: {stderr[-1500:]}"
    assert len(lines) == 1, f"expected one line, got: {stderr[-1500:]}"
    assert lines[0].startswith(f"{case.program}: error: "), lines[0]
    assert case.names in lines[0], f"{lines[0]!r} does not name {case.names!r}"
    assert "Traceback" not in stderr and not stdout.strip()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_one_line(case, tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = case.build(scratch)
    monkeypatch.chdir(scratch)  # a default output (results/...) would land here
    before = snapshot(tmp_path)
    rc = _main(case.program)(argv)
    captured = capsys.readouterr()
    _check_refusal(case, rc, captured.out, captured.err)
    assert snapshot(tmp_path) == before, "the refused command wrote or removed a file"


@pytest.mark.parametrize("case_id", AS_PROCESSES)
def test_bad_input_as_a_process(case_id, tmp_path, run_cli):
    case = next(c for c in CASES if c.id == case_id)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = case.build(scratch)
    before = snapshot(tmp_path)
    proc = run_cli(case.program, *argv, cwd=scratch, timeout=120)
    _check_refusal(case, proc.returncode, proc.stdout, proc.stderr)
    assert snapshot(tmp_path) == before


def test_bad_inputs_covered(request):
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    assert sum(c.program == "tuner" for c in CASES) >= 10
    line = (
        f"bad inputs covered: {len(CASES)} ({len(BENCH)} bench, {len(TUNER)} tuner; "
        f"{len(AS_PROCESSES)} also as processes; {len(ABSENT)} absent peers or launcher)"
    )
    # shown in the session's summary (output during a test is captured)
    manager = request.config.pluginmanager
    if not manager.has_plugin("bad-input-count"):
        manager.register(_CountLine(line), "bad-input-count")
    print(line)


class _CountLine:
    def __init__(self, line: str) -> None:
        self.line = line

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_line(self.line)


# ------------------------------------------------------------------------ vLLM plugin
# The vLLM plugin's own bad input (ALLREDUCE_AUTOTUNE_THRESHOLDS, ALLREDUCE_AUTOTUNE_STRICT) is
# tested in tests/test_vllm_plugin.py; here, as an operator meets it: vLLM's plugin loader
# stops the process with one line naming the variable and the file.
VLLM_START = "import vllm.plugins as p; p.load_general_plugins(); print('started')"


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("vllm") is None,
    reason="vLLM is not installed (.ci/run installs it: docs/vllm.md)",
)
def test_vllm_does_not_start_with_a_corrupt_table(tmp_path, subprocess_env):
    import subprocess
    import sys

    table = tmp_path / "thresholds.json"
    table.write_text("{")
    env = subprocess_env({"ALLREDUCE_AUTOTUNE_THRESHOLDS": str(table)})
    env.pop("ALLREDUCE_AUTOTUNE_STRICT", None)
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_START], capture_output=True, text=True, env=env, timeout=180
    )
    assert proc.returncode == 1 and "started" not in proc.stdout
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"tuner.engines.vllm_setup.ThresholdsRefused: ALLREDUCE_AUTOTUNE_THRESHOLDS: {table}: "
            "not JSON"
        )
    )


def test_a_half_written_table_is_read_without_its_cut_row(tmp_path, capsys):
    """Not bad input but a crash's leftover: the last row cut short. `bench report` and
    `tuner fit` read the whole rows and leave the cut one out, as `--resume` does."""
    from bench.cli import main as bench_main
    from tuner.cli import main as tuner_main

    run = run_dir(tmp_path)
    data = (run / "results.csv").read_bytes()
    (run / "results.csv").write_bytes(data[:-30])
    assert bench_main(["report", str(run)]) == 0
    assert tuner_main(["fit", str(run), "-o", str(tmp_path / "t.json"), "-q"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "1 measured rows" in captured.out


# ------------------------------------------------------------------ peers that are not installed
# A peer named in --backends that is not installed is not bad input: the sweep runs and its rows
# are skipped with the reason and the install line. Absence is simulated by a sitecustomize that
# makes the import system report the modules missing (sys.modules[name] = None).
HIDE = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None\n"
ABSENT = {  # backend -> (module hidden, text its reason must hold)
    "mpi": ("mpi4py", "apt-get install -y openmpi-bin libopenmpi-dev"),
    "deepspeed_shm": ("deepspeed", "DS_BUILD_OPS=0 pip install -e '.[peers]'"),
    "--launcher mpirun": ("mpirun", "apt-get install -y openmpi-bin libopenmpi-dev"),
}


def test_absent_peers_are_skipped_rows_with_the_install_line(tmp_path, run_cli):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE.format(names=["mpi4py", "deepspeed"]))
    out = tmp_path / "run"
    proc = run_cli(
        "bench",
        "sweep",
        "--world-size",
        "1",
        "--backends",
        "mpi,deepspeed_shm",
        "-e",
        "1K",
        "--dtypes",
        "float32",
        "-n",
        "2",
        "-q",
        "--out",
        out,
        env={"PYTHONPATH": os.pathsep.join([str(hide), str(REPO)])},
        timeout=180,
    )
    # only skipped rows: the sweep says so in one line and exits 1 (nothing to fit or draw)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "no point was measured" in proc.stderr, proc.stderr[-2000:]
    rows = {r["backend"]: r for r in csv.DictReader(open(out / "results.csv"))}
    for backend in ("mpi", "deepspeed_shm"):
        module, install = ABSENT[backend]
        reason = rows[backend]["skipped_reason"]
        assert f"{module} is not installed" in reason and install in reason, reason
        assert "pip install -e '.[peers]'" in reason, reason


def test_mpirun_launcher_absent_is_one_line(tmp_path, run_cli):
    """--launcher mpirun where no mpirun is on PATH: exit 2, one line naming the flag and the
    install line, nothing written."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = snapshot(tmp_path)
    proc = run_cli(
        "bench",
        *SWEEP,
        "--launcher",
        "mpirun",
        "--out",
        scratch / "run",
        env={"PATH": str(scratch)},
        cwd=scratch,
        timeout=120,
    )
    case = Case("launcher-mpirun-absent", "bench", fixed(), "--launcher mpirun")
    _check_refusal(case, proc.returncode, proc.stdout, proc.stderr)
    assert ABSENT["--launcher mpirun"][1] in proc.stderr
    assert snapshot(tmp_path) == before
