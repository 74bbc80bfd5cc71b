"""Issue 23 item 4, end to end on CPU with real ranks: one token's all-reduced vector has the
same bits whether it travels alone or inside messages of 4 to 512 tokens, through the
dispatcher with an exact table (`numerics: exact`).

Two exact tables: every size to shm_one_shot (its short path in C up to 256 KiB, its Python
pieces beyond: 128+ tokens), and shm_one_shot up to 64 KiB then shm_two_shot (the token
changes backend with the batch). Both follow the reference arithmetic (rank-order sum,
float32 accumulation, one rounding) on every path with their `exact` knob (the default). Each
rank writes, per message size, a hash of the token's bits and whether they equal the
reference.
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
from tuner.runtime import op
from tuner.runtime.dispatch import Dispatcher
from tuner.runtime.schema import Rule, Table, Thresholds

HIDDEN = 2048  # one token's vector: 2,048 bfloat16 values (4 KiB)
TOKENS = (1, 4, 8, 16, 32, 64, 128, 256, 512)


SWITCH_BYTES = 64 << 10  # the two-backend table: shm_one_shot up to here, then shm_two_shot


# per device: the one-shot and two-shot backends (the own shm ones on CPU, the own Triton
# kernels over CUDA IPC on a GPU, every rank on GPU 0 under MPS), and what an override forces
BACKENDS = {"cpu": ("shm_one_shot", "shm_two_shot"), "cuda": ("custom_one_shot", "custom_two_shot")}
FORCED = {"cpu": "gloo", "cuda": "custom_one_shot"}


def _exact_table(hardware_key: str, world_size: int, switch: bool, device: str) -> Thresholds:
    largest = TOKENS[-1] * HIDDEN * 2
    evidence = {"run_id": "test", "points": 0, "regret_vs_oracle": 0.0}
    evidence["gain_vs_nccl_geomean"] = None
    one, two = BACKENDS[device]
    if switch:
        rules = (Rule(SWITCH_BYTES, one, {}), Rule(None, two, {}))
        max_size = {one: SWITCH_BYTES, two: largest}
    else:
        rules, max_size = (Rule(None, one, {}),), {one: largest}
    table = Table(
        hardware_key,
        world_size,
        "bfloat16",
        "eager",
        rules,
        max_size,
        evidence,
        numerics="exact",
    )
    return Thresholds(tables=(table,))


def _others(tokens: int, rank: int) -> torch.Tensor:
    """The rest of the batch: other tokens of mixed magnitude, different per size and rank."""
    gen = torch.Generator().manual_seed(tokens * 131 + rank)
    scale = torch.exp2(torch.randint(-8, 9, (tokens, HIDDEN), generator=gen).float())
    return (torch.randn(tokens, HIDDEN, generator=gen) * scale).to(torch.bfloat16)


def _rank_main(
    rank: int, world: int, port: int, table_path: str, out_dir: str, device: str
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    where_to = {"device": "cuda:0" if device == "cuda" else None}
    if device == "cuda":
        torch.cuda.set_device(0)  # every rank on the one GPU, through CUDA IPC
    token = random_input(torch.bfloat16, HIDDEN, rank)
    reference = sum(random_input(torch.bfloat16, HIDDEN, r).float() for r in range(world))
    reference = reference.to(torch.bfloat16)  # float32 rank-order sum, one rounding
    report: dict = {}
    with gloo_rank(rank, world, port, timeout_s=120):
        with Dispatcher.from_file(table_path, count_calls=True, **where_to) as dispatcher:
            report["numerics"] = [dispatcher.numerics(d) for d in (torch.bfloat16, torch.float32)]
            op.install(dispatcher)  # (op.serving would release the backends after)
            report["op"] = op.numerics(torch.bfloat16)
            op.uninstall()
            for tokens in TOKENS:
                batch = _others(tokens, rank)
                where = tokens // 2
                batch[where] = token
                batch = batch.to(where_to["device"] or "cpu")
                out = dispatcher.all_reduce(batch.reshape(-1)).reshape(tokens, HIDDEN)[where]
                bits = out.contiguous().view(torch.int16).cpu()
                report[str(tokens)] = {
                    "hash": hashlib.blake2b(bits.numpy().tobytes(), digest_size=8).hexdigest(),
                    "reference": bool(torch.equal(bits, reference.view(torch.int16))),
                    "backend": dispatcher.last_backend,
                }
        force = {"force": FORCED[device]}
        with Dispatcher.from_file(table_path, overrides=force, **where_to) as forced:
            report["forced"] = forced.numerics(torch.bfloat16)  # an override drops the promise
    write_report(out_dir, rank, report)


def _run(tmp_path, world: int, switch: bool, device: str = "cpu") -> list[dict]:
    path = tmp_path / "thresholds.json"
    _exact_table(fingerprint(device)["hardware_key"], world, switch, device).save(path)
    mp.start_processes(
        _rank_main,
        args=(world, free_port("127.0.0.1"), str(path), str(tmp_path), device),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return read_reports(tmp_path, world)


def _check(reports: list[dict], switch: bool, device: str = "cpu") -> None:
    one, two = BACKENDS[device]
    wanted = {one, two} if switch else {one}
    for report in reports:  # the promise, as the dispatcher and the op say it
        assert report.pop("numerics") == ["exact", "any"]  # bf16 has a table of its own
        assert report.pop("op") == "exact" and report.pop("forced") == "any"
    for report in reports:
        assert {r["backend"] for r in report.values()} == wanted
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
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("switch", [False, True], ids=["one_shot", "one_then_two_shot"])
def test_one_token_same_bits_alone_or_batched(tmp_path, world, switch):
    _check(_run(tmp_path, world, switch), switch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("switch", [False, True], ids=["one_shot", "one_then_two_shot"])
def test_one_token_same_bits_through_the_own_gpu_kernels(tmp_path, world, switch):
    """The own Triton kernels, every rank on GPU 0 (start the MPS daemon: docs/gpu.md)."""
    _check(_run(tmp_path, world, switch, "cuda"), switch, "cuda")
