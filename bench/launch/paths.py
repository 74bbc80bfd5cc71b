"""Output paths checked by doing, before anything starts: the folder a command will write into
is created (with its missing parents) and a probe file is written in it and removed again.

A check that predicts instead (`os.access`) says yes as root on a read-only file system, and
says nothing of a full disk; this one cannot be wrong that way. A refusal is the CLI's
`UsageError`: one line naming the flag, the path and the OS error, e.g.
`--out: cannot create /proc/x/run: [Errno 2] No such file or directory` (exit 2). The folders
the check made are removed again (unless `keep`), so that a command refused by a later check
leaves nothing behind; its writer makes them again when it writes.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.launch.flags import OutputError, UsageError

__all__ = ["writable_dir", "writable_file", "os_error", "output_error", "write_output"]

PROBE_PREFIX = ".bench-probe-"


def os_error(exc: OSError) -> str:
    """`[Errno 30] Read-only file system`: the OS error as a user reads it, no path repeated."""
    if exc.errno and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc) or type(exc).__name__


def output_error(flag: str, path: str | os.PathLike, exc: OSError) -> OutputError:
    """The one-line error of an output that could not be written after the work."""
    return OutputError(f"{flag}: cannot write {path}: {os_error(exc)}")


def write_output(flag: str, path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` (its folder made if missing); OutputError naming `flag`."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as exc:
        raise output_error(flag, path, exc) from None


def writable_dir(flag: str, path: str | os.PathLike, keep: bool = False) -> Path:
    """`path` as a folder this process can write into: created if missing, probed with a
    file written and removed. UsageError naming `flag` otherwise."""
    path = Path(path)
    _make_folder(flag, path, path, keep)
    return path


def writable_file(flag: str, path: str | os.PathLike, keep: bool = False) -> Path:
    """`path` as a file this process can write (create or replace): not a folder, its folder
    created if missing and probed, an existing file opened for writing (nothing changed)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a directory; expected a file name")
    _make_folder(flag, path.parent, path, keep)
    if path.exists():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as exc:
            raise UsageError(f"{flag}: cannot write {path}: {os_error(exc)}") from None
    return path


def _make_folder(flag: str, folder: Path, named: Path, keep: bool) -> None:
    """Create `folder` and its missing parents, then probe it; remove what was created on a
    refusal, and after the probe unless `keep`. Messages name `named` (the path given)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag}: {folder} exists and is not a directory")
    missing = []
    for parent in (folder, *folder.parents):
        if parent.is_dir():
            break
        missing.append(parent)
    created: list[Path] = []
    try:
        for step in reversed(missing):
            try:
                step.mkdir()
            except FileExistsError:
                if not step.is_dir():
                    raise NotADirectoryError(20, os.strerror(20)) from None
                continue  # made by someone else meanwhile
            created.append(step)
    except OSError as exc:
        _remove(created)
        raise UsageError(f"{flag}: cannot create {named}: {os_error(exc)}") from None
    try:
        _probe(folder)
    except OSError as exc:
        _remove(created)
        raise UsageError(f"{flag}: cannot write in {folder}: {os_error(exc)}") from None
    if not keep:
        _remove(created)


def _probe(folder: Path) -> None:
    """Create a file of one byte in `folder` and remove it (OSError when it cannot be done)."""
    probe = folder / f"{PROBE_PREFIX}{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"\n")  # a byte needs a block: a full disk says so here
    finally:
        os.close(fd)
        try:
            probe.unlink()
        except FileNotFoundError:
            pass


def _remove(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass
