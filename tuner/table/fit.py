"""From measured configurations to thresholds.json: one table per group, with its evidence.

`fit_tables` reads a study storage (every completed trial, whether entered from sweep rows or
measured live), builds each group's table with the exact DP builder and reports regret vs the
per-size oracle and gain vs the default backend (nccl on GPU, gloo on CPU). Where the runs
kept their rounds (`rounds`: a frame from `tuner.table.data.load_rounds`), the builder decides
on the paired rounds (`tuner.table.paired`), and the evidence holds what the pairs support:
each rule's advantage with its interval, the spans left undecided, the A/A figure, and the
regret on rounds held out of the fit (`tuner.table.evidence`); without rounds it is today's
fit, its evidence in-sample, and says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from bench.analysis.rounds import aa_spread
from bench.analysis.stats import geomean
from bench.backends import floor_name, params_key
from bench.run.hardware import device_of_key
from bench.sizes import format_size
from tuner import __version__
from tuner.runtime.schema import Table, Thresholds
from tuner.search.study import Point
from tuner.table import paired as pairs
from tuner.table.builder import (
    Build,
    Curve,
    build_table,
    config_label,
    log_uniform_weights,
    workload_weights,
)
from tuner.table.data import config_params, device_of
from tuner.table.evidence import evidence_summary_text, heldout_regret, score_table
from tuner.table.paired import Tie

__all__ = [
    "GroupFit",
    "fit_group",
    "fit_tables",
    "baseline_for",
    "format_fit",
    "evidence_lines",
]


@dataclasses.dataclass
class GroupFit:
    group: tuple  # (hardware_key, world_size, dtype, mode)
    build: Build
    table: Table
    curves: list[Curve]
    points: int
    baseline: str
    gain_geomean: float | None
    ties: list[Tie] = dataclasses.field(default_factory=list)
    # sizes where the gap between the best two is below the A/A figure (bytes)
    below_aa: list[int] = dataclasses.field(default_factory=list)


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
    rounds=None,
    validate_rows=None,
    min_gain: float | None = None,
    numerics: str = "any",
) -> GroupFit:
    """One group's table; `rounds`: its runs' round figures (paired decisions, held-out
    evidence); `validate_rows`: independent runs' rows to score it on."""
    min_gain = pairs.MIN_GAIN if min_gain is None else min_gain
    hardware_key, world_size, dtype, mode = group
    sizes = sorted(by_size)
    curves = _curves(sizes, by_size)

    def weigh(some: Sequence[int]) -> list[float]:
        return workload_weights(some, workload) if workload else log_uniform_weights(some)

    weights = weigh(sizes)
    algorithms = sorted({c.algorithm for c in curves})
    baseline = baseline_for(hardware_key, algorithms)
    figures = None
    if rounds is not None and len(rounds):
        figures = pairs.curve_figures(curves, sizes, rounds)
    preference = pairs.preference(curves, baseline) if figures else None
    table_limits = {"max_rules": max_rules, "memory_budget": memory_budget}
    build = build_table(
        sizes,
        curves,
        world_size,
        weights=weights,
        paired=pairs.paired_bound(figures, min_gain) if figures else None,
        preference=preference,
        **table_limits,
    )
    gain = _gain(curves, build, baseline)
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
        "rounds": pairs.pair_count(figures) if figures else 0,
        "min_gain": min_gain if figures else None,
        "per_rule": pairs.rule_evidence(build, curves, figures, weights),
    }
    ties: list[Tie] = []
    below_aa: list[int] = []
    if figures:
        ties = pairs.ties(build, curves, figures, min_gain)
        aa = aa_spread(rounds)
        evidence["aa"] = aa
        evidence["ties"] = [t.to_json() for t in ties]
        evidence["heldout"] = heldout_regret(
            curves,
            sizes,
            figures,
            weigh,
            world_size=int(world_size),
            preference=preference,
            min_gain=min_gain,
            **table_limits,
        )
        if aa["median_pct"] is not None:  # a gap smaller than one backend's own spread
            below_aa = [
                nbytes
                for nbytes, _k, _r, stat in pairs.size_gaps(build, curves, figures)
                if stat is not None and abs(math.log(stat.ratio)) * 100 < aa["median_pct"]
            ]
    if validate_rows is not None:
        draft = Table(hardware_key, int(world_size), dtype, mode, tuple(build.rules), {}, {})
        scored = score_table(draft, validate_rows, weigh)
        if scored is not None:
            evidence["validation"] = scored
    table = Table(
        hardware_key=hardware_key,
        world_size=int(world_size),
        dtype=dtype,
        mode=mode,
        rules=tuple(build.rules),
        max_size=dict(build.max_size),
        evidence=evidence,
        numerics=numerics,
    )
    return GroupFit(
        group=group,
        build=build,
        table=table,
        curves=curves,
        points=points,
        baseline=baseline,
        gain_geomean=gain,
        ties=ties,
        below_aa=below_aa,
    )


def _gain(curves: list[Curve], build: Build, baseline: str) -> float | None:
    """Geomean of the baseline's latency over the table's, where the baseline was measured."""
    default = params_key(config_params(baseline, {}))
    base_curve = next(
        (c for c in curves if c.algorithm == baseline and params_key(c.params) == default), None
    )
    if base_curve is None:  # the baseline measured with other knobs only: its best one
        options = [c for c in curves if c.algorithm == baseline]
        base_curve = min(
            options, key=lambda c: sum(x for x in c.latency_us if x == x), default=None
        )
    if base_curve is None:
        return None
    return geomean(
        empty=None,
        values=[
            b / t
            for b, t in zip(base_curve.latency_us, build.chosen_latency_us, strict=True)
            if b == b
        ],
    )


