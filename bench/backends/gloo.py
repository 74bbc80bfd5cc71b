"""`gloo`: torch.distributed all-reduce over a Gloo process group (the CPU floor)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from bench.backends import get_spec, register
from bench.backends.base import BackendSpec, CommContext

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class GlooAllReduce:
    name = "gloo"
    in_place = True

    def __init__(self, ctx: CommContext, max_bytes: int | None = None) -> None:
        self._group = ctx.cpu_group
        self._max_bytes = max_bytes
        self._gate = get_spec(self.name).gate()

    def can_take(self, tensor: torch.Tensor) -> str | None:
        return self._gate(tensor)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self._group)
        return tensor

    def release(self) -> None:
        self._group = None


def _probe(ctx: CommContext) -> str | None:
    if ctx.device.type != "cpu":
        return "gloo is timed on CPU tensors only (use --device cpu)"
    return None


register(
    BackendSpec(
        name="gloo",
        device="cpu",
        probe=_probe,
        create=lambda ctx, max_bytes, **params: GlooAllReduce(ctx, max_bytes, **params),
        dtypes=_DTYPES,
        alignment=1,
        needs_buffer=False,
        is_floor=True,
    )
)
