"""From measured configurations to thresholds.json: one table per group, with its evidence.

`fit_tables` reads a study storage (every completed trial, whether entered from sweep rows or
measured live), builds each group's table with the exact DP builder and reports regret vs the
per-size oracle and gain vs the default backend (nccl on GPU, gloo on CPU).
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from bench.analysis.stats import geomean
from bench.backends import floor_name, params_key
from bench.run.hardware import device_of_key
from bench.sizes import format_size
from tuner.runtime.schema import Table, Thresholds
from tuner.search.study import Point
from tuner.table.builder import (
    Build,
    Curve,
    build_table,
    config_label,
    log_uniform_weights,
    workload_weights,
)
from tuner.table.data import config_params, device_of

__all__ = ["GroupFit", "fit_group", "fit_tables", "baseline_for", "format_fit"]


@dataclasses.dataclass
class GroupFit:
    group: tuple  # (hardware_key, world_size, dtype, mode)
    build: Build
    table: Table
    curves: list[Curve]
    points: int
    baseline: str
    gain_geomean: float | None


def baseline_for(hardware_key: str, algorithms: Sequence[str]) -> str:
    """The plain default the gain is measured against: the device's floor (nccl, gloo)."""
    device = device_of(algorithms[0], hardware_key) if algorithms else device_of_key(hardware_key)
    return floor_name(device)


def _curves(sizes: list[int], by_size: Mapping[int, list[Point]]) -> list[Curve]:
    configs: dict[tuple[str, str], Curve] = {}
    nan = float("nan")
    for i, nbytes in enumerate(sizes):
        for p in by_size[nbytes]:
            key = (p.algorithm, params_key(p.params))
            if key not in configs:
                configs[key] = Curve(
                    p.algorithm,
                    dict(p.params),
                    [nan] * len(sizes),
                    [nan] * len(sizes),
                    [nan] * len(sizes),
                )
            curve = configs[key]
            curve.latency_us[i] = p.latency_us
            curve.p10_us[i] = nan if p.p10_us is None else p.p10_us
            curve.p90_us[i] = nan if p.p90_us is None else p.p90_us
    return [configs[k] for k in sorted(configs)]


def fit_group(
    group: tuple,
    by_size: Mapping[int, list[Point]],
    *,
    workload: Mapping[int, float] | None = None,
    max_rules: int = 8,
    memory_budget: int | None = None,
    source: str = "fit",
) -> GroupFit:
    hardware_key, world_size, dtype, mode = group
    sizes = sorted(by_size)
    curves = _curves(sizes, by_size)
    weights = workload_weights(sizes, workload) if workload else log_uniform_weights(sizes)
    build = build_table(
        sizes, curves, world_size, weights=weights, max_rules=max_rules, memory_budget=memory_budget
    )
    algorithms = sorted({c.algorithm for c in curves})
    baseline = baseline_for(hardware_key, algorithms)
    default = params_key(config_params(baseline, {}))
    base_curve = next(
        (c for c in curves if c.algorithm == baseline and params_key(c.params) == default), None
    )
    if base_curve is None:  # the baseline measured with other knobs only: its best one
        options = [c for c in curves if c.algorithm == baseline]
        base_curve = min(
            options, key=lambda c: sum(x for x in c.latency_us if x == x), default=None
        )
    gain = None
    if base_curve is not None:
        gain = geomean(
            empty=None,
            values=[
                b / t
                for b, t in zip(base_curve.latency_us, build.chosen_latency_us, strict=True)
                if b == b
            ],
        )
    points = sum(p.trials for pts in by_size.values() for p in pts)
    run_ids = sorted({r for pts in by_size.values() for p in pts for r in p.run_ids if r})
    evidence: dict[str, Any] = {
        "run_id": run_ids[0]
        if len(run_ids) == 1
        else ",".join(run_ids[:3]) + (f",+{len(run_ids) - 3}" if len(run_ids) > 3 else ""),
        "points": points,
        "regret_vs_oracle": round(build.regret, 6),
        "gain_vs_nccl_geomean": None if gain is None else round(gain, 4),
        "baseline": baseline,
        "run_ids": run_ids,
        "buffer_bytes": build.buffer_bytes,
        "regret_max": round(build.regret_max, 6),
        "sizes": [sizes[0], sizes[-1]],
        "weights": "workload" if workload else "log-uniform",
        "rules_limit": max_rules,
        "memory_budget": memory_budget,
        "source": source,
    }
    table = Table(
        hardware_key=hardware_key,
        world_size=int(world_size),
        dtype=dtype,
        mode=mode,
        rules=tuple(build.rules),
        max_size=dict(build.max_size),
        evidence=evidence,
    )
    return GroupFit(
        group=group,
        build=build,
        table=table,
        curves=curves,
        points=points,
        baseline=baseline,
        gain_geomean=gain,
    )


