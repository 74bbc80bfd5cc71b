"""`nccl`: torch.distributed all-reduce over a NCCL process group, one GPU per rank.

The group is made with `dist.new_group(backend="nccl")` over all ranks of the sweep (whose
default group is gloo), and warmed up with one all-reduce at creation so the communicator
exists before any CUDA-graph capture. Knob `ctas` bounds NCCL's CTAs (channels) through the
process group's ncclConfig_t (min_ctas = max_ctas = ctas); 0 leaves NCCL's choice. Knobs
`algo` and `proto` force NCCL's algorithm and protocol for this communicator (NCCL_ALGO /
NCCL_PROTO while it is created, the warm-up creating it); "default" leaves NCCL's choice.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from bench.backends import get_spec, register
from bench.backends.base import BackendSpec, CommContext
from bench.backends.gpu_gate import cuda_reason, device_index, one_gpu_per_rank_reason
from bench.backends.libnccl import ALGOS, CTAS, PROTOS, algo_proto_env

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NcclAllReduce:
    name = "nccl"
    in_place = True

    def __init__(
        self,
        ctx: CommContext,
        max_bytes: int | None = None,
        ctas: int = 0,
        algo: str = "default",
        proto: str = "default",
    ) -> None:
        self.device = ctx.device
        self._index = device_index(ctx.device)
        self._gate = get_spec(self.name).gate(None, self._index)
        options = None
        if ctas:
            options = dist.ProcessGroupNCCL.Options()
            options.config.min_ctas = ctas
            options.config.max_ctas = ctas
        with algo_proto_env(algo, proto):  # NCCL reads them when the first call creates it
            self._group = dist.new_group(
                backend="nccl",
                timeout=datetime.timedelta(seconds=ctx.timeout_s),
                pg_options=options,
            )
            warm = torch.ones(16, dtype=torch.float32, device=self.device)
            dist.all_reduce(warm, group=self._group)
            torch.cuda.synchronize(self.device)
        if warm[0].item() != ctx.world_size:
            raise RuntimeError(
                f"NCCL warm-up all-reduce gave {warm[0].item()}, expected {ctx.world_size}"
            )

    def can_take(self, tensor: torch.Tensor) -> str | None:
        return self._gate(tensor)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self._group)
        return tensor

    def release(self) -> None:
        if self._group is not None:
            group, self._group = self._group, None
            torch.cuda.synchronize(self.device)
            dist.destroy_process_group(group)


def _probe(ctx: CommContext) -> str | None:
    reason = cuda_reason(ctx, "nccl") or one_gpu_per_rank_reason(ctx, "NCCL")
    if reason:
        return reason
    if not dist.is_nccl_available():
        return f"torch {torch.__version__} was built without NCCL"
    return None


register(
    BackendSpec(
        name="nccl",
        device="cuda",
        probe=_probe,
        create=lambda ctx, max_bytes, **params: NcclAllReduce(ctx, max_bytes, **params),
        knobs={"ctas": CTAS, "algo": ALGOS, "proto": PROTOS},
        dtypes=_DTYPES,
        alignment=1,
        needs_buffer=False,
        is_floor=True,
    )
)
