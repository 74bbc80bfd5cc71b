"""Measured rows from sweep runs, each with the knob values it was measured with.

A results row names its backend but not its knobs: a sweep runs every backend with its default
knobs unless `--param BACKEND.KNOB=VALUE` was given, and those values are recorded in the run's
meta.json (`arguments.params`). So a row's configuration is the backend's default knobs updated
with that run's `--param` values for it. Only measured, correct rows count.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.analysis.results import (
    RESULTS_FILE,
    TABLE_KEY,
    SchemaError,
    correct_rows,
    read_meta,
    read_results,
)
from bench.analysis.rounds import ROUND_COLUMNS, read_rounds
from bench.backends import get_spec, params_key
from bench.run.hardware import device_of_key

__all__ = [
    "RunsError",
    "find_run_dirs",
    "load_rows",
    "load_rounds",
    "config_params",
    "GROUP",
    "device_of",
]

GROUP = TABLE_KEY  # one table per group


class RunsError(ValueError):
    """A run directory that cannot be used (one line, names it)."""


def _spec(name: str):
    try:
        return get_spec(name)
    except KeyError:
        return None


def config_params(backend: str, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The backend's default knobs updated with `given` (knobs of a backend whose family does
    not import here are what was given)."""
    spec = _spec(backend)
    params = spec.default_params() if spec is not None else {}
    params.update(given or {})
    return params


def device_of(backend: str, hardware_key: str) -> str:
    spec = _spec(backend)
    if spec is not None:
        return spec.device
    return device_of_key(hardware_key)


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Each path is a run directory (holds results.csv) or a folder of them (searched)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / RESULTS_FILE).is_file():
            out.append(path)
        elif path.is_dir():
            found = sorted(p.parent for p in path.rglob(RESULTS_FILE))
            if not found:
                raise RunsError(f"{path}: no results.csv in it or below it")
            out.extend(found)
        else:
            raise RunsError(f"{path}: not a run directory (no such directory)")
    return list(dict.fromkeys(out))


def load_rows(run_dirs: Iterable[str | os.PathLike]):
    """Every measured, correct row of the runs, with `params` (canonical JSON) and `run_dir`."""
    import pandas as pd

    frames = []
    for run_dir in run_dirs:
        try:
            frame = read_results(run_dir)
        except (FileNotFoundError, SchemaError) as exc:
            raise RunsError(str(exc)) from None
        meta = read_meta(run_dir)
        given = (meta.get("arguments") or {}).get("params") or {}
        ok = correct_rows(frame).copy()
        if ok.empty:
            continue
        ok["params"] = [params_key(config_params(b, given.get(b))) for b in ok["backend"]]
        ok["run_dir"] = str(run_dir)
        frames.append(ok)
    if not frames:
        return pd.DataFrame()
    rows = pd.concat(frames, ignore_index=True)
    rows["world_size"] = rows["world_size"].astype(int)
    rows["bytes"] = rows["bytes"].astype(int)
    return rows


def load_rounds(rows):
    """The round figures of the runs `rows` came from (`bench.analysis.rounds`), with `params`
    as `load_rows` gives them, kept only for the rows' points (measured and correct); an empty
    frame where no run has rounds (runs made before rounds)."""
    import pandas as pd

    frames = []
    point = ["run_id", "backend", "world_size", "dtype", "mode", "bytes"]
    for run_dir, part in rows.groupby("run_dir", sort=True) if len(rows) else ():
        try:
            rounds = read_rounds(run_dir)
        except ValueError as exc:
            raise RunsError(str(exc)) from None
        if rounds.empty:
            continue
        keep = part[[*point, "params"]].astype({"run_id": str, "backend": str})
        rounds = rounds[list(ROUND_COLUMNS)].astype({"run_id": str, "backend": str})
        frames.append(rounds.merge(keep, on=point, how="inner"))
    if not frames:
        return pd.DataFrame(columns=[*ROUND_COLUMNS, "params"])
    return pd.concat(frames, ignore_index=True)
