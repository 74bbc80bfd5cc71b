"""`deepspeed_shm`: DeepSpeed's shared-memory all-reduce, inside our gloo group (a peer).

The op is DeepSpeed's `ShareMemCommBuilder` op (`deepspeed_shm_comm`): its two C++ sources
from the installed `deepspeed` package, JIT-built by torch.utils.cpp_extension with the
builder's flags (`-O2 -fopenmp`; ~90 s the first time, then loaded from TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions). DeepSpeed's Python runtime is never imported, so nothing
can fall back silently to torch.distributed: the backend calls
`torch.ops.deepspeed.inference_all_reduce_` itself, and creating it checks that the op
registered, that this CPU runs its kernels and that one call really reduces.

What the op does (deepspeed/ops/csrc/cpu/comm/shm.cpp, 0.19.8): one /dev/shm file per rank
(2 x 1 MiB + 2 x 32 MiB); below 1 MiB each rank copies into its buffer, publishes a state
flag and sums every rank's buffer into its tensor (one-shot, three flag states so one barrier
per call suffices); from 1 MiB, in 32 MiB pieces, reduce-scatter and all-gather through the
buffers (two barriers). Waiting is a pure busy spin without pause, yield or timeout; the
copies and sums use OpenMP threads of their own.

Its pitfalls, handled here:
- it sets up shared memory only when the environment's LOCAL_SIZE equals the world size
  (else the first call SIGSEGVs): LOCAL_SIZE is set for `initialize` (one host only);
- it names its files after MASTER_ADDR/MASTER_PORT and never removes them (~66 MiB per rank,
  and a later run on that port attaches the stale ones): `initialize` runs with this run's
  tag in their place, and once every rank has mapped every file, each rank unlinks its own,
  so nothing is left in /dev/shm even when a rank is killed;
- float64, integers and non-contiguous tensors are silently returned unreduced: `can_take`
  refuses them, and sizes of 2 GiB or more (its byte count is an int);
- its state is per process (one `initialize`, never undone): a second backend in the same
  process reuses it when the group is the same and is refused otherwise;
- `initialize` holds the GIL while it waits for every peer's file, so the watchdog could not
  end a rank whose peer stopped there: a timer (SIGALRM, default action) bounds it by
  ctx.timeout_s. The all-reduce itself releases the GIL (torch.ops), so the watchdog
  bounds a spin on a dead peer as for every backend.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from bench.backends import get_spec, register
from bench.backends.base import BackendSpec, CommContext, scoped_env
from bench.environment import get
from bench.peers import PIP_PEERS, installed

__all__ = ["DeepSpeedShm", "load_op", "shm_files"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BYTES = (1 << 31) - 1  # data_size is an int in shm_interface.cpp
_NAME = "deepspeed_shm_comm"
_FILE_PREFIX = "deepspeed_allreduce_buffer"
_INSTALL = f"DS_BUILD_OPS=0 {PIP_PEERS} (deepspeed==0.19.8; its op is built by g++ and ninja)"
# the process's one initialisation: (world size, rank, run tag) or None
_initialized: list[tuple[int, int, str]] = []


def _sources() -> tuple[list[Path], Path]:
    """(C++ sources, include directory) of the installed deepspeed package, not imported."""
    import importlib.util

    spec = importlib.util.find_spec("deepspeed")
    root = Path(next(iter(spec.submodule_search_locations))) / "ops" / "csrc"
    return [
        root / "cpu" / "comm" / "shm_interface.cpp",
        root / "cpu" / "comm" / "shm.cpp",
    ], root / "includes"


def load_op(verbose: bool = False):
    """Build (the first time) or load the op; returns its Python module (`initialize`,
    `vector_kernel_level`); the collective is `torch.ops.deepspeed.inference_all_reduce_`."""
    from torch.utils.cpp_extension import load

    with contextlib.suppress(ImportError):  # pip's ninja: its binary may not be on PATH
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, get("PATH") or ""])
    sources, include = _sources()
    return load(
        name=_NAME,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(include)],
        extra_cflags=["-O2", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=verbose,
    )


def shm_files(tag: str) -> list[Path]:
    """The op's /dev/shm files of the run `tag` (every rank's, by this user)."""
    return sorted(Path("/dev/shm").glob(f"{_FILE_PREFIX}_{os.getuid()}_aat_{tag}_*"))


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@contextlib.contextmanager
def _bounded(seconds: float):
    """End the process (SIGALRM, default action) if the block outlasts `seconds`: for C++
    waits that hold the GIL, where no Python watchdog can run."""
    if signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL:
        yield  # someone else owns SIGALRM: unbounded, as before
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _initialize(module, ctx: CommContext) -> None:
    """DeepSpeed's `initialize` under this run's names; then every rank unlinks its file."""
    with (
        scoped_env(
            {"LOCAL_SIZE": str(ctx.world_size), "MASTER_ADDR": "aat", "MASTER_PORT": ctx.run_tag}
        ),
        _bounded(ctx.timeout_s),
    ):
        module.initialize(ctx.world_size, ctx.rank)
    _initialized.append((ctx.world_size, ctx.rank, ctx.run_tag))
    dist.barrier(group=ctx.cpu_group)  # every rank has mapped every file
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/{_FILE_PREFIX}_{os.getuid()}_aat_{ctx.run_tag}_{ctx.rank}")


class DeepSpeedShm:
    name = "deepspeed_shm"
    in_place = True

    def __init__(self, ctx: CommContext, max_bytes: int | None = None) -> None:
        self._gate = get_spec(self.name).gate(_MAX_BYTES)
        module, error = None, None
        try:
            # its OpenMP runtime (the system's libgomp, not torch's) reads OMP_NUM_THREADS
            # when the op loads: the cores per local rank, as DeepSpeed's launcher sets it
            # with --bind_cores_to_rank (2 threads per rank on 2 cores spin against each other)
            cores = len(os.sched_getaffinity(0)) // max(1, ctx.local_world_size)
            with scoped_env({"OMP_NUM_THREADS": get("OMP_NUM_THREADS") or str(max(1, cores))}):
                module = load_op()
            self._op = torch.ops.deepspeed.inference_all_reduce_  # AttributeError: absent
            if module.vector_kernel_level() < 2:
                error = "the op's kernels need avx512bw, which this CPU lacks"
        except Exception as exc:  # a failed build or load, said once by every rank
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}"
        errors: list = [None] * ctx.world_size
        dist.all_gather_object(errors, error, group=ctx.cpu_group)
        if any(errors):  # every rank stops here, before the first collective of the op
            raise RuntimeError(next(e for e in errors if e))
        if not _initialized:
            _initialize(module, ctx)
        elif _initialized[0][:2] != (ctx.world_size, ctx.rank):
            size, rank, _ = _initialized[0]
            raise RuntimeError(
                f"DeepSpeed's shm op was initialised once in this process, for "
                f"rank {rank} of {size}; it cannot serve another group"
            )
        check = torch.ones(16)
        self._op(check)
        if not bool((check == ctx.world_size).all()):
            raise RuntimeError(
                f"the op did not reduce (got {check[0].item()} for {ctx.world_size} ranks of ones)"
            )

    def can_take(self, tensor: torch.Tensor) -> str | None:
        return self._gate(tensor)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._op(tensor)
        return tensor

    def release(self) -> None:
        """The op keeps its mappings for the process's life (it has no way to close them);
        its files are unlinked already, so nothing of it outlives the process."""
        self._op = None


def _probe(ctx: CommContext) -> str | None:
    if ctx.device.type != "cpu":
        return "deepspeed_shm is measured on CPU tensors only (use --device cpu)"
    if not installed("deepspeed"):
        return f"deepspeed is not installed: {_INSTALL}"
    if not all(path.is_file() for path in _sources()[0]):
        return f"this deepspeed has no shm op sources ({_sources()[0][0]}): {_INSTALL}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"only x86-64 is measured here; this is {platform.machine()}"
    if "avx512bw" not in _cpu_flags():
        return "its kernels are compiled for avx512bw (all dtypes), which this CPU lacks"
    if ctx.local_world_size != ctx.world_size:
        return f"ranks span {ctx.nnodes} hosts; DeepSpeed's shm all-reduce needs one host"
    if _initialized and _initialized[0][:2] != (ctx.world_size, ctx.rank):
        return "DeepSpeed's shm op is initialised once per process, for another group"
    return None


register(
    BackendSpec(
        name="deepspeed_shm",
        device="cpu",
        probe=_probe,
        create=lambda ctx, max_bytes, **params: DeepSpeedShm(ctx, max_bytes, **params),
        dtypes=_DTYPES,
        alignment=1,
        needs_buffer=False,
    )
)
