"""Probe reasons shared by the GPU families (nccl, pynccl, symm_mem)."""

from __future__ import annotations

import torch

from bench.backends.base import CommContext

__all__ = ["cuda_reason", "one_gpu_per_rank_reason", "device_index"]


def cuda_reason(ctx: CommContext, name: str) -> str | None:
    if ctx.device.type != "cuda":
        return f"{name} needs a CUDA device (this sweep runs on {ctx.device.type})"
    return None


def one_gpu_per_rank_reason(ctx: CommContext, library: str) -> str | None:
    """NCCL and PyTorch symmetric memory refuse two ranks on one GPU."""
    ranks, gpus = ctx.local_world_size, ctx.visible_gpus
    if ranks > gpus:
        return f"{library} needs one GPU per rank: {ranks} ranks on {gpus} visible GPUs"
    if not torch.cuda.is_available():
        return f"{library} needs CUDA: torch {torch.__version__} sees no CUDA device"
    return None


def device_index(device: torch.device) -> int:
    """The GPU index a communicator serves (`make_gate`'s `device_index`)."""
    return device.index if device.index is not None else torch.cuda.current_device()