def fit_tables(
    data: Mapping[tuple, Mapping[int, list[Point]]],
    *,
    workload: Mapping[int, float] | None = None,
    max_rules: int = 8,
    memory_budget: int | None = None,
    source: str = "fit",
    command: str | None = None,
    rounds=None,
    validate_rows=None,
    min_gain: float | None = None,
    numerics: str = "any",
) -> tuple[Thresholds, list[GroupFit]]:
    """Every group's table (`fit_group`); `rounds` and `validate_rows` hold every group's."""
    fits = [
        fit_group(
            group,
            data[group],
            workload=workload,
            max_rules=max_rules,
            memory_budget=memory_budget,
            source=source,
            rounds=_of_group(rounds, group),
            validate_rows=validate_rows,
            min_gain=min_gain,
            numerics=numerics,
        )
        for group in sorted(data)
    ]

    generated_by = {
        "tool": f"tuner {source}",
        "version": __version__,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if command:
        generated_by["command"] = command
    return Thresholds(tables=tuple(f.table for f in fits), generated_by=generated_by), fits


def _of_group(frame, group: tuple):
    if frame is None or not len(frame):
        return None
    hw, ws, dtype, mode = group
    return frame[
        (frame["hardware_key"] == hw)
        & (frame["world_size"] == int(ws))
        & (frame["dtype"] == dtype)
        & (frame["mode"] == mode)
    ]


def _rule_text(rules, labels_by_rule) -> list[str]:
    lines, low = [], 0
    for rule, label in zip(rules, labels_by_rule, strict=True):
        high = "inf" if rule.max_bytes is None else format_size(rule.max_bytes)
        lines.append(f"    ({format_size(low) if low else '0'} .. {high}]  {label}")
        low = rule.max_bytes or 0
    return lines


def evidence_lines(fit: GroupFit) -> list[str]:
    """What the data supports: held-out and validated regret, the A/A figure, the ties."""
    ev = fit.table.evidence
    lines = []
    if not ev.get("rounds"):
        lines.append("  evidence in-sample only: these runs kept no rounds (made before rounds)")
    elif ev.get("heldout"):
        lines.append(
            "  held out (fit on even rounds, scored on odd, and the reverse): "
            + evidence_summary_text(ev["heldout"])
        )
    else:
        lines.append(f"  {ev['rounds']} round(s): too few to hold any out, evidence in-sample")
    validation = ev.get("validation")
    if validation and "regret_geomean" in validation:
        lines.append(
            f"  validated on {len(validation['run_ids'])} run(s): "
            + evidence_summary_text(validation)
        )
    aa = ev.get("aa")
    if aa and aa.get("median_pct") is not None:
        lines.append(
            f"  A/A noise (one backend, round to round): {aa['median_pct']:.1f}% median, "
            f"{aa['p90_pct']:.1f}% p90 over {aa['points']} points, {aa['rounds']} rounds"
        )
        if fit.below_aa:
            first, last = format_size(fit.below_aa[0]), format_size(fit.below_aa[-1])
            lines.append(
                f"  ! the A/A noise is larger than the gap between the best two at "
                f"{len(fit.below_aa)} of {len(fit.build.sizes)} sizes ({first}..{last}): "
                "single rounds cannot decide there, only the paired rounds can"
            )
    for tie in fit.ties[:6]:
        span = format_size(tie.first_bytes)
        if tie.last_bytes != tie.first_bytes:
            span += f"-{format_size(tie.last_bytes)}"
        lines.append(
            f"  {span}: {tie.kept} and {tie.other} within noise or the least gain, kept {tie.kept}"
        )
    if len(fit.ties) > 6:
        lines.append(f"  ... and {len(fit.ties) - 6} more span(s) within noise (evidence.ties)")
    return lines


def format_fit(fit: GroupFit, verbose: bool = False) -> str:
    hw, ws, dtype, mode = fit.group
    b = fit.build
    labels = [config_label(r.algorithm, r.params) for r in b.rules]
    gain = "n/a" if fit.gain_geomean is None else f"{fit.gain_geomean:.3f}x"
    lines = [
        f"# {hw}  world_size {ws}  {dtype}  {mode}: {len(b.rules)} rule(s) from "
        f"{fit.points} measured points, {len(fit.curves)} configurations, "
        f"{len(b.sizes)} sizes",
        *_rule_text(b.rules, labels),
        f"  in-sample regret vs oracle {b.regret * 100:.2f}% (worst size "
        f"{b.regret_max * 100:.1f}%), gain vs {fit.baseline} (geomean) {gain}, buffer memory "
        f"{format_size(b.buffer_bytes) if b.buffer_bytes else '0'}",
        *evidence_lines(fit),
    ]
    if not verbose:
        mems = [p.buffer_bytes for p in b.front]
        lines.append(
            f"  Pareto front: {len(b.front)} table(s), buffer memory "
            f"{format_size(min(mems)) if min(mems, default=0) else '0'}.."
            f"{format_size(max(mems)) if max(mems, default=0) else '0'} (-v lists them)"
        )
        return "\n".join(lines)
    lines += [
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


def print_fits(
    fits: Sequence[GroupFit], stream: TextIO | None = None, verbose: bool = False
) -> None:
    stream = stream or sys.stdout
    for fit in fits:
        print(format_fit(fit, verbose), file=stream)
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