def fit_tables(
    data: Mapping[tuple, Mapping[int, list[Point]]],
    *,
    workload: Mapping[int, float] | None = None,
    max_rules: int = 8,
    memory_budget: int | None = None,
    source: str = "fit",
    command: str | None = None,
) -> tuple[Thresholds, list[GroupFit]]:
    fits = [
        fit_group(
            group,
            data[group],
            workload=workload,
            max_rules=max_rules,
            memory_budget=memory_budget,
            source=source,
        )
        for group in sorted(data)
    ]
    from tuner import __version__

    generated_by = {
        "tool": f"tuner {source}",
        "version": __version__,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if command:
        generated_by["command"] = command
    return Thresholds(tables=tuple(f.table for f in fits), generated_by=generated_by), fits


def _rule_text(rules, labels_by_rule) -> list[str]:
    lines, low = [], 0
    for rule, label in zip(rules, labels_by_rule, strict=True):
        high = "inf" if rule.max_bytes is None else format_size(rule.max_bytes)
        lines.append(f"    ({format_size(low) if low else '0'} .. {high}]  {label}")
        low = rule.max_bytes or 0
    return lines


def format_fit(fit: GroupFit) -> str:
    hw, ws, dtype, mode = fit.group
    b = fit.build
    labels = [config_label(r.algorithm, r.params) for r in b.rules]
    gain = "n/a" if fit.gain_geomean is None else f"{fit.gain_geomean:.3f}x"
    lines = [
        f"# {hw}  world_size {ws}  {dtype}  {mode}: {len(b.rules)} rule(s) from "
        f"{fit.points} measured points, {len(fit.curves)} configurations, "
        f"{len(b.sizes)} sizes",
        *_rule_text(b.rules, labels),
        f"  regret vs oracle {b.regret * 100:.2f}% (worst size {b.regret_max * 100:.1f}%),"
        f" gain vs {fit.baseline} (geomean) {gain}, buffer memory "
        f"{format_size(b.buffer_bytes) if b.buffer_bytes else '0'}",
        "  Pareto front: buffer memory, regret beyond the spread (what the builder",
        "  minimises first), regret, rules, table:",
    ]
    for p in b.front:
        mem = format_size(p.buffer_bytes) if p.buffer_bytes else "0"
        lines.append(
            f"    {mem:>8}  {p.clear_regret * 100:7.2f}%  {p.regret * 100:7.2f}%  "
            f"{p.rules}  {' | '.join(p.labels)}"
        )
    return "\n".join(lines)


def print_fits(fits: Sequence[GroupFit], stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    for fit in fits:
        print(format_fit(fit), file=stream)
        print(file=stream)


def pareto_rows(fits: Sequence[GroupFit]) -> list[dict[str, Any]]:
    rows = []
    for fit in fits:
        hw, ws, dtype, mode = fit.group
        for p in fit.build.front:
            rows.append(
                {
                    "hardware_key": hw,
                    "world_size": ws,
                    "dtype": dtype,
                    "mode": mode,
                    "label": f"ws{ws} {dtype} {mode}",
                    "memory_bytes": p.buffer_bytes,
                    "regret": p.regret,
                    "clear_regret": p.clear_regret,
                    "rules": p.rules,
                    "table": " | ".join(p.labels),
                }
            )
    return rows
