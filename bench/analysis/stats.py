"""Summaries of ratios, written once: the analysis and the tuner both import them."""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["geomean"]


def geomean(values: Iterable[float], empty: float | None = float("nan")) -> float | None:
    """Geometric mean of the finite values > 0 (NaN, infinities and values <= 0 are left out);
    `empty` when none is left (NaN by default, for a frame's cell; the tuner asks for None)."""
    kept = [v for v in values if math.isfinite(v) and v > 0]
    return math.exp(sum(map(math.log, kept)) / len(kept)) if kept else empty
