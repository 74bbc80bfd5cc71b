"""A small ctypes binding of libnccl: the calls `pynccl` needs, nothing more.

Which library: `ALLREDUCE_AUTOTUNE_NCCL_PATH` when set (and only that one); else the libnccl
this process already mapped (torch's, so both agree on the version); else the one shipped in
site-packages `nvidia/nccl/lib` (the nvidia-nccl wheel torch depends on), torch's own `lib/`,
then the system loader's `libnccl.so.2`. A library that cannot be loaded raises `NcclLoadError`
naming every path tried, the platform, and whether that is expected here (no NVIDIA GPU).

Facts used (nccl.h): ncclUniqueId is 128 bytes passed by value; ncclConfig_t is versioned and
append-only, NCCL copies `size` bytes of it and resets fields newer than `version`, so a prefix
up to `netName` declared as version 2.17 is read correctly by every later NCCL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import site
import sys
from pathlib import Path

import torch

from bench.backends.base import scoped_env
from bench.environment import get

__all__ = [
    "CTAS",
    "ENV_PATH",
    "NcclError",
    "NcclLoadError",
    "NcclLibrary",
    "candidate_paths",
    "load_library",
    "nccl_dtype",
    "WIN_COLL_SYMMETRIC",
    "SYMMETRIC_MIN_VERSION",
    "ALGOS",
    "PROTOS",
    "algo_proto_env",
]

# NCCL's algorithm and protocol, forced for one communicator through NCCL_ALGO / NCCL_PROTO
# (read at communicator init); "default" leaves NCCL's own choice. Knob values of the nccl
# and pynccl backends, and columns of `tuner export --format nccl-tuner`.
_ALGO_ENV = {"default": None, "ring": "Ring", "tree": "Tree"}
_PROTO_ENV = {"default": None, "simple": "Simple", "ll": "LL", "ll128": "LL128"}
ALGOS = tuple(_ALGO_ENV)
PROTOS = tuple(_PROTO_ENV)
# CTAs (channels) per communicator, min_ctas = max_ctas through ncclConfig_t; 0: NCCL's choice
CTAS = (0, 1, 2, 4, 8, 16, 32)


def algo_proto_env(algo: str = "default", proto: str = "default"):
    """NCCL_ALGO / NCCL_PROTO set for the duration of a communicator's init (restored after);
    "default" leaves the variable as it is."""
    if algo not in _ALGO_ENV or proto not in _PROTO_ENV:
        raise ValueError(f"algo/proto: expected one of {ALGOS} / {PROTOS}, got {algo!r}/{proto!r}")
    return scoped_env({"NCCL_ALGO": _ALGO_ENV[algo], "NCCL_PROTO": _PROTO_ENV[proto]})


ENV_PATH = "ALLREDUCE_AUTOTUNE_NCCL_PATH"
WIN_COLL_SYMMETRIC = 0x01
SYMMETRIC_MIN_VERSION = 22700  # NCCL 2.27.0: ncclCommWindowRegister, symmetric kernels
_CONFIG_VERSION = 21700  # ncclConfig_t prefix below (minCTAs/maxCTAs/netName) as of 2.17
_CONFIG_MAGIC = 0xCAFEBEEF
_UNDEF_INT = -(2**31)
_SUM = 0
_RESULTS = {
    0: "ncclSuccess",
    1: "ncclUnhandledCudaError",
    2: "ncclSystemError",
    3: "ncclInternalError",
    4: "ncclInvalidArgument",
    5: "ncclInvalidUsage",
    6: "ncclRemoteError",
    7: "ncclInProgress",
    8: "ncclTimeout",
}
_DTYPES = {
    torch.int8: 0,
    torch.uint8: 1,
    torch.int32: 2,
    torch.int64: 4,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
    torch.bfloat16: 9,
}


class NcclLoadError(RuntimeError):
    """libnccl could not be loaded; the message says where we looked and why."""


class NcclError(RuntimeError):
    """A NCCL call returned an error; one line: the call, the code, NCCL's words."""


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


class NcclConfig(ctypes.Structure):
    """The ncclConfig_t prefix this project sets (see the module docstring)."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("blocking", ctypes.c_int),
        ("cgaClusterSize", ctypes.c_int),
        ("minCTAs", ctypes.c_int),
        ("maxCTAs", ctypes.c_int),
        ("netName", ctypes.c_char_p),
    ]


def nccl_dtype(dtype: torch.dtype) -> int | None:
    return _DTYPES.get(dtype)


def _site_dirs() -> list[Path]:
    dirs: list[str] = []
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # some virtualenvs
        pass
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    dirs += [user] if isinstance(user, str) else []
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return [Path(d) for d in dict.fromkeys(dirs)]


def _mapped_libnccl() -> str | None:
    """The libnccl this process already mapped (torch links it), if any."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.rsplit(None, 1)[-1]
                if "/libnccl.so" in path and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return None


