"""Two `bench sweep` launches on loopback acting as two nodes (torchrun's c10d rendezvous).

Each launch runs on a simulated host of its own (`unshare --uts --mount`: its own hostname, and
an /etc/hosts where both names resolve to loopback), so its ranks have their own host id
(hostname and boot id) and the ranks span two "hosts": the table records nnodes 2 and the
one-host backends (shm) skip with that reason.
"""

from __future__ import annotations

import csv
import json

import pytest
from fault_tools import own_host_reason, start

from bench.launch.launcher import free_port

OWN_HOST_REASON = own_host_reason()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(OWN_HOST_REASON is not None, reason=str(OWN_HOST_REASON)),
]


def test_two_nodes_on_loopback_make_one_table(tmp_path):
    out = tmp_path / "run"
    port = free_port("127.0.0.1")
    common = [
        "sweep",
        "--world-size",
        "4",
        "--nnodes",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        port,
        "--backends",
        "gloo,shm_one_shot",
        "-b",
        "1K",
        "-e",
        "4K",
        "--dtypes",
        "float32",
        "-n",
        "3",
        "-w",
        "1",
        "--timeout",
        "60",
        "--out",
        out,
        "-q",
    ]
    hosts = ("loopback-node-0", "loopback-node-1")
    nodes = [
        start("bench", *common, "--node-rank", rank, hostname=hosts[rank], known_hosts=hosts)
        for rank in (0, 1)
    ]
    finished = [node.communicate(timeout=240) for node in nodes]
    for node, (_, stderr) in zip(nodes, finished, strict=True):
        assert node.returncode == 0, stderr[-2000:]

    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["run_id"] for r in rows} == {rows[0]["run_id"]}
    assert {r["world_size"] for r in rows} == {"4"} and {r["nnodes"] for r in rows} == {"2"}
    gloo = [r for r in rows if r["backend"] == "gloo"]
    assert len(gloo) == 3 and all(r["correct"] == "True" for r in gloo)
    shm = [r for r in rows if r["backend"] == "shm_one_shot"]
    assert len(shm) == 3 and all(r["latency_us"] == "" for r in shm)
    assert all("2 hosts" in r["skipped_reason"] and "one host" in r["skipped_reason"] for r in shm)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["nnodes"] == 2 and meta["arguments"]["nnodes"] == 2
