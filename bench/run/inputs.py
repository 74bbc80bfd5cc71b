"""Deterministic inputs and their exact reference sum.

Rank r's element i is a small integer, ((i mod 17) * a + r * b) mod 5 - 2 with a, b drawn from
the point's seed: never all zeros, different on every rank and every point, and exact in
bf16/fp16/fp32 for any order of summation up to 128 ranks (|sum| <= 256). So a correct
all-reduce matches the reference to the bit, and any error is a real one.
"""

from __future__ import annotations

import torch

__all__ = ["fill_input", "reference_sum", "check_result"]

_PERIOD = 17


def _coefficients(seed: int) -> tuple[int, int]:
    a = 1 + (seed * 7) % 4  # 1..4: coprime with 5, so every value in -2..2 appears
    b = 1 + (seed * 3) % 4
    return a, b


def _pattern(count: int, device: torch.device, seed: int) -> torch.Tensor:
    a, _ = _coefficients(seed)
    idx = torch.arange(count, device=device, dtype=torch.int32) % _PERIOD
    return idx * a


def fill_input(tensor: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    _, b = _coefficients(seed)
    values = (_pattern(tensor.numel(), tensor.device, seed) + rank * b) % 5 - 2
    tensor.view(-1).copy_(values)
    return tensor


def reference_sum(count: int, world_size: int, seed: int, device: torch.device) -> torch.Tensor:
    """The exact sum over ranks, in float32."""
    _, b = _coefficients(seed)
    base = _pattern(count, device, seed)
    total = torch.zeros(count, dtype=torch.float32, device=device)
    for rank in range(world_size):
        total += ((base + rank * b) % 5 - 2).to(torch.float32)
    return total


def check_result(result: torch.Tensor, rank: int, world_size: int, seed: int) -> float:
    """Max absolute error of `result` against the reference sum (0.0 when exact; inf for
    NaN or a result of the wrong size)."""
    if result is None or result.numel() == 0:
        return float("inf")
    ref = reference_sum(result.numel(), world_size, seed, result.device)
    diff = (result.reshape(-1).to(torch.float32) - ref).abs()
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max().item())
