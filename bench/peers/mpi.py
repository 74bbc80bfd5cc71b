"""`mpi`: MPI_Allreduce through mpi4py on a communicator of the group's own ranks (a peer).

Ranks must be started by an MPI launcher: `bench sweep --launcher mpirun` starts them with
mpirun, and `bench.run.session.dist_env` reads mpirun's OMPI_COMM_WORLD_* variables, so the
gloo group and MPI_COMM_WORLD hold the same processes. Ranks started by torchrun cannot form
one: each is an MPI singleton (size 1), and Open MPI's runtime supports neither MPI_Comm_join
nor ports without an ompi-server (one side errors, the other hangs), so the probe says
"needs --launcher mpirun" there. The communicator is MPI_COMM_WORLD's group reordered to the
gloo group's ranks (`Create_group`, collective over its members only), so a sub-group works.

dtypes. float32 goes as MPI_FLOAT with MPI_SUM, in place on the tensor's own memory (a NumPy
view, no copy; cached for the tensor last seen, as a loop calling it on one buffer would).
bfloat16 and float16: Open MPI 4.1 has neither type (MPI_BFLOAT16 is null, MPI_FLOAT16 absent)
and mpi4py's DLPack path sends bfloat16 as MPI_BYTE, whose SUM adds bytes: silently wrong.
Here they go as MPI_UINT16_T with a user-defined commutative op that adds them as torch
bfloat16/float16, a Python callback per reduction step: correct, and measured as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from bench.backends import get_spec, register
from bench.backends.base import BackendSpec, CommContext
from bench.environment import get
from bench.peers import APT_MPI, PIP_PEERS, installed

__all__ = ["MpiAllReduce", "launched_by_mpi"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# set by an MPI launcher in every rank (Open MPI's mpirun, MPICH/Intel's hydra, PMIx)
_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
_NEEDS_LAUNCHER = (
    "needs --launcher mpirun: ranks started by torchrun are MPI singletons that "
    "cannot join one communicator (Open MPI supports no MPI_Comm_join)"
)


def launched_by_mpi(env: Mapping[str, str] | None = None) -> bool:
    return any(get(name, env) is not None for name in _LAUNCHER_VARIABLES)


def _half_sum(dtype: torch.dtype):
    """The user op's function: inout += in, both MPI_UINT16_T buffers holding `dtype`."""

    def add(inbuf, inoutbuf, datatype) -> None:
        torch.frombuffer(inoutbuf, dtype=dtype).add_(torch.frombuffer(inbuf, dtype=dtype))

    return add


class MpiAllReduce:
    name = "mpi"
    in_place = True

    def __init__(self, ctx: CommContext, max_bytes: int | None = None) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        world = MPI.COMM_WORLD
        ranks: list = [None] * ctx.world_size
        dist.all_gather_object(ranks, world.Get_rank(), group=ctx.cpu_group)
        group = world.Get_group().Incl(ranks)
        self._comm = world.Create_group(group)
        group.Free()
        self._ops = {
            dtype: MPI.Op.Create(_half_sum(dtype), commute=True)
            for dtype in (torch.bfloat16, torch.float16)
        }
        self._last: tuple[Any, ...] = (None, 0, None)  # (tensor, data_ptr, MPI buffer spec)
        self._gate = get_spec(self.name).gate()

    def can_take(self, tensor: torch.Tensor) -> str | None:
        return self._gate(tensor)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        last, ptr, spec = self._last
        if last is not tensor or ptr != tensor.data_ptr():
            spec = self._spec(tensor)
            self._last = (tensor, tensor.data_ptr(), spec)
        if tensor.dtype is torch.float32:
            self._comm.Allreduce(self._mpi.IN_PLACE, spec, op=self._mpi.SUM)
        else:
            self._comm.Allreduce(self._mpi.IN_PLACE, spec, op=self._ops[tensor.dtype])
        return tensor

    def _spec(self, tensor: torch.Tensor):
        flat = tensor.detach().view(-1)
        if tensor.dtype is torch.float32:
            return flat.numpy()
        return [flat.view(torch.int16).numpy(), self._mpi.UINT16_T]

    def release(self) -> None:
        self._last = (None, 0, None)
        if self._comm is not None:
            self._comm.Free()
            for op in self._ops.values():
                op.Free()
            self._comm, self._ops = None, {}


def _probe(ctx: CommContext) -> str | None:
    if ctx.device.type != "cpu":
        return "mpi is measured on CPU tensors only (use --device cpu)"
    if not installed("mpi4py"):
        return f"mpi4py is not installed: {PIP_PEERS} and {APT_MPI}"
    if ctx.world_size > 1 and not launched_by_mpi():
        # before launch, `bench sweep --launcher mpirun` asks: its ranks check the rest
        return None if ctx.extra.get("launcher") == "mpirun" else _NEEDS_LAUNCHER
    try:
        from mpi4py import MPI
    except Exception as exc:  # mpi4py without a loadable MPI library
        return (
            f"mpi4py cannot load an MPI library ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}): {APT_MPI}"
        )
    size = MPI.COMM_WORLD.Get_size()
    if size < ctx.world_size:
        return (
            f"MPI_COMM_WORLD has {size} rank(s), the group {ctx.world_size}: start every "
            f"rank with the same mpirun (--launcher mpirun)"
        )
    return None


register(
    BackendSpec(
        name="mpi",
        device="cpu",
        probe=_probe,
        create=lambda ctx, max_bytes, **params: MpiAllReduce(ctx, max_bytes, **params),
        dtypes=_DTYPES,
        alignment=1,
        needs_buffer=False,
    )
)
