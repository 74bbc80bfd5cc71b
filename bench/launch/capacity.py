"""What this node can hold, checked before any rank starts: memory for the largest size, and
ranks for its cores. One line naming the flag and the limit, or None."""

from __future__ import annotations

import os

__all__ = ["RANKS_PER_CORE", "BUFFERS_PER_RANK", "memory_reason", "ranks_reason", "cores"]

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


def memory_reason(max_bytes: int, local_ranks: int, device: str) -> str | None:
    """Why the largest size cannot fit in this node's memory (CPU ranks), or None. GPU memory
    is each rank's device's, judged by the rank (the launcher does not start CUDA)."""
    if device != "cpu":
        return None
    available = _available_bytes()
    need = max_bytes * BUFFERS_PER_RANK * local_ranks
    if available is None or need <= available:
        return None
    return (
        f"--max-bytes: {max_bytes} bytes need at least {need} bytes of memory "
        f"({BUFFERS_PER_RANK} tensors per rank x {local_ranks} ranks), this node has "
        f"{available} available"
    )


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
