"""What every command line here shares: a usage error is one line naming the flag and exits 2,
before anything starts; an argparse that raises it instead of printing usage; the integer
flags checked in one place; and a command's run turned into its exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from bench.extras import missing_dependency

__all__ = [
    "UsageError",
    "OutputError",
    "UsageParser",
    "int_flag",
    "seconds_flag",
    "run_command",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """Bad command-line input: one line, names the flag; the CLI exits 2."""


class OutputError(RuntimeError):
    """An output the command could not write after its work (a full disk, a folder removed
    meanwhile): one line naming the flag, the path and the OS error; the CLI exits 1."""


class UsageParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def int_flag(flag: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    """`value` as an integer in minimum..maximum (no upper end when maximum is None)."""
    accepted = f">= {minimum}" if maximum is None else f"{minimum}..{maximum}"
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise UsageError(f"{flag}: expected an integer {accepted}, got {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        raise UsageError(f"{flag}: expected an integer {accepted}, got {value!r}")
    return number


def seconds_flag(flag: str, value: object) -> float:
    """`value` as a number of seconds > 0."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:  # NaN included
        raise UsageError(f"{flag}: expected seconds > 0, got {value!r}")
    return seconds


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run `command` and return its exit code; bad input is one line on stderr and exit 2,
    an output that could not be written one line and 1, Ctrl-C one line and 130."""
    try:
        return command()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # an optional dependency: name the extra
        hint = missing_dependency(exc)
        if hint is None:
            raise
        print(f"{prog}: error: {hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
