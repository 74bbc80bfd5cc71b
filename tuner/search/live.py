"""`tuner live`: search the configuration space with real measurements, then write the tables.

The ranks are launched once, through torchrun's launcher API (`bench.launch.launcher.launch`, or run under
the user's own torchrun / srun). Rank 0 runs the Optuna studies (ask/tell, SQLite storage
beside the output, default ``<output>.study.db``) and broadcasts each trial over the gloo group:
(algorithm, knobs, dtype, mode, bytes, seed). Every rank builds that backend with those knobs
(cached per configuration, a few alive at once) and measures it like the sweep does, in rounds
that the pruner may cut short. At the end rank 0 fits the tables from the studies (the same
builder as `tuner fit`), writes thresholds.json and ``<output>.live.json``: per size, how many
configurations were measured against how many exist (the grid), and the best found.

Flags: every `bench sweep` flag (sizes, dtypes, modes, backends, iterations, device,
`--param BACKEND.KNOB=VALUE` fixes a knob), plus -o and the search's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from bench.backends import get_spec
from bench.dtypes import DTYPES
from bench.environment import launched_rank
from bench.launch.config import SweepConfig, add_sweep_arguments, config_from_args
from bench.launch.flags import OutputError, UsageError, UsageParser, int_flag
from bench.launch.launcher import launch
from bench.launch.paths import write_output
from bench.run.context import broadcast_object, make_context
from bench.run.hardware import fingerprint
from bench.run.session import rank_session
from bench.sizes import format_size
from tuner.search.measure import BackendCache, Outcome, TrialRunner
from tuner.table.builder import config_label
from tuner.table.options import add_table_flags, probe_outputs, save_outputs, table_options

__all__ = ["LiveOptions", "parse_live", "live_worker", "main"]


@dataclasses.dataclass
class LiveOptions:
    output: str
    study_db: str
    # the search settings given on the command line, by SearchOptions's field names
    # (tuner.search.options states every default once; the flags below say none of them)
    search: dict[str, Any] = dataclasses.field(default_factory=dict)
    cache_backends: int = 6
    grid: bool = False
    max_rules: int = 8
    memory_budget: int | None = None
    workload: dict | None = None
    pareto: str | None = None
    run_id: str = ""
    command: str = ""


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(
        prog="tuner live",
        description="Search algorithms x knobs with real "
        "measurements (Optuna), then write thresholds.json.",
    )
    add_sweep_arguments(p)
    p.add_argument("-o", "--output", required=True, help="thresholds.json to write")
    p.add_argument(
        "--study-db",
        dest="study_db",
        default=None,
        metavar="PATH",
        help="SQLite file of the studies (default: <output>.study.db; resumable)",
    )
    p.add_argument(
        "--patience",
        default=None,
        help="explored trials in a row without a better best before a size stops",
    )
    p.add_argument(
        "--max-trials",
        dest="max_trials",
        default=None,
        help="at most this many measurements per size (confirmation included)",
    )
    p.add_argument(
        "--budget-fraction",
        dest="budget_fraction",
        default=None,
        help="at most this fraction of a size's grid is measured, confirmation "
        "included (0.25 = 25%%; 'none': no limit)",
    )
    p.add_argument(
        "--confirm-top",
        dest="confirm_top",
        default=None,
        help="the fastest N distinct configurations of a size are re-measured side "
        "by side before its best is chosen (1: no confirmation)",
    )
    p.add_argument(
        "--confirm-rounds",
        dest="confirm_rounds",
        default=None,
        help="interleaved rounds of that re-measurement; the best median wins",
    )
    # --rounds is the sweep's flag: the timed iterations come in that many rounds, and the
    # pruner may stop a configuration after any but the last
    p.add_argument(
        "--prune-margin",
        dest="prune_margin",
        default=None,
        help="prune a configuration this much slower than the best (0.5 = 50%%)",
    )
    p.add_argument("--seed", default=None, help="sampler seed")
    p.add_argument(
        "--grid",
        action="store_true",
        help="no search: measure every configuration at every size (the reference "
        "a search is judged against)",
    )
    p.add_argument(
        "--cache-backends",
        dest="cache_backends",
        default=None,
        help="built backends kept alive at once",
    )

    add_table_flags(p)
    return p


def _int(flag: str, text: str | None, minimum: int = 1) -> int | None:
    """An optional integer flag (None when not given)."""
    return None if text is None else int_flag(flag, text, minimum)


def _search_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The SearchOptions fields the command line gives, checked (the others keep its
    defaults)."""
    search: dict[str, Any] = {}
    for flag, field, minimum in (
        ("--patience", "patience", 1),
        ("--max-trials", "max_trials", 1),
        ("--confirm-top", "confirm_top", 1),
        ("--confirm-rounds", "confirm_rounds", 1),
        ("--seed", "seed", 0),
    ):
        if getattr(args, field) is not None:
            search[field] = _int(flag, getattr(args, field), minimum)
    if args.prune_margin is not None:
        try:
            margin = float(args.prune_margin)
        except ValueError:
            margin = -1.0
        if not margin >= 0:
            raise UsageError(f"--prune-margin: expected a number >= 0, got {args.prune_margin!r}")
        search["prune_margin"] = margin
    if args.budget_fraction is not None:
        fraction: float | None = None
        if str(args.budget_fraction).lower() != "none":
            try:
                fraction = float(args.budget_fraction)
            except ValueError:
                fraction = -1.0
            if not 0 < fraction <= 1:
                raise UsageError(
                    "--budget-fraction: expected a number in (0, 1] or 'none', got "
                    f"{args.budget_fraction!r}"
                )
        search["budget_fraction"] = fraction
    return search


