"""Every environment variable the project reads, in one table, and the one reading of each.

A variable is read when a process starts or builds something (a rank's set-up, a backend's
probe or constructor, the dispatcher's start-up, vLLM's plugin registration), never on the
per-call path. Every module asks `get(name)` (or a helper below) instead of `os.environ`;
`get` refuses a name this table does not list, and tests/test_house.py checks that no other
module of bench/ or tuner/ reads `os.environ` itself (writes for another library, such as
`bench.backends.base.scoped_env`, are not readings).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

__all__ = [
    "Variable",
    "VARIABLES",
    "get",
    "is_listed",
    "launched_rank",
    "multicast_off",
    "MULTICAST_SWITCHES",
]


@dataclasses.dataclass(frozen=True)
class Variable:
    name: str
    meaning: str
    read_by: str  # the modules that ask for it (through this one)


_OWN = "ALLREDUCE_AUTOTUNE_"
VARIABLES: tuple[Variable, ...] = (
    # the project's own
    Variable(
        _OWN + "THRESHOLDS",
        "thresholds.json for vLLM's plugin (unset: the plugin is off)",
        "tuner.engines.vllm_plugin, vllm_setup",
    ),
    Variable(
        _OWN + "STRICT",
        "0: a bad table is a warning and vLLM keeps its defaults; 1 (default): vLLM stops",
        "tuner.engines.vllm_setup",
    ),
    Variable(
        _OWN + "HARDWARE_KEY",
        "the hardware key vLLM's plugin matches instead of the node's own",
        "tuner.engines.vllm_setup",
    ),
    Variable(
        _OWN + "FORCE",
        "one algorithm for every size (the dispatcher's override)",
        "tuner.runtime.overrides",
    ),
    Variable(
        _OWN + "MAX_BYTES",
        "NAME=BYTES[,...]: move a rule's upper bound (the dispatcher's override)",
        "tuner.runtime.overrides",
    ),
    Variable(
        _OWN + "PLUGINS",
        "comma list of modules that register backends (without packaging)",
        "bench.backends",
    ),
    Variable(
        _OWN + "NCCL_PATH",
        "the libnccl.so.2 the pynccl backends load (else found as the module doc says)",
        "bench.backends.libnccl",
    ),
    Variable(
        _OWN + "CACHE",
        "where the shm short path's C library is built (default XDG_CACHE_HOME or ~/.cache)",
        "bench.backends.shm_native",
    ),
    Variable(
        "BENCH_RANK_PIDS_DIR",
        "set by bench's launcher for its ranks: where a rank leaves its pid",
        "bench.run.session",
    ),
    # other programs' variables the project honours
    Variable("XDG_CACHE_HOME", "the user's cache root", "bench.backends.shm_native"),
    Variable(
        "PATH", "where DeepSpeed's op build finds ninja (prepended)", "bench.peers.deepspeed_shm"
    ),
    Variable("CC", "the C compiler for the shm short path", "bench.backends.shm_native"),
    Variable(
        "OMP_NUM_THREADS",
        "the user's own OpenMP threads, kept for the ranks (else cores per local rank)",
        "bench.launch.launcher, bench.peers.deepspeed_shm",
    ),
    Variable(
        "TORCH_SYMM_MEM_DISABLE_MULTICAST",
        "NVLink multicast kept off (with the two below): multimem backends are skipped",
        "bench.backends.symm_mem, bench.vllm.backends, bench.doctor.node",
    ),
    Variable(
        "NCCL_NVLS_ENABLE",
        "0: NVLink multicast kept off (see above)",
        "bench.backends.symm_mem, bench.vllm.backends, bench.doctor.node",
    ),
    Variable(
        "NVSHMEM_DISABLE_NVLS",
        "1: NVLink multicast kept off (see above)",
        "bench.backends.symm_mem, bench.vllm.backends, bench.doctor.node",
    ),
    Variable(
        "VLLM_ROCM_QUICK_REDUCE_QUANTIZATION",
        "vLLM's quick reduce: NONE (vLLM's default) turns it off",
        "bench.vllm.backends",
    ),
    Variable(
        "CUDA_VISIBLE_DEVICES",
        "the GPUs the ranks may use: the launcher's GPU-memory check reads only those",
        "bench.launch.capacity",
    ),
    Variable(
        "CUDA_MPS_PIPE_DIRECTORY",
        "whether an MPS daemon serves this process (reported, not required)",
        "bench.run.noise, scripts",
    ),
    # a launcher's protocol: the rank layout and the rendezvous
    Variable(
        "RANK",
        "torchrun's rank (with WORLD_SIZE: already a rank)",
        "bench.run.session, launch.sweep",
    ),
    Variable("WORLD_SIZE", "torchrun's world size", "bench.run.session, sweep, tuner live"),
    Variable("LOCAL_RANK", "torchrun's local rank", "bench.run.session"),
    Variable("LOCAL_WORLD_SIZE", "torchrun's local world size", "bench.run.session"),
    Variable("MASTER_ADDR", "the rendezvous host", "bench.run.watchdog"),
    Variable("MASTER_PORT", "the rendezvous port", "bench.run.watchdog"),
    Variable("OMPI_COMM_WORLD_RANK", "Open MPI's rank", "bench.launch.mpirun"),
    Variable("OMPI_COMM_WORLD_SIZE", "Open MPI's world size", "bench.launch.mpirun, peers.mpi"),
    Variable("OMPI_COMM_WORLD_LOCAL_RANK", "Open MPI's local rank", "bench.launch.mpirun"),
    Variable("OMPI_COMM_WORLD_LOCAL_SIZE", "Open MPI's local size", "bench.launch.mpirun"),
    Variable("PMI_RANK", "MPICH/Intel MPI hydra's rank", "bench.launch.mpirun"),
    Variable("PMI_SIZE", "MPICH/Intel MPI hydra's size", "bench.launch.mpirun, peers.mpi"),
    Variable("PMIX_RANK", "a PMIx launcher's rank", "bench.peers.mpi"),
    Variable("MPI_LOCALRANKID", "hydra's local rank", "bench.launch.mpirun"),
    Variable("MPI_LOCALNRANKS", "hydra's local size", "bench.launch.mpirun"),
    Variable("SLURM_PROCID", "srun's rank", "bench.run.session"),
    Variable("SLURM_NTASKS", "srun's world size", "bench.run.session"),
    Variable("SLURM_LOCALID", "srun's local rank", "bench.run.session"),
    Variable("SLURM_NTASKS_PER_NODE", "srun's tasks per node", "bench.run.session"),
    Variable("SLURM_LAUNCH_NODE_IPADDR", "srun's launch host", "bench.run.session"),
)
_NAMES = frozenset(v.name for v in VARIABLES)

# (variable, the values that turn NVLink multicast off): exported together on shared machines
MULTICAST_SWITCHES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", ("1", "true")),
    ("NCCL_NVLS_ENABLE", ("0", "false")),
    ("NVSHMEM_DISABLE_NVLS", ("1", "true")),
)


def is_listed(name: str) -> bool:
    return name in _NAMES


def get(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of the listed variable `name` (None when unset); `environ` for a test or a
    child's environment, else the process's."""
    if name not in _NAMES:
        raise KeyError(f"{name} is not listed in bench.environment.VARIABLES")
    return (os.environ if environ is None else environ).get(name)


def launched_rank(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a torchrun-style launcher started this process as one rank."""
    return get("RANK", environ) is not None and get("WORLD_SIZE", environ) is not None


def multicast_off(environ: Mapping[str, str] | None = None) -> str | None:
    """`NAME=value` of the first switch that keeps NVLink multicast off, or None (one parsing
    for every reader: the symmetric-memory backends, vLLM's, `bench doctor`)."""
    for name, off in MULTICAST_SWITCHES:
        value = get(name, environ)
        if value is not None and value.strip().lower() in off:
            return f"{name}={value}"
    return None
