"""`bench sweep --launcher mpirun`: this node's ranks started by MPI's own launcher.

An MPI library's communicator can only hold processes its launcher started: ranks started by
torchrun are MPI singletons that cannot join one another (Open MPI supports no
MPI_Comm_join, and ports need an ompi-server). So for the `mpi` peer the sweep starts its
ranks with

    mpirun [--allow-run-as-root] --oversubscribe --bind-to none -np N
           -x MASTER_ADDR=A -x MASTER_PORT=P python -m bench.run.worker <the sweep's flags>

and each rank takes its layout from mpirun's variables (`mpi_layout`, read by
`bench.run.session.dist_env`), so the gloo group is built over exactly MPI_COMM_WORLD's
processes, rank for rank. Everything else is as under torchrun: every backend runs in those
ranks, and each rank's watchdog ends it after `--timeout` seconds without progress; mpirun
then ends the others (a rank that exits non-zero aborts the job).

`--oversubscribe`: more ranks than cores is allowed (Open MPI then yields when idle);
`--mca btl_vader_single_copy_mechanism none` only where CMA is not permitted (`cma_usable`);
`--bind-to none`: no rank is pinned to a core, as under torchrun (mpirun pins ranks to cores
by default when they fit). One node only: across nodes, run your own `mpirun -H ...
python -m bench.run.worker`, which reads the same variables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from bench.environment import get
from bench.launch.launcher import free_port
from bench.run.watchdog import EXIT_WATCHDOG

__all__ = [
    "MPIRUN_INSTALL",
    "mpirun_reason",
    "mpi_layout",
    "export_layout",
    "mpirun_command",
    "launch_mpirun",
    "cma_usable",
]

MPIRUN_INSTALL = "apt-get install -y openmpi-bin libopenmpi-dev"


def mpirun_reason() -> str | None:
    """None when an Open MPI mpirun is on PATH, else why not and how to get one."""
    path = shutil.which("mpirun")
    if path is None:
        return f"mpirun is not on PATH (install Open MPI: {MPIRUN_INSTALL})"
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{path} --version failed: {exc}"
    if "Open MPI" not in version:
        first = version.strip().splitlines()[0] if version.strip() else "unknown"
        return f"{path} is not Open MPI's ({first}); start the ranks yourself with it"
    return None


def mpi_layout(env: Mapping[str, str] | None = None) -> dict[str, int] | None:
    """This rank's layout from Open MPI's mpirun variables (or MPICH/Intel MPI hydra's), or
    None when no MPI launcher started this process."""

    def read(name: str, default: int | None = None) -> int | None:
        value = get(name, env)
        return default if value is None else int(value)

    if read("OMPI_COMM_WORLD_RANK") is not None:
        size = read("OMPI_COMM_WORLD_SIZE")
        return {
            "rank": read("OMPI_COMM_WORLD_RANK"),
            "world_size": size,
            "local_rank": read("OMPI_COMM_WORLD_LOCAL_RANK", 0),
            "local_world_size": read("OMPI_COMM_WORLD_LOCAL_SIZE", size),
        }
    if read("PMI_RANK") is not None and read("PMI_SIZE") is not None:
        size = read("PMI_SIZE")
        return {
            "rank": read("PMI_RANK"),
            "world_size": size,
            "local_rank": read("MPI_LOCALRANKID", 0),
            "local_world_size": read("MPI_LOCALNRANKS", size),
        }
    return None


def export_layout(layout: Mapping[str, int]) -> None:
    """torch.distributed's env:// variables from an MPI layout (MASTER_* defaults as under
    srun: mpirun itself sets none)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    for name, key in (
        ("RANK", "rank"),
        ("WORLD_SIZE", "world_size"),
        ("LOCAL_RANK", "local_rank"),
        ("LOCAL_WORLD_SIZE", "local_world_size"),
    ):
        os.environ[name] = str(layout[key])


def cma_usable() -> bool:
    """Whether Open MPI's vader can copy between ranks with CMA (process_vm_readv): it needs
    ptrace rights over its peers (CAP_SYS_PTRACE, or Yama's ptrace_scope 0). Containers often
    deny them, and vader then fails at its first large message ("Read -1, expected ...")."""
    try:
        scope = int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        scope = 0  # no Yama: same-user ptrace is allowed
    try:
        status = Path("/proc/self/status").read_text()
        capabilities = int(status.split("CapEff:")[1].split()[0], 16)
    except (OSError, IndexError, ValueError):
        capabilities = 0
    return scope == 0 or (scope < 3 and bool(capabilities & (1 << 19)))


def mpirun_command(cfg, argv: list[str], port: int) -> list[str]:
    """The mpirun line that starts cfg.world_size ranks (cfg: the SweepConfig) of `python -m bench.run.worker argv`."""
    cmd = [shutil.which("mpirun") or "mpirun"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if not cma_usable():  # single copies through the shared segment instead
        cmd += ["--mca", "btl_vader_single_copy_mechanism", "none"]
    cmd += [
        "--oversubscribe",
        "--bind-to",
        "none",
        "-np",
        str(cfg.world_size),
        "-x",
        f"MASTER_ADDR={cfg.master_addr}",
        "-x",
        f"MASTER_PORT={port}",
    ]
    return cmd + [sys.executable, "-m", "bench.run.worker", *argv]


def launch_mpirun(cfg, argv: list[str]) -> int:
    """Run the sweep's ranks under mpirun; its exit code, with one line when a rank failed
    (finished rows are kept in cfg.out)."""

    port = cfg.master_port or free_port(cfg.master_addr)
    code = subprocess.run(mpirun_command(cfg, argv, port)).returncode
    if code in (0, 1, 2):  # done; wrong sums (the summary said so); a usage error (said)
        return code
    why = (
        f"no progress for --timeout {cfg.timeout_s:g} s; the line above names the silent ranks"
        if code == EXIT_WATCHDOG
        else f"mpirun exit code {code}"
    )
    print(
        f"bench: the mpirun launch failed ({why}); finished rows are kept"
        + (f" in {cfg.out}" if cfg.out else ""),
        file=sys.stderr,
    )
    return 1
