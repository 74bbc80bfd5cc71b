"""Peer libraries measured beside the own backends, as plug-ins (never in `FAMILIES`).

Each module registers one name through the entry-point group `allreduce_autotune.backends`
(pyproject.toml) and imports its library only when probed, so `bench/` keeps no hard
dependency on them: a peer that is not installed here is a skipped row whose reason carries
the install command, never an import error.

- `mpi` (`bench.peers.mpi`): MPI_Allreduce through mpi4py, on ranks started by mpirun
  (`bench sweep --launcher mpirun`).
- `deepspeed_shm` (`bench.peers.deepspeed_shm`): DeepSpeed's shared-memory all-reduce op,
  built from the installed package's sources, inside our own gloo group.

oneCCL is not offered: see `ONECCL_REASON`.
"""

from __future__ import annotations

__all__ = ["PIP_PEERS", "APT_MPI", "ONECCL_REASON", "installed"]

# the install lines a skip reason names (README's "Peers" section says the same)
PIP_PEERS = "pip install -e '.[peers]'"
APT_MPI = "apt-get install -y openmpi-bin libopenmpi-dev"
ONECCL_REASON = (
    "oneCCL cannot be had for torch 2.13 on PyPI: oneccl_bind_pt/torch-ccl are published only "
    "on Intel's own index, intel-extension-for-pytorch 2.8 refuses torch 2.13 at import, and "
    "the oneccl-cpu wheels' libccl.so.1 needs libccl.so.2, which only the full oneccl wheel "
    "ships (its tcp-only transport also measured 10x behind MPI here)"
)


def installed(module: str) -> bool:
    """Whether `module` can be imported here, without importing it (nor running its
    package's `__init__`)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
