"""A point's arithmetic, measured: random floats of mixed magnitude, not the exact integers.

The known inputs of `bench.run.inputs` sum exactly in any order, so they prove a backend adds
the right things, not how: a backend that sums in another order, or accumulates in another
precision, passes them. Here each rank's input is seeded random floats spanning 2^-8..2^8
(seeded per rank, dtype and element count: every backend of one size gets the same inputs, so
their bits can be compared across backends too), and one call's result is compared with
- the float64 sum (exact for these inputs): the error in units in the last place of the
  dtype at the sum's magnitude (`max_err_ulp`; at most 0.5 where the result is exactly
  rounded);
- the reference arithmetic: the rank-order sum (rank 0 + rank 1, then + rank 2, ...)
  accumulated in float32 and rounded once to the dtype (`numerics` = "reference", else
  "other"): the arithmetic whose bits a table can keep the same at every size;
- every other rank's result (`same_bits`), by a hash of the result's bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import zlib

import torch

__all__ = [
    "NUMERICS_REFERENCE",
    "NUMERICS_OTHER",
    "Numerics",
    "random_input",
    "reference",
    "local_numerics",
    "combine",
]

NUMERICS_REFERENCE = "reference"  # rank-order sum, float32 accumulation, one rounding
NUMERICS_OTHER = "other"
_MAGNITUDE_LOG2 = 8  # inputs span 2^-8..2^8 times a normal draw: bits of every kind meet


@dataclasses.dataclass(frozen=True)
class Numerics:
    """One point's arithmetic, agreed over every rank."""

    same_bits: bool  # every rank got the same bits
    numerics: str  # NUMERICS_REFERENCE where every rank's result equals the reference
    max_err_ulp: float  # the worst rank's error against the float64 sum, in the dtype's ulps


def _seed(dtype: torch.dtype, count: int, rank: int) -> int:
    return zlib.crc32(f"numerics:{dtype}:{count}:{rank}".encode())


def random_input(dtype: torch.dtype, count: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s input of `count` elements of `dtype` (on the CPU; the same everywhere)."""
    gen = torch.Generator().manual_seed(_seed(dtype, count, rank))
    scale = torch.randint(-_MAGNITUDE_LOG2, _MAGNITUDE_LOG2 + 1, (count,), generator=gen)
    values = torch.randn(count, generator=gen) * torch.exp2(scale.to(torch.float32))
    return values.to(dtype)


@functools.lru_cache(maxsize=2)  # every backend of one size in a round asks for the same one
def reference(dtype: torch.dtype, count: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the float64 sum over ranks, the reference arithmetic's result in `dtype`), on the CPU."""
    exact = torch.zeros(count, dtype=torch.float64)
    acc = torch.zeros(count, dtype=torch.float32)
    for rank in range(world_size):
        x = random_input(dtype, count, rank)
        exact += x.to(torch.float64)
        acc = x.to(torch.float32) if rank == 0 else acc + x.to(torch.float32)
    return exact, acc.to(dtype)


def _ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dtype's unit in the last place at each value's magnitude (float64)."""
    info = torch.finfo(dtype)
    precision_bits = 1 - round(math.log2(info.eps))
    min_exponent = math.frexp(info.tiny)[1]  # below it the spacing stays that of the subnormals
    _, exponent = torch.frexp(exact)
    exponent = torch.clamp(exponent, min=min_exponent)
    return torch.exp2((exponent - precision_bits).to(torch.float64))


def _hash(result: torch.Tensor) -> int:
    data = result.contiguous().view(torch.uint8).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def local_numerics(result: torch.Tensor | None, dtype: torch.dtype, world_size: int, count: int):
    """This rank's (hash of the result's bits, equals the reference, error in ulps); a
    result of the wrong size or dtype is (None, False, inf)."""
    if result is None or result.numel() != count or result.dtype != dtype:
        return None, False, math.inf
    got = result.detach().reshape(-1).cpu()
    exact, ref = reference(dtype, count, world_size)
    is_ref = bool(torch.equal(got.view(_int_of(dtype)), ref.view(_int_of(dtype))))
    err = ((got.to(torch.float64) - exact).abs() / _ulp(exact, dtype)).max()
    err_ulp = math.inf if torch.isnan(err) else float(err)
    return _hash(got), is_ref, err_ulp


def _int_of(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        torch.empty((), dtype=dtype).element_size()
    ]


def combine(per_rank: list[tuple]) -> Numerics:
    """Every rank's `local_numerics` as the point's figure."""
    hashes = {h for h, _, _ in per_rank}
    return Numerics(
        same_bits=len(hashes) == 1 and None not in hashes,
        numerics=NUMERICS_REFERENCE if all(r for _, r, _ in per_rank) else NUMERICS_OTHER,
        max_err_ulp=max(e for _, _, e in per_rank),
    )
