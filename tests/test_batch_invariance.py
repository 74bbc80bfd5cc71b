"""Issue 23 item 4, end to end on CPU with real ranks: one token's all-reduced vector has the
same bits whether it travels alone or inside messages of 4 to 512 tokens, through the
dispatcher with an exact table (`numerics: exact`).

The table routes every size to shm_one_shot: the one CPU backend a sweep measured following
the reference arithmetic (rank-order sum, float32 accumulation, one rounding) at world size 4
in bfloat16, where it does (its short path in C, messages up to 256 KiB). Each rank writes,
per message size, a hash of the token's bits and whether they equal the reference.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.multiprocessing as mp
from rank_tools import gloo_rank, read_reports, write_report

from bench.launch.launcher import free_port
from bench.run.hardware import fingerprint
from bench.run.numerics import random_input
from tuner.runtime.dispatch import Dispatcher
from tuner.runtime.schema import Rule, Table, Thresholds

HIDDEN = 2048  # one token's vector: 2,048 bfloat16 values (4 KiB)
TOKENS = (1, 4, 8, 16, 32, 64, 128, 256, 512)


def _exact_table(hardware_key: str, world_size: int) -> Thresholds:
    largest = TOKENS[-1] * HIDDEN * 2
    evidence = {"run_id": "test", "points": 0, "regret_vs_oracle": 0.0}
    evidence["gain_vs_nccl_geomean"] = None
    table = Table(
        hardware_key,
        world_size,
        "bfloat16",
        "eager",
        (Rule(None, "shm_one_shot", {}),),
        {"shm_one_shot": largest},
        evidence,
        numerics="exact",
    )
    return Thresholds(tables=(table,))


def _others(tokens: int, rank: int) -> torch.Tensor:
    """The rest of the batch: other tokens of mixed magnitude, different per size and rank."""
    gen = torch.Generator().manual_seed(tokens * 131 + rank)
    scale = torch.exp2(torch.randint(-8, 9, (tokens, HIDDEN), generator=gen).float())
    return (torch.randn(tokens, HIDDEN, generator=gen) * scale).to(torch.bfloat16)


def _rank_main(rank: int, world: int, port: int, table_path: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    token = random_input(torch.bfloat16, HIDDEN, rank)
    reference = sum(random_input(torch.bfloat16, HIDDEN, r).float() for r in range(world))
    reference = reference.to(torch.bfloat16)  # float32 rank-order sum, one rounding
    report = {}
    with gloo_rank(rank, world, port, timeout_s=120):
        with Dispatcher.from_file(table_path, count_calls=True) as dispatcher:
            for tokens in TOKENS:
                batch = _others(tokens, rank)
                where = tokens // 2
                batch[where] = token
                out = dispatcher.all_reduce(batch.reshape(-1)).reshape(tokens, HIDDEN)[where]
                bits = out.contiguous().view(torch.int16)
                report[str(tokens)] = {
                    "hash": hashlib.blake2b(bits.numpy().tobytes(), digest_size=8).hexdigest(),
                    "reference": bool(torch.equal(bits, reference.view(torch.int16))),
                    "backend": dispatcher.last_backend,
                }
    write_report(out_dir, rank, report)


def _run(tmp_path, world: int) -> list[dict]:
    path = tmp_path / "thresholds.json"
    _exact_table(fingerprint("cpu")["hardware_key"], world).save(path)
    mp.start_processes(
        _rank_main,
        args=(world, free_port("127.0.0.1"), str(path), str(tmp_path)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return read_reports(tmp_path, world)


def _check(reports: list[dict]) -> None:
    for report in reports:
        assert {r["backend"] for r in report.values()} == {"shm_one_shot"}
    alone = reports[0]["1"]["hash"]
    differ = [
        f"{tokens} tokens ({int(tokens) * HIDDEN * 2 // 1024} KiB)"
        for tokens, r in reports[0].items()
        if r["hash"] != alone or not r["reference"]
    ]
    for report in reports[1:]:  # every rank the same bits
        assert [r["hash"] for r in report.values()] == [r["hash"] for r in reports[0].values()]
    assert not differ, f"the token's bits differ from it alone or from the reference at {differ}"


@pytest.mark.slow
def test_one_token_same_bits_alone_or_batched_ws2(tmp_path):
    _check(_run(tmp_path, 2))


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="shm_one_shot is not exact at world size 4: its Python path (messages above its "
    "256 KiB short path: here 128+ tokens) does not sum in rank order in float32 with one "
    "rounding (issue 23 item 2, the backends' fix)",
)
def test_one_token_same_bits_alone_or_batched_ws4(tmp_path):
    _check(_run(tmp_path, 4))
