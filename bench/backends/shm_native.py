"""The C short path of `shm_one_shot` (shm_native.c): built once with the system's C compiler,
loaded with ctypes, optional.

Why C: at 1 KiB the one-shot all-reduce is a 1 KiB memcpy, a flag store, a few flag loads
and a 256-element sum; in Python the interpreter and torch's op dispatch around them cost
~2.5 us per call at 2 ranks, where MPI_Allreduce through mpi4py took 1.4 us and DeepSpeed's
C++ op 2.2 us on the same machine. One ctypes call (the arguments sit in a `Call` struct
filled once; a call sets three fields) does it all for ~1 us. Without a compiler, or when
any rank could not build it, the Python path runs instead (`load` says why).

The library is cached by the hash of its source and compiler under
$ALLREDUCE_AUTOTUNE_CACHE, else $XDG_CACHE_HOME/allreduce-autotune, else
~/.cache/allreduce-autotune; ranks building at once each write a temporary file and rename it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.dtypes import DTYPE_NAMES
from bench.environment import get

__all__ = ["Call", "load", "dtype_codes", "ExactSum", "DTYPE_CODES", "OK", "TIMEOUT"]

SOURCE = Path(__file__).with_name("shm_native.c")
OK, TIMEOUT, DTYPE = 0, 1, 2
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


class Call(ctypes.Structure):
    """`aat_call` of shm_native.c, field for field."""

    _fields_ = [
        ("tensor", ctypes.c_void_p),
        ("nbytes", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("world_size", ctypes.c_int32),
        ("slots", ctypes.c_void_p),
        ("slot_bytes", ctypes.c_int64),
        ("flags", ctypes.c_void_p),
        ("rank", ctypes.c_int32),
        ("stride", ctypes.c_int32),
        ("spin", ctypes.c_int32),
        ("unused", ctypes.c_int32),
        ("yield_ns", ctypes.c_int64),
        ("timeout_ns", ctypes.c_int64),
        ("nap_ns", ctypes.c_int64),
        ("epoch", ctypes.c_int64),
        ("late_rank", ctypes.c_int64),
        ("late_seen", ctypes.c_int64),
    ]


def _cache_dir() -> Path:
    root = get("ALLREDUCE_AUTOTUNE_CACHE")
    if root:
        return Path(root)
    base = get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "allreduce-autotune"


def _compiler() -> str | None:
    return get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str, target: Path) -> str | None:
    """Compile SOURCE into `target` (atomically); None or the reason it failed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", dir=target.parent)
    os.close(fd)
    cmd = [compiler, "-O3", "-std=gnu11", "-shared", "-fPIC", "-o", tmp, str(SOURCE)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        os.unlink(tmp)
        return f"{compiler} failed: {exc}"
    if proc.returncode != 0:
        os.unlink(tmp)
        return f"{compiler} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    os.replace(tmp, target)
    return None


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str | None]:
    """(the library, None), or (None, why not); built on the first call of a machine."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    digest = hashlib.sha1(SOURCE.read_bytes() + compiler.encode()).hexdigest()[:16]
    target = _cache_dir() / f"shm_native-{digest}.so"
    if not target.exists():
        try:
            reason = _build(compiler, target)
        except OSError as exc:
            reason = f"cannot write {target.parent}: {exc}"
        if reason:
            return None, reason
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        return None, f"cannot load {target}: {exc}"
    # no argtypes on the hot calls: they take ctypes.byref(a Call) as it is, unconverted
    lib.aat_one_shot.restype = lib.aat_has_float16.restype = lib.aat_sum.restype = ctypes.c_int
    return lib, None


def dtype_codes(lib: ctypes.CDLL) -> dict:
    """torch dtype -> the library's code, for the dtypes this build sums (float16 needs a
    compiler with _Float16)."""
    codes = dict(DTYPE_CODES)
    if not lib.aat_has_float16():
        codes.pop("float16")
    return {d: codes[n] for d, n in DTYPE_NAMES.items() if n in codes}


class ExactSum:
    """dest = terms[0] + ... in rank order, 16-bit types accumulated in float32 and rounded
    once (`aat_sum`, the short path's own sum: one pass, vectorised); `dest` is never one of
    the terms, every tensor contiguous and of one dtype."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._sum = lib.aat_sum
        self._codes = dtype_codes(lib)

    @classmethod
    def load(cls) -> ExactSum | None:
        lib, _ = load()
        return None if lib is None else cls(lib)

    def __call__(self, dest, terms) -> bool:
        """Whether it summed (False: a dtype this build lacks; nothing written)."""
        code = self._codes.get(dest.dtype)
        if code is None:
            return False
        pointers = (ctypes.c_void_p * len(terms))(*(t.data_ptr() for t in terms))
        rc = self._sum(
            ctypes.c_void_p(dest.data_ptr()),
            pointers,
            ctypes.c_int32(len(terms)),
            ctypes.c_int64(dest.numel()),
            ctypes.c_int32(code),
        )
        return rc == OK
