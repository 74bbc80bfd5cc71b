"""`tuner fit --numerics exact|any`: a table that keeps the reference arithmetic, when asked.

A sweep measures each point's arithmetic (`bench.run.numerics`): `numerics` is "reference"
where the backend's sum is the rank-order sum accumulated in float32 and rounded once. An
exact table is built only from those points, so every size range it holds gives the same bits
for the same element: a served model is batch-invariant with respect to the all-reduce. Where
no backend measured follows the reference at some size of a table, an exact table cannot be
built: `tuner fit` says which sizes and what was measured there.
"""

from __future__ import annotations

from collections.abc import Mapping

from bench.backends import params_key
from bench.launch.flags import UsageError
from bench.sizes import format_size
from tuner.runtime.schema import NUMERICS

__all__ = ["numerics_flag", "exact_rows", "keep_measured"]

_GROUP = ["hardware_key", "world_size", "dtype", "mode"]


def numerics_flag(text: str) -> str:
    if text not in NUMERICS:
        raise UsageError(f"--numerics: expected one of {', '.join(NUMERICS)}, got {text!r}")
    return text


def _measured_text(part) -> str:
    """`gloo other, shm_one_shot unknown` at one size: why no row of it is kept."""
    found = part["numerics"].astype("string").fillna("unknown (run made before numerics)")
    pairs = sorted(set(zip(part["backend"].astype(str), found, strict=True)))
    return ", ".join(f"{b} {n}" for b, n in pairs)


def exact_rows(rows):
    """The rows following the reference arithmetic; UsageError (one line) naming every size of
    every table where none does, and what each backend measured there."""
    keep = rows["numerics"].astype("string").fillna("") == "reference"
    missing: list[str] = []
    for group, part in rows.groupby(_GROUP, sort=True):
        hw, ws, dtype, mode = group
        lacking = [
            (nbytes, at)
            for nbytes, at in part.groupby("bytes", sort=True)
            if not keep[at.index].any()
        ]
        if lacking:
            sizes = "; ".join(f"{format_size(int(b))}: {_measured_text(at)}" for b, at in lacking)
            missing.append(f"{hw} world size {ws} {dtype} {mode} at {sizes}")
    if missing:
        raise UsageError(
            "--numerics exact: no backend measured follows the reference arithmetic "
            "(rank-order sum, float32 accumulation, one rounding) at "
            + " | ".join(missing)
            + "; fit those with --numerics any, or leave those sizes out of the runs"
        )
    return rows[keep]


def keep_measured(data: Mapping[tuple, Mapping[int, list]], rows) -> dict:
    """The study's points (`tuner.search.study.measurements`) of configurations `rows` hold at
    that size: a study database may hold trials of points that do not keep the arithmetic."""
    held = {
        (g, int(b), str(a), str(p))
        for *g_parts, b, a, p in rows[[*_GROUP, "bytes", "backend", "params"]].itertuples(
            index=False
        )
        for g in [(str(g_parts[0]), int(g_parts[1]), str(g_parts[2]), str(g_parts[3]))]
    }

    out: dict = {}
    for group, by_size in data.items():
        g = (str(group[0]), int(group[1]), str(group[2]), str(group[3]))
        sizes = {
            nbytes: [
                pt for pt in points if (g, int(nbytes), pt.algorithm, params_key(pt.params)) in held
            ]
            for nbytes, points in by_size.items()
        }
        sizes = {n: pts for n, pts in sizes.items() if pts}
        if sizes:
            out[group] = sizes
    return out
