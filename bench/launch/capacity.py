"""What this node can hold, checked before any rank starts: memory for the largest size (host
memory for CPU ranks, each GPU's free memory for CUDA ranks), and ranks for its cores. One
line naming the flag and the limit, or None."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

from bench import backends as registry
from bench.backends.shm_segment import shm_room_reason
from bench.environment import get

__all__ = [
    "RANKS_PER_CORE",
    "BUFFERS_PER_RANK",
    "gpu_free_bytes",
    "memory_reason",
    "shared_memory_reasons",
    "ranks_reason",
    "cores",
]

# ranks per core beyond which a sweep measures the scheduler rather than the all-reduce (the
# CI boxes run 4 ranks on 2 cores on purpose); beyond it, --oversubscribe says it is meant
RANKS_PER_CORE = 4
# tensors of the largest size every rank holds at once, at least: the input and the reference
# sum it is checked against (backends with a buffer hold more; this bound never refuses a
# sweep that could fit)
BUFFERS_PER_RANK = 2


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _available_bytes() -> int | None:
    """MemAvailable (plus free swap) from /proc/meminfo; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            fields = {line.split(":")[0]: line.split()[1] for line in fh if ":" in line}
        return (int(fields["MemAvailable"]) + int(fields.get("SwapFree", 0))) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None


def gpu_free_bytes() -> list[int] | None:
    """Free memory of each GPU the ranks may use, from NVML (no CUDA context is made in the
    launcher); None where NVML cannot say, or CUDA_VISIBLE_DEVICES names GPUs by UUID."""
    try:
        import pynvml  # optional: nvidia-ml-py is installed, a driver may not be

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: the ranks find out, with their own reason
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        indices: list[int] = list(range(count))
        visible = get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            parts = [v.strip() for v in visible.split(",") if v.strip()]
            if not all(v.isdigit() for v in parts):
                return None
            indices = [int(v) for v in parts if int(v) < count]
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        return [int(pynvml.nvmlDeviceGetMemoryInfo(h).free) for h in handles] or None
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def memory_reason(max_bytes: int, local_ranks: int, device: str) -> str | None:
    """Why the largest size cannot fit in this node's memory, or None: host memory for CPU
    ranks; for CUDA ranks the free memory of the fullest GPU, the ranks spread over the GPUs
    as the launcher places them (several ranks on one GPU share it)."""
    if device == "cpu":
        available = _available_bytes()
        need = max_bytes * BUFFERS_PER_RANK * local_ranks
        if available is None or need <= available:
            return None
        return (
            f"--max-bytes: {max_bytes} bytes need at least {need} bytes of memory "
            f"({BUFFERS_PER_RANK} tensors per rank x {local_ranks} ranks), this node has "
            f"{available} available"
        )
    free = gpu_free_bytes()
    if not free:
        return None
    per_gpu = math.ceil(local_ranks / len(free))
    need = max_bytes * BUFFERS_PER_RANK * per_gpu
    if need <= min(free):
        return None
    gpu = free.index(min(free))
    return (
        f"--max-bytes: {max_bytes} bytes need at least {need} bytes of GPU memory "
        f"({BUFFERS_PER_RANK} tensors per rank x {per_gpu} ranks per GPU), GPU {gpu} has "
        f"{min(free)} free"
    )


def shared_memory_reasons(
    backends: Sequence[str], local_ranks: int, max_bytes: int, params: Mapping[str, Mapping]
) -> dict[str, str]:
    """Backend -> why /dev/shm cannot hold its segment (its spec's `shared_bytes`), for those
    that cannot; each judged alone, as the sweep builds one alone when they do not fit
    together (held_groups)."""
    if local_ranks < 2:
        return {}
    reasons = {}
    for name in backends:
        try:
            spec = registry.get_spec(name)
        except KeyError:
            continue  # not importable here: the sweep records why
        if spec.shared_bytes is None:
            continue
        why = shm_room_reason(spec.shared_bytes(local_ranks, max_bytes, params.get(name, {})))
        if why:
            reasons[name] = f"at {local_ranks} ranks: {why} (a container: --shm-size)"
    return reasons


def ranks_reason(local_ranks: int, oversubscribe: bool) -> str | None:
    """Why this many ranks on this node's cores is refused without --oversubscribe, or None."""
    limit = RANKS_PER_CORE * cores()
    if oversubscribe or local_ranks <= limit:
        return None
    return (
        f"--world-size: {local_ranks} ranks on this node's {cores()} cores (more than "
        f"{RANKS_PER_CORE} per core: the timings would measure the scheduler); add "
        "--oversubscribe to run them anyway"
    )
