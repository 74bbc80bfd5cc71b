"""`tuner fit | live | validate | show | export`.

Bad input exits 2 with one line naming the flag or field, no traceback. Each command imports
its own modules when it runs (`# optional:` names what they load): `tuner --help` loads
neither torch nor optuna, `tuner show` no optuna.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from bench.launch.flags import EXIT_USAGE, UsageError, UsageParser, int_flag, run_command
from bench.launch.paths import writable_file, write_output
from tuner.table.options import add_table_flags, probe_outputs, save_outputs, table_options

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="tuner", description="Decide: thresholds.json from measurements.")
    sub = parser.add_subparsers(dest="command", parser_class=UsageParser)
    fit = sub.add_parser("fit", help="fit tables from sweep runs (rows enter an Optuna study)")
    fit.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories, or folders holding them"
    )
    fit.add_argument("-o", "--output", required=True, help="thresholds.json to write")
    fit.add_argument(
        "--study-db",
        dest="study_db",
        default=None,
        metavar="PATH",
        help="SQLite file for the Optuna studies (default: in memory)",
    )
    fit.add_argument("--quiet", "-q", action="store_true", help="print only the summary line")
    fit.add_argument(
        "--verbose", "-v", action="store_true", help="also print each table's Pareto front"
    )
    fit.add_argument(
        "--validate",
        nargs="+",
        default=None,
        metavar="RUN_DIR",
        help="independent runs to score the fitted tables on (regret geomean, worst size)",
    )
    fit.add_argument(
        "--backends",
        default=None,
        help="comma list: fit on these backends' rows only (default: every one)",
    )
    fit.add_argument(
        "--numerics",
        default="any",
        help="exact: only points that follow the reference arithmetic (the same bits at "
        "every size); any: every correct point (default)",
    )
    add_table_flags(fit)
    check = sub.add_parser(
        "validate", help="score a thresholds.json on independent runs (regret, worst size)"
    )
    check.add_argument("path", help="thresholds.json")
    check.add_argument("runs", nargs="+", metavar="RUN_DIR", help="runs of the tables' hardware")
    show = sub.add_parser("show", help="a readable view of a thresholds.json")
    show.add_argument("path")
    export = sub.add_parser("export", help="other formats of a thresholds.json")
    export.add_argument("path")
    export.add_argument("--format", required=True, help="vllm, sglang-env, nccl-tuner or nccl-env")
    export.add_argument("--dtype", default=None, help="tables of this dtype (default bfloat16)")
    export.add_argument(
        "--mode", default=None, help="tables of this mode (vllm: default graph; others: both)"
    )
    export.add_argument(
        "--world-size",
        dest="world_size",
        default=None,
        help="tables of this world size (default: all)",
    )
    export.add_argument(
        "--capability", default=None, help="key the dictionaries by this CUDA capability (e.g. 9.0)"
    )
    export.add_argument("-o", "--output", default=None, help="write here instead of stdout")
    return parser


def _cmd_fit(args, argv: list[str]) -> int:
    from tuner.search.study import (  # optional: optuna, torch
        Space,
        StudyError,
        enter_rows,
        measurements,
        storage_url,
    )
    from tuner.table.builder import BuildError  # optional: torch
    from tuner.table.data import (  # optional: torch
        RunsError,
        device_of,
        find_run_dirs,
        load_rounds,
        load_rows,
    )
    from tuner.table.fit import fit_tables, print_fits  # optional: optuna, torch
    from tuner.table.numerics import exact_rows, keep_measured, numerics_flag  # optional: torch

    options = table_options(args)
    numerics = numerics_flag(args.numerics)
    try:
        run_dirs = find_run_dirs(args.runs)
        rows = load_rows(run_dirs)
    except RunsError as exc:
        raise UsageError(f"RUN_DIR: {exc}") from None
    if args.backends is not None:  # e.g. leave out an experiment's own variants
        wanted = {b.strip() for b in args.backends.split(",") if b.strip()}
        rows = rows[rows["backend"].isin(wanted)]
    if rows.empty:
        raise UsageError(
            f"RUN_DIR: no measured, correct row in {len(run_dirs)} run(s)"
            + (f" of --backends {args.backends}" if args.backends else "")
        )
    if numerics == "exact":
        rows = exact_rows(rows)
    try:
        rounds = load_rounds(rows)
    except RunsError as exc:
        raise UsageError(f"RUN_DIR: {exc}") from None
    validate_rows = None
    if args.validate is not None:
        groups = {tuple(g) for g in rows[["hardware_key", "world_size", "dtype", "mode"]].values}
        validate_rows = _validation_rows("--validate", args.validate, groups)
        both = sorted(set(validate_rows["run_dir"]) & set(rows["run_dir"]))
        if both:  # a table scored on its own data says nothing about other runs
            raise UsageError(
                f"--validate: {both[0]} is also a run the table is fitted on; "
                "give runs it was not fitted on"
            )
        if args.backends is not None:  # scored among the same backends the fit chose from
            validate_rows = validate_rows[validate_rows["backend"].isin(wanted)]
        if numerics == "exact":  # scored against the oracle of the points it may choose
            keep = validate_rows["numerics"].astype("string").fillna("") == "reference"
            validate_rows = validate_rows[keep]
    import json

    import optuna

    probe_outputs(args.output, args.study_db, args.pareto)
    storage = storage_url(args.study_db)
    if storage is None:
        storage = optuna.storages.InMemoryStorage()
    spaces = {}
    for group, part in rows.groupby(["hardware_key", "world_size", "dtype", "mode"]):
        seen = {
            b: [json.loads(p) for p in grp["params"].unique()] for b, grp in part.groupby("backend")
        }
        hw = group[0]
        # every algorithm of this device class registered here, plus any measured one
        from bench.backends import all_specs  # optional: torch

        device = device_of(next(iter(seen)), hw)
        names = {s.name for s in all_specs() if s.device == device} | set(seen)
        spaces[(group[0], int(group[1]), group[2], group[3])] = Space.for_algorithms(names, seen)
    try:
        added, present = enter_rows(storage, rows, spaces)
        data = measurements(storage)
        data = {g: v for g, v in data.items() if g in spaces}
        if numerics == "exact":  # the study may hold trials of points that do not keep it
            data = keep_measured(data, rows)
        thresholds, fits = fit_tables(
            data,
            command="tuner " + shlex.join(argv),
            rounds=rounds,
            validate_rows=validate_rows,
            numerics=numerics,
            **options,
        )
    except (BuildError, StudyError) as exc:
        raise UsageError(str(exc)) from None
    if not args.quiet:
        print_fits(fits, verbose=args.verbose)
    save_outputs(thresholds, fits, args.output, args.pareto)
    print(
        f"# {len(rows)} measured rows from {len(run_dirs)} run(s): {added} trials added, "
        f"{present} already in the study; {len(fits)} table(s) -> {args.output}"
    )
    return 0


def _validation_rows(flag: str, paths: list[str], groups: set[tuple]):
    """Independent runs' rows; each run must hold a group of the tables (hardware key, world
    size, dtype, mode), else one line saying what it holds and what the tables need."""
    from tuner.table.data import RunsError, find_run_dirs, load_rows  # optional: torch

    try:
        run_dirs = find_run_dirs(paths)
    except RunsError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    frames = []
    for run_dir in run_dirs:
        try:
            rows = load_rows([run_dir])
        except RunsError as exc:
            raise UsageError(f"{flag}: {exc}") from None
        if rows.empty:
            raise UsageError(f"{flag}: {run_dir}: no measured, correct row")
        held = {tuple(g) for g in rows[["hardware_key", "world_size", "dtype", "mode"]].values}
        if not held & groups:
            raise UsageError(
                f"{flag}: {run_dir} holds {_groups_text(held)}; the table(s) need "
                f"{_groups_text(groups)}"
            )
        frames.append(rows)
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def _groups_text(groups: set[tuple]) -> str:
    """`cpu-x world size 2 (bfloat16 eager, float32 eager)`, per hardware key and world size."""
    by_node: dict[tuple, list[str]] = {}
    for hw, ws, dtype, mode in sorted(groups, key=str):
        by_node.setdefault((str(hw), int(ws)), []).append(f"{dtype} {mode}")
    return "; ".join(
        f"{hw} world size {ws} ({', '.join(kinds)})" for (hw, ws), kinds in sorted(by_node.items())
    )


def _cmd_validate(args) -> int:
    """`tuner validate T.json RUN...`: each table of the file scored on the runs of its group."""
    from tuner.runtime.schema import TableError, load  # optional: torch
    from tuner.table.builder import log_uniform_weights  # optional: torch
    from tuner.table.evidence import evidence_summary_text, score_table  # optional: torch

    try:
        thresholds = load(args.path)
    except TableError as exc:
        raise UsageError(str(exc)) from None
    groups = {t.key for t in thresholds.tables}
    rows = _validation_rows("RUN_DIR", args.runs, groups)
    for table in thresholds.tables:
        hw, ws, dtype, mode = table.key
        scored = score_table(table, rows, log_uniform_weights)
        name = f"{hw}  world_size {ws}  {dtype}  {mode}"
        if scored is None:
            print(f"{name}: no run of this table's group")
        elif "regret_geomean" not in scored:
            print(f"{name}: the table's choices were not measured in these runs")
        else:
            print(f"{name}: on {len(scored['run_ids'])} run(s), {evidence_summary_text(scored)}")
    return 0


def _cmd_show(args) -> int:
    from tuner.runtime.schema import TableError, load  # optional: torch
    from tuner.table.show import table_lines  # optional: torch

    try:
        thresholds = load(args.path)
    except TableError as exc:
        raise UsageError(str(exc)) from None
    print("\n".join(table_lines(thresholds)))
    return 0


def _cmd_export(args) -> int:
    from tuner.runtime.schema import TableError, load  # optional: torch
    from tuner.table.formats import FORMATS, ExportError, export  # optional: torch

    if args.format not in FORMATS:
        raise UsageError(f"--format: expected {', '.join(FORMATS)}, got {args.format!r}")
    if args.dtype is not None and args.dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype: expected float32, bfloat16 or float16, got {args.dtype!r}")
    if args.mode is not None and args.mode not in ("eager", "graph"):
        raise UsageError(f"--mode: expected eager or graph, got {args.mode!r}")
    world_size = None if args.world_size is None else int_flag("--world-size", args.world_size)
    if args.output:
        writable_file("-o", args.output)
    try:
        thresholds = load(args.path)
        text = export(
            thresholds, args.format, args.path, args.dtype, args.mode, world_size, args.capability
        )
    except (TableError, ExportError) as exc:
        raise UsageError(str(exc)) from None
    if args.output:
        write_output("-o", args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("tuner", lambda: _dispatch(argv))


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["live"]:
        from tuner.search.live import main as live_main  # optional: torch

        return live_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fit":
            return _cmd_fit(args, argv)
        if args.command == "show":
            return _cmd_show(args)
        if args.command == "validate":
            return _cmd_validate(args)
        if args.command == "export":
            return _cmd_export(args)
    except BrokenPipeError:  # `tuner show T.json | head`
        sys.stderr.close()
        return 0
    build_parser().print_help()
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
