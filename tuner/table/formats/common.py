"""What every export format shares: the one-line refusal, the CUDA capability of a hardware
key, picking the tables a format exports, and a table's rules as size ranges."""

from __future__ import annotations

from collections.abc import Iterator

from bench.run.hardware import device_of_key
from tuner.runtime.schema import Rule, Table, Thresholds

__all__ = ["ExportError", "capability_of", "pick_tables", "spans", "NCCL", "UNBOUNDED"]

# our algorithms that are NCCL's all-reduce with NCCL's own algorithm choice (and its knobs)
NCCL = ("nccl", "pynccl")
UNBOUNDED = (1 << 64) - 1  # "every larger size" where a format needs a number


class ExportError(ValueError):
    """The table cannot be said in this format: one line naming what and why."""


# GPU model words in our hardware keys -> CUDA capability (public NVIDIA specifications)
_CAPABILITY = (
    ("gh200", "9.0"),
    ("h100", "9.0"),
    ("h200", "9.0"),
    ("h800", "9.0"),
    ("gb200", "10.0"),
    ("b200", "10.0"),
    ("b100", "10.0"),
    ("a100", "8.0"),
    ("a800", "8.0"),
    ("l40s", "8.9"),
    ("l40", "8.9"),
    ("l4-", "8.9"),
)


def capability_of(hardware_key: str) -> str:
    """'9.0' for an H100/H200 key; the hardware key itself for CPU or an unknown model."""
    if device_of_key(hardware_key) == "cpu":
        return hardware_key
    for word, capability in _CAPABILITY:
        if word in hardware_key:
            return capability
    return hardware_key


def pick_tables(
    thresholds: Thresholds,
    fmt: str,
    dtype: str | None = None,
    mode: str | None = None,
    world_size: int | None = None,
) -> list[Table]:
    """The tables of `dtype` (default bfloat16), `mode` (both when None) and `world_size`
    (all when None); refuses in one line when nothing is left."""
    want = dtype or "bfloat16"
    tables = [
        t
        for t in thresholds.tables
        if t.dtype == want
        and (mode is None or t.mode == mode)
        and (world_size is None or t.world_size == world_size)
    ]
    if not tables:
        have = sorted({f"{t.dtype}/{t.mode}/ws{t.world_size}" for t in thresholds.tables})
        raise ExportError(
            f"{fmt}: no table for {want}, mode {mode or 'any'}, world size "
            f"{world_size or 'any'} (the file has {', '.join(have) or 'none'})"
        )
    return sorted(tables, key=lambda t: (t.hardware_key, t.world_size, t.mode))


def spans(table: Table) -> Iterator[tuple[int, int | None, Rule]]:
    """(first byte count, last byte count or None for every larger size, rule), in order."""
    low = 0
    for rule in table.rules:
        yield low + 1 if low else 0, rule.max_bytes, rule
        low = rule.max_bytes or low