def candidate_paths() -> list[str]:
    """Where libnccl is looked for, in order (see the module docstring)."""
    override = get(ENV_PATH)
    if override:
        return [override]
    paths: list[str] = []
    mapped = _mapped_libnccl()
    if mapped:
        paths.append(mapped)
    for base in _site_dirs():
        paths.append(str(base / "nvidia" / "nccl" / "lib" / "libnccl.so.2"))
    paths.append(str(Path(torch.__file__).parent / "lib" / "libnccl.so.2"))
    found = ctypes.util.find_library("nccl")
    paths.append(found or "libnccl.so.2")  # a bare name: the system loader's search
    return list(dict.fromkeys(paths))


def _platform_note() -> str:
    where = f"{sys.platform} {platform.machine()}"
    if torch.version.cuda is None:
        return f"platform {where}, torch {torch.__version__} without CUDA: expected, no NVIDIA GPU"
    if not torch.cuda.is_available():
        return (
            f"platform {where}, torch built for CUDA {torch.version.cuda} but no CUDA device "
            "visible: expected without an NVIDIA GPU"
        )
    return (
        f"platform {where}, CUDA {torch.version.cuda} with {torch.cuda.device_count()} GPU(s): "
        f"unexpected, set {ENV_PATH} to a libnccl.so.2"
    )


@functools.cache
def _load(paths: tuple[str, ...]) -> NcclLibrary:
    errors = []
    for path in paths:
        if os.sep in path and not os.path.exists(path):
            errors.append(f"{path} (missing)")
            continue
        try:
            return NcclLibrary(ctypes.CDLL(path), path)
        except (OSError, AttributeError) as exc:
            errors.append(f"{path} ({str(exc).splitlines()[0][:120]})")
    raise NcclLoadError(f"cannot load libnccl: tried {'; '.join(errors)}; {_platform_note()}")


def load_library() -> NcclLibrary:
    """The first loadable libnccl of `candidate_paths()` (cached), or NcclLoadError."""
    return _load(tuple(candidate_paths()))


def _fn(lib: ctypes.CDLL, name: str, argtypes: list, restype=ctypes.c_int):
    func = getattr(lib, name)
    func.argtypes, func.restype = argtypes, restype
    return func


