"""Noise said out loud: what could make this run's differences between backends noise.

At the start, rank 0 records the host's cores, the ranks on it, the load average and (on CUDA)
whether ranks share a GPU without MPS, and warns in one line for each that applies: ranks that
outnumber cores wait for one (each timing then holds scheduling delays), a busy machine drifts,
and ranks sharing a GPU without MPS take turns on it (time-sliced kernels). At the end the load
after and the A/A figure (the same backend's spread between rounds, computed from rounds.csv)
join it in meta.json's "noise"; `bench report` and `tuner fit` print them.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from bench.analysis.rounds import aa_spread, read_rounds
from bench.environment import get

__all__ = ["noise_before", "noise_after", "mps_running", "BUSY_LOAD_PER_CORE"]

# a 1-minute load average above half the cores: another job holds a core much of the time
BUSY_LOAD_PER_CORE = 0.5


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def mps_running() -> bool:
    """Whether an MPS control daemon serves this process's CUDA clients: its pipe directory
    (CUDA_MPS_PIPE_DIRECTORY, default /tmp/nvidia-mps) holds the daemon's control pipe."""
    pipes = Path(get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps")
    return (pipes / "control").exists()


def noise_before(cfg, ctx, stream=None) -> dict:
    """Rank 0, before the first point: the facts, and a one-line warning for each that
    makes the timings noisier."""
    stream = stream or sys.stderr
    cores, ranks = _cores(), ctx.local_world_size
    load = _load()
    noise: dict = {
        "cores": cores,
        "ranks_per_host": ranks,
        "oversubscribed": ranks > cores,
        "load_before": load,
    }
    warnings = []
    if ranks > cores:
        warnings.append(
            f"{ranks} ranks on {cores} cores: ranks wait for a core, so every timing holds "
            "scheduling delays; differences below the A/A spread (reported at the end) are noise"
        )
    if load and load[0] > BUSY_LOAD_PER_CORE * cores:
        warnings.append(
            f"the machine is busy (load average {load[0]:.2f} on {cores} cores before the "
            "sweep): its other work drifts the timings"
        )
    if cfg.device == "cuda":
        gpus = max(ctx.visible_gpus, 1)
        per_gpu = math.ceil(ranks / gpus)
        noise.update({"gpus": gpus, "ranks_per_gpu": per_gpu, "mps": mps_running()})
        if per_gpu > 1 and not noise["mps"]:
            warnings.append(
                f"{per_gpu} ranks share each GPU without MPS: their kernels take turns "
                "(time-sliced), so a barrier round costs milliseconds (docs/gpu.md: MPS)"
            )
    for text in warnings:
        print(f"bench: warning: {text}", file=stream, flush=True)
    noise["warnings"] = warnings
    return noise


def noise_after(noise: dict, run_dir: str | os.PathLike) -> dict:
    """The facts of the start, the load after (the sweep's own ranks included: they were
    running until now) and the A/A figure of the rounds measured."""
    out = {**noise, "load_after": _load()}
    try:
        rounds = read_rounds(run_dir)
    except ImportError:  # pandas missing: the figure is computed by `bench report` instead
        return out
    if len(rounds):
        out["aa"] = aa_spread(rounds)
    return out
