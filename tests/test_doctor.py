"""`bench doctor` on CPU: the node report, backend verdicts, rendezvous checks, and the
cross-rank fingerprint comparison through the sweep's launcher."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main
from bench.doctor import check_rendezvous, compare_fingerprints


def test_doctor_reports_the_node_and_every_backend(capsys):
    assert main(["doctor", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for section in (
        "## versions",
        "## libnccl",
        "## GPUs",
        "## NVLink multicast",
        "## shared memory",
        "## ranks: 1",
        "## backends",
    ):
        assert section in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert " ok" in lines["gloo"]
    assert "unavailable" in lines["nccl"] and "cuda" in lines["nccl"]  # a reason, not a crash


def test_doctor_json_is_complete(capsys):
    from bench.backends import known_names

    assert main(["doctor", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    node, ranks = report["node"], report["ranks"]
    assert node["versions"]["torch"] and node["shm"]["open_files"]["soft"]
    assert "path" in node["libnccl"] or node["libnccl"]["error"]
    assert [b["backend"] for b in ranks["backends"]] == known_names()
    assert all(b["status"] == "ok" or b["reason"] for b in ranks["backends"])
    assert ranks["differences"] == [] and report["failure"] is None


def test_rendezvous_check_tells_listening_free_and_taken_ports():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert check_rendezvous("127.0.0.1", port, node_rank=1).startswith("ok: ")
    # nobody listens now: node 0 may host it, another node has nobody to talk to yet
    assert check_rendezvous("127.0.0.1", port, node_rank=0).startswith("ok: free")
    assert check_rendezvous("127.0.0.1", port, node_rank=1).startswith("not yet")
    with socket.socket() as squatter:  # bound, not listening: node 0 could not host there
        squatter.bind(("127.0.0.1", 0))
        taken = squatter.getsockname()[1]
        assert check_rendezvous("127.0.0.1", taken, node_rank=0).startswith("FAIL")


def test_fingerprint_differences_name_field_values_and_ranks():
    same = {"torch": "2.5.1", "nccl": "2.21.5", "gpu": "H100"}
    fps = [same, dict(same), {**same, "torch": "2.4.0"}, {**same, "gpu": "A100"}]
    assert compare_fingerprints(fps) == [
        "torch: 2.5.1 on ranks 0,1,3; 2.4.0 on rank 2",
        "gpu: H100 on ranks 0,1,2; A100 on rank 3",
    ]
    assert compare_fingerprints([same, dict(same)]) == []


@pytest.mark.slow
def test_doctor_across_ranks_flags_a_rank_that_differs(subprocess_env):
    # the doctor's command, its ranks launched as `bench doctor --world-size 2` does, with
    # rank 1's fingerprint made to differ through the command's `fingerprint` argument
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("doctor_differ.py")),
            "--world-size",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=subprocess_env(),
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "## ranks: 2 on 1 host(s)" in proc.stdout
    assert "RANKS DIFFER" in proc.stdout
    assert (
        "0.0.0-other on rank 1" in proc.stdout
        and "driver: None on rank 0; 999.1 on rank 1" in proc.stdout
    )
    shm = next(line for line in proc.stdout.splitlines() if line.startswith("  shm_one_shot"))
    assert " ok" in shm  # probed, created and checked with both ranks


@pytest.mark.slow
def test_doctor_across_ranks_that_agree_exits_0(run_cli):
    proc = run_cli("bench", "doctor", "--world-size", "2", "--device", "cpu", timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## ranks: 2 on 1 host(s)" in proc.stdout and "every rank agrees on" in proc.stdout
    assert "RANKS DIFFER" not in proc.stdout