class NcclLibrary:
    """One loaded libnccl. Every call checks its result and raises NcclError with NCCL's text."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.path = path
        self._lib = lib
        vp, cp, i, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
        self._get_version = _fn(lib, "ncclGetVersion", [ctypes.POINTER(i)])
        self._error_string = _fn(lib, "ncclGetErrorString", [i], cp)
        self._unique_id = _fn(lib, "ncclGetUniqueId", [ctypes.POINTER(NcclUniqueId)])
        self._init_rank = _fn(lib, "ncclCommInitRank", [ctypes.POINTER(vp), i, NcclUniqueId, i])
        self._all_reduce = _fn(lib, "ncclAllReduce", [vp, vp, sz, i, i, vp, vp])
        self._destroy = _fn(lib, "ncclCommDestroy", [vp])
        self._abort = _fn(lib, "ncclCommAbort", [vp])
        self._async_error = _fn(lib, "ncclCommGetAsyncError", [vp, ctypes.POINTER(i)])
        self._init_config = self._optional(
            "ncclCommInitRankConfig",
            [ctypes.POINTER(vp), i, NcclUniqueId, i, ctypes.POINTER(NcclConfig)],
        )
        self._last_error = self._optional("ncclGetLastError", [vp], cp)
        self._mem_alloc = self._optional("ncclMemAlloc", [ctypes.POINTER(vp), sz])
        self._mem_free = self._optional("ncclMemFree", [vp])
        self._win_register = self._optional(
            "ncclCommWindowRegister", [vp, vp, sz, ctypes.POINTER(vp), i]
        )
        self._win_deregister = self._optional("ncclCommWindowDeregister", [vp, vp])
        code = ctypes.c_int()
        self._check("ncclGetVersion", self._get_version(ctypes.byref(code)))
        self.version_code = code.value
        self.version = self._version_text(code.value)

    def _optional(self, name: str, argtypes: list, restype=ctypes.c_int):
        try:
            return _fn(self._lib, name, argtypes, restype)
        except AttributeError:
            return None

    @staticmethod
    def _version_text(code: int) -> str:
        if code < 10000:  # NCCL <= 2.8 coded X*1000 + Y*100 + Z
            return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"

    def has(self, name: str) -> bool:
        return hasattr(self._lib, name)

    def _check(self, call: str, result: int, comm: int | None = None) -> None:
        if result == 0:
            return
        text = self._error_string(result)
        words = text.decode() if text else _RESULTS.get(result, "unknown")
        detail = ""
        if self._last_error is not None:
            last = self._last_error(comm)
            detail = f": {last.decode().strip()}" if last else ""
        raise NcclError(
            f"{call} failed with {_RESULTS.get(result, result)} ({words}){detail}".replace(
                "\n", " "
            )
        )

    # -- communicator --------------------------------------------------------------------------
    def unique_id(self) -> bytes:
        uid = NcclUniqueId()
        self._check("ncclGetUniqueId", self._unique_id(ctypes.byref(uid)))
        return ctypes.string_at(ctypes.addressof(uid), ctypes.sizeof(uid))

    def comm_init_rank(
        self, nranks: int, unique_id: bytes, rank: int, *, min_ctas: int = 0, max_ctas: int = 0
    ) -> int:
        """A communicator on the current CUDA device; CTA bounds through ncclConfig_t."""
        if len(unique_id) != 128:
            raise ValueError(f"ncclUniqueId must be 128 bytes, got {len(unique_id)}")
        uid = NcclUniqueId()
        ctypes.memmove(uid.internal, unique_id, 128)
        comm = ctypes.c_void_p()
        if min_ctas or max_ctas:
            if self._init_config is None or self.version_code < _CONFIG_VERSION:
                raise NcclError(
                    f"NCCL {self.version} cannot bound CTAs per communicator "
                    "(ncclCommInitRankConfig with minCTAs/maxCTAs needs >= 2.17)"
                )
            config = NcclConfig(
                ctypes.sizeof(NcclConfig),
                _CONFIG_MAGIC,
                _CONFIG_VERSION,
                _UNDEF_INT,
                _UNDEF_INT,
                min_ctas or _UNDEF_INT,
                max_ctas or _UNDEF_INT,
                None,
            )
            self._check(
                "ncclCommInitRankConfig",
                self._init_config(ctypes.byref(comm), nranks, uid, rank, ctypes.byref(config)),
            )
        else:
            self._check("ncclCommInitRank", self._init_rank(ctypes.byref(comm), nranks, uid, rank))
        return int(comm.value or 0)

    def all_reduce(
        self, send_ptr: int, recv_ptr: int, count: int, dtype: int, comm: int, stream: int
    ) -> None:
        self._check(
            "ncclAllReduce",
            self._all_reduce(send_ptr, recv_ptr, count, dtype, _SUM, comm, stream),
            comm,
        )

    def async_error(self, comm: int) -> str | None:
        code = ctypes.c_int()
        if self._async_error(comm, ctypes.byref(code)) != 0 or code.value in (0, 7):
            return None
        text = self._error_string(code.value)
        return text.decode() if text else _RESULTS.get(code.value, str(code.value))

    def comm_destroy(self, comm: int) -> None:
        self._check("ncclCommDestroy", self._destroy(comm))

    def comm_abort(self, comm: int) -> None:
        self._abort(comm)

    # -- symmetric windows (NCCL >= 2.27) -------------------------------------------------------
    def symmetric_support(self) -> str | None:
        """None when windows can be registered, else why not."""
        if self.version_code < SYMMETRIC_MIN_VERSION:
            return f"NCCL {self.version} has no symmetric windows (needs >= 2.27)"
        missing = [
            n
            for n, f in (
                ("ncclMemAlloc", self._mem_alloc),
                ("ncclCommWindowRegister", self._win_register),
                ("ncclCommWindowDeregister", self._win_deregister),
            )
            if f is None
        ]
        if missing:
            return f"{self.path} (NCCL {self.version}) lacks {', '.join(missing)}"
        return None

    def mem_alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check("ncclMemAlloc", self._mem_alloc(ctypes.byref(ptr), nbytes))
        return int(ptr.value or 0)

    def mem_free(self, ptr: int) -> None:
        self._check("ncclMemFree", self._mem_free(ptr))

    def window_register(self, comm: int, ptr: int, nbytes: int, flags: int) -> int:
        win = ctypes.c_void_p()
        self._check(
            "ncclCommWindowRegister",
            self._win_register(comm, ptr, nbytes, ctypes.byref(win), flags),
            comm,
        )
        return int(win.value or 0)

    def window_deregister(self, comm: int, window: int) -> None:
        self._check("ncclCommWindowDeregister", self._win_deregister(comm, window), comm)
