"""`bench sweep | report | compare | doctor | kernels | soak`: the subcommand table and its
dispatch.

Each subcommand lives in its room, imported only when it runs: a module with `main(argv) ->
exit code`, or with `add_arguments(parser)` and `run(args) -> exit code`. Bad input exits 2
with one line naming the flag, before anything starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bench.launch.flags import EXIT_USAGE, UsageParser, run_command

__all__ = ["main", "COMMANDS"]

# name: (what it does, the module that runs it)
COMMANDS: dict[str, tuple[str, str]] = {
    "sweep": ("measure backends x sizes x dtypes x modes", "bench.launch.sweep"),
    "report": (
        "nccl-tests-style table of a run, or (--index) the index of a results folder",
        "bench.analysis.report",
    ),
    "compare": (
        "backends side by side over repeated sweeps, with ratios to a baseline",
        "bench.analysis.compare",
    ),
    "doctor": ("what this node offers, and why a backend cannot run", "bench.doctor.command"),
    "kernels": ("own reduction kernels vs copy bandwidth (one GPU)", "bench.kernels.benchmark"),
    "soak": (
        "soak the shm all-reduce: many verified calls, memory before and after",
        "bench.run.soak",
    ),
}


def _parser() -> argparse.ArgumentParser:
    """The table as argparse subcommands: `bench --help`, and a one-line error for a bad name."""
    parser = UsageParser(prog="bench", description="Measure every all-reduce this node offers.")
    sub = parser.add_subparsers(dest="command", parser_class=UsageParser)
    for name, (text, _) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _run_room(name: str, argv: list[str]) -> int:
    module = importlib.import_module(COMMANDS[name][1])
    if hasattr(module, "main"):
        return module.main(argv)
    parser = UsageParser(prog=f"bench {name}", description=COMMANDS[name][0])
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in COMMANDS:
        return _run_room(argv[0], argv[1:])
    parser = _parser()
    parser.parse_args(argv)  # --help prints the table; a bad name or flag raises UsageError
    parser.print_help()
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("bench", lambda: _dispatch(argv))


if __name__ == "__main__":
    sys.exit(main())
