"""Byte sizes as nccl-tests writes them: 1K, 4KiB, 64M, 1G (powers of 1024)."""

from __future__ import annotations

import re

__all__ = ["parse_size", "format_size", "size_range"]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_PATTERN = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'64M' -> 67108864. Raises ValueError with the accepted forms."""
    if isinstance(text, int):
        if text < 1:
            raise ValueError(f"size must be >= 1 byte, got {text}")
        return text
    match = _PATTERN.match(str(text))
    if not match:
        raise ValueError(f"malformed size {text!r} (expected e.g. 1024, 1K, 4KiB, 64M, 1G)")
    value = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 1:
        raise ValueError(f"size must be >= 1 byte, got {text!r}")
    return value


def format_size(nbytes: int) -> str:
    """67108864 -> '64M'; sizes not a whole number of units stay in bytes."""
    for unit in ("G", "M", "K"):
        if nbytes >= _UNITS[unit] and nbytes % _UNITS[unit] == 0:
            return f"{nbytes // _UNITS[unit]}{unit}"
    return str(nbytes)


def size_range(min_bytes: int, max_bytes: int, factor: int = 2) -> list[int]:
    """Geometric sizes from min to max inclusive, as nccl-tests' -b/-e/-f."""
    if min_bytes < 1 or max_bytes < min_bytes:
        raise ValueError(f"need 1 <= min_bytes <= max_bytes, got {min_bytes}, {max_bytes}")
    if factor < 2:
        raise ValueError(f"factor must be >= 2, got {factor}")
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes
