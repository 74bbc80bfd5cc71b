"""`bench sweep | report | doctor | kernels | soak`: the subcommand table and its dispatch.

Each subcommand is a `main(argv) -> exit code` in its room, imported only when it runs. Bad
input exits 2 with one line naming the flag, before anything starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from bench.launch.flags import EXIT_USAGE, UsageError, UsageParser, run_command

__all__ = ["main", "COMMANDS"]

# name: (what it does, the module whose `main(argv)` runs it); `report` runs `_report` below,
# as its room, bench/analysis, has no command module yet
COMMANDS: dict[str, tuple[str, str | None]] = {
    "sweep": ("measure backends x sizes x dtypes x modes", "bench.launch.sweep"),
    "report": ("nccl-tests-style table of a run", None),
    "doctor": ("what this node offers, and why a backend cannot run", "bench.doctor.command"),
    "kernels": ("own reduction kernels vs copy bandwidth (one GPU)", "bench.kernels.benchmark"),
    "soak": ("soak the shm all-reduce: many verified calls, memory before and after",
             "bench.run.soak"),
}


def _report(argv: list[str]) -> int:
    from bench.analysis.report import print_summary
    from bench.analysis.results import SchemaError

    parser = UsageParser(prog="bench report", description=COMMANDS["report"][0])
    parser.add_argument("run_dir")
    parser.add_argument("--plots", action="store_true", help="also write PNG figures beside it")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    if not run.is_dir():
        raise UsageError(f"report: {run} is not a directory")
    try:
        wrong = print_summary(run)
        if args.plots:
            from bench.analysis.plots import write_run_plots

            for path in write_run_plots(run):
                print(f"# figure: {path}")
    except (FileNotFoundError, SchemaError) as exc:
        raise UsageError(f"report: {exc}") from None
    return 1 if wrong else 0


def _parser() -> argparse.ArgumentParser:
    """The table as argparse subcommands: `bench --help`, and a one-line error for a bad name."""
    parser = UsageParser(prog="bench", description="Measure every all-reduce this node offers.")
    sub = parser.add_subparsers(dest="command", parser_class=UsageParser)
    for name, (text, _) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in COMMANDS:
        module = COMMANDS[argv[0]][1]
        run = importlib.import_module(module).main if module else _report
        return run(argv[1:])
    parser = _parser()
    parser.parse_args(argv)  # --help prints the table; a bad name or flag raises UsageError
    parser.print_help()
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("bench", lambda: _dispatch(argv))


if __name__ == "__main__":
    sys.exit(main())