def parse_live(argv: list[str]) -> tuple[SweepConfig, LiveOptions]:
    args = build_parser().parse_args(argv)
    if args.resume is not None:
        raise UsageError("--resume: not used by tuner live (the study in --study-db resumes)")
    if args.out is not None:
        raise UsageError("--out: not used by tuner live (use -o for thresholds.json)")
    cfg = config_from_args(args)
    search = _search_settings(args)
    output = Path(args.output)

    table = table_options(args)
    study_db = args.study_db or str(output.with_name(output.stem + ".study.db"))
    probe_outputs(str(output), study_db, args.pareto)
    opts = LiveOptions(
        output=str(output),
        study_db=study_db,
        search=search,
        **(
            {"cache_backends": _int("--cache-backends", args.cache_backends)}
            if args.cache_backends is not None
            else {}
        ),
        grid=bool(args.grid),
        max_rules=table["max_rules"],
        memory_budget=table["memory_budget"],
        workload=table["workload"],
        pareto=args.pareto,
        run_id=datetime.datetime.now().strftime("live-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6],
        command="tuner live " + " ".join(argv),
    )
    return cfg, opts


def live_worker(cfg: SweepConfig, opts: LiveOptions) -> int:
    """One rank (under the launcher, torchrun or srun)."""
    with rank_session(cfg.timeout_s) as (layout, watchdog):
        try:
            return _live(cfg, opts, watchdog, layout["local_rank"])
        except OutputError as exc:  # rank 0, after the search: one line, not a traceback
            print(f"tuner: error: {exc}", file=sys.stderr, flush=True)
            return 1


def _live(cfg: SweepConfig, opts: LiveOptions, watchdog, local_rank: int) -> int:
    import torch

    device = torch.device("cpu")
    if cfg.device == "cuda":  # one GPU per local rank, as the sweep's worker does
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    ctx = make_context(device=device, timeout_s=cfg.timeout_s)
    hardware_key = broadcast_object(
        fingerprint(cfg.device)["hardware_key"] if ctx.rank == 0 else None, ctx.cpu_group
    )
    cache = BackendCache(ctx, max(cfg.sizes), opts.cache_backends)
    runner = TrialRunner(
        ctx, iters=cfg.iters, warmup=cfg.warmup, rounds=cfg.rounds, graph_calls=cfg.graph_calls
    )

    def execute(job: dict[str, Any], on_round=None) -> Outcome:
        watchdog.beat(f"{job['algorithm']} {job['dtype']} {job['mode']} {job['bytes']}B")
        backend, reason = cache.get(job["algorithm"], job["params"])
        if backend is None:
            return Outcome("skip", reason=reason)
        return runner.run(
            backend,
            DTYPES[job["dtype"]],
            job["mode"],
            job["bytes"],
            seed=job["seed"],
            prunable=True,
            on_round=on_round,
        )

    # what can run here: every backend built once with its default knobs (collective)
    available, unavailable = [], {}
    for name in cfg.backends:
        try:
            params = {**get_spec(name).default_params(), **cfg.params.get(name, {})}
        except KeyError as exc:
            unavailable[name] = str(exc.args[0])
            continue
        backend, reason = cache.get(name, params)
        if backend is None:
            unavailable[name] = reason
        else:
            available.append(name)
    try:
        if ctx.rank != 0:
            while True:
                job = broadcast_object(None, ctx.cpu_group)
                if job is None:
                    return 0
                execute(job)
        try:
            return _drive(cfg, opts, ctx, hardware_key, available, unavailable, execute)
        finally:
            broadcast_object(None, ctx.cpu_group)  # the other ranks' loop ends
    finally:
        cache.release()


def _drive(cfg, opts, ctx, hardware_key, available, unavailable, execute) -> int:
    import optuna

    from tuner.search.options import SearchOptions  # optional: optuna
    from tuner.search.search import search_group  # optional: optuna
    from tuner.search.study import Space, measurements, storage_url  # optional: optuna

    for name, reason in unavailable.items():
        print(f"# {name}: not searched ({reason})", flush=True)
    if not available:
        print("tuner live: no backend can run here", file=sys.stderr)
        return 1
    space = Space.for_algorithms(available).restrict(cfg.params)
    storage = optuna.storages.RDBStorage(storage_url(opts.study_db))
    options = SearchOptions(**opts.search, run_id=opts.run_id, exhaustive=opts.grid)
    counter = [0]
    summary: dict[str, Any] = {
        "run_id": opts.run_id,
        "hardware_key": hardware_key,
        "world_size": ctx.world_size,
        "algorithms": available,
        "study_db": opts.study_db,
        "groups": [],
    }
    groups = []
    for dtype in cfg.dtypes:
        for mode in cfg.modes:
            group = (hardware_key, ctx.world_size, dtype, mode)
            groups.append(group)

            def measure(algorithm, params, nbytes, report, _dtype=dtype, _mode=mode):
                counter[0] += 1
                job = {
                    "algorithm": algorithm,
                    "params": params,
                    "dtype": _dtype,
                    "mode": _mode,
                    "bytes": nbytes,
                    "seed": counter[0],
                }
                broadcast_object(job, ctx.cpu_group)
                return execute(job, on_round=report)

            def show(point, _dtype=dtype, _mode=mode):

                best = (
                    "none"
                    if point.best is None
                    else (f"{config_label(*point.best)} {point.best_latency_us:.1f} us")
                )
                print(
                    f"# ws{ctx.world_size} {_dtype} {_mode} {format_size(point.nbytes):>5}: "
                    f"{point.measured:3d} measured ({point.pruned} pruned, "
                    f"{point.confirmed} confirming) of "
                    f"{point.grid} configurations; best {best}",
                    flush=True,
                )

            results = search_group(
                storage, group, cfg.sizes, space, available, measure, options, on_point=show
            )
            summary["groups"].append(
                {
                    "dtype": dtype,
                    "mode": mode,
                    "points": [dataclasses.asdict(r) for r in results],
                    "measured": sum(r.measured for r in results),
                    "grid": sum(r.grid for r in results),
                }
            )
    data = {g: v for g, v in measurements(storage).items() if g in groups}
    _write_outputs(opts, data, summary)
    return 0


def _write_outputs(opts: LiveOptions, data: dict, summary: dict[str, Any]) -> None:
    """The tables fitted from the study's measurements, the Pareto front, the summary."""
    from tuner.table.fit import fit_tables, print_fits  # optional: optuna

    summary["measured"] = sum(g["measured"] for g in summary["groups"])
    summary["grid"] = sum(g["grid"] for g in summary["groups"])
    summary["fraction"] = summary["measured"] / summary["grid"] if summary["grid"] else None
    thresholds, fits = fit_tables(
        data,
        workload=opts.workload,
        max_rules=opts.max_rules,
        memory_budget=opts.memory_budget,
        source="live",
        command=opts.command,
    )
    print_fits(fits)

    save_outputs(thresholds, fits, opts.output, opts.pareto)
    path = Path(opts.output)
    live_json = path.with_name(path.stem + ".live.json")
    write_output("-o", live_json, json.dumps(summary, indent=2, default=str) + "\n")
    print(
        f"# {summary['measured']} configurations measured of {summary['grid']} in the grid "
        f"({100 * (summary['fraction'] or 0):.0f}%); tables -> {opts.output}; study -> "
        f"{opts.study_db}; summary -> {live_json}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, opts = parse_live(argv)
    if launched_rank():
        return live_worker(cfg, opts)  # already one rank of the user's torchrun

    return launch(cfg, live_worker, (cfg, opts))


def confirm_worker(cfg: SweepConfig, jobs: list[dict], path: str, repeats: int = 7) -> int:
    """One rank of a side-by-side re-measurement: for each job {"bytes", "configs":
    {label: [algorithm, params]}}, every configuration `repeats` times, interleaved (A B A B
    ...), so that drift hits all alike. Rank 0 writes {label: [latency_us, ...]} per job to
    `path` (JSON). Used to judge a search against a grid without the grid's winner's curse."""
    with rank_session(cfg.timeout_s) as (_layout, watchdog):
        ctx = make_context(device="cpu", timeout_s=cfg.timeout_s)
        cache = BackendCache(ctx, max(cfg.sizes), capacity=8)
        runner = TrialRunner(ctx, iters=cfg.iters, warmup=cfg.warmup, rounds=1)
        dtype = DTYPES[cfg.dtypes[0]]
        out = []
        for job in jobs:
            times: dict[str, list[float]] = {label: [] for label in job["configs"]}
            for rep in range(repeats):
                for label, (algorithm, params) in job["configs"].items():
                    watchdog.beat(f"confirm {algorithm} {job['bytes']}B")
                    backend, reason = cache.get(algorithm, params)
                    if backend is None:
                        continue
                    outcome = runner.run(backend, dtype, "eager", job["bytes"], seed=rep + 1)
                    if outcome.status == "ok":
                        times[label].append(outcome.latency_us)
            out.append({"bytes": job["bytes"], "configs": job["configs"], "latency_us": times})
        cache.release()
        if ctx.rank == 0:
            Path(path).write_text(json.dumps(out, indent=1) + "\n")
        return 0
