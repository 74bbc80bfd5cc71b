"""The node, as this process sees it, without any process group: versions, the libnccl that
loads (or why none does), GPUs with their P2P/NVLink matrices and multicast support where NVML
and the driver tell, shared-memory limits for the CPU backends, and whether
`--master-addr:--master-port` answers."""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import socket
from typing import Any

from bench import __version__
from bench.backends.libnccl import load_library
from bench.environment import MULTICAST_SWITCHES, get
from bench.run.hardware import cpu_model, gpu_fingerprint, host_id, versions

__all__ = ["node_report", "check_rendezvous", "nccl_library"]


def nccl_library() -> dict[str, Any]:
    """{"path", "version"} of the libnccl that loads, or {"error"}: why none does."""
    try:
        lib = load_library()
        return {"path": lib.path, "version": lib.version}
    except Exception as exc:
        return {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}


def _multicast(gpu_count: int) -> dict[str, Any]:
    """CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED per GPU, read from the driver (nothing is
    created), and the switches that turn NVLink multicast off."""
    out: dict[str, Any] = {"env": {k: get(k) for k, _ in MULTICAST_SWITCHES if get(k) is not None}}
    if gpu_count == 0:
        out["devices"] = "no GPU"
        return out
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        value, device, count = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            raise OSError("cuInit/cuDeviceGetCount failed")
        supported = []
        for index in range(count.value):  # the devices this process sees (CUDA_VISIBLE_DEVICES)
            if cuda.cuDeviceGet(ctypes.byref(device), index) != 0:
                raise OSError(f"cuDeviceGet({index}) failed")
            code = cuda.cuDeviceGetAttribute(ctypes.byref(value), 132, device)  # MULTICAST
            supported.append(bool(value.value) if code == 0 else f"unknown (CUresult {code})")
        out["devices"] = supported
    except (OSError, AttributeError) as exc:
        out["devices"] = f"unknown: {str(exc).splitlines()[0]}"
    return out


def _shm_limits() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        st = os.statvfs("/dev/shm")
        out["dev_shm_total_mib"] = st.f_blocks * st.f_frsize >> 20
        out["dev_shm_free_mib"] = st.f_bavail * st.f_frsize >> 20
        out["dev_shm_writable"] = os.access("/dev/shm", os.W_OK | os.X_OK)
    except OSError as exc:
        out["dev_shm"] = f"unavailable: {exc}"
    for name in ("shmmax", "shmall", "shmmni"):
        try:
            with open(f"/proc/sys/kernel/{name}") as fh:
                out[f"kernel_{name}"] = int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    for name, limit in (
        ("open_files", resource.RLIMIT_NOFILE),
        ("locked_memory_bytes", resource.RLIMIT_MEMLOCK),
    ):
        soft, hard = resource.getrlimit(limit)
        out[name] = {
            "soft": "unlimited" if soft == resource.RLIM_INFINITY else soft,
            "hard": "unlimited" if hard == resource.RLIM_INFINITY else hard,
        }
    return out


def check_rendezvous(addr: str, port: int, node_rank: int, timeout_s: float = 2.0) -> str:
    """One line: can this node reach `addr:port` (or, on node 0, host it)?"""
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"FAIL: cannot resolve {addr!r} ({exc.strerror})"
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        code = sock.connect_ex(sockaddr)
    if code == 0:
        return f"ok: {addr}:{port} answers"
    if code == errno.ECONNREFUSED:
        if node_rank > 0:
            return (
                f"not yet: {addr} is reachable but nothing listens on {port} "
                "(start node 0 first, or check the port)"
            )
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                return f"FAIL: node 0 cannot listen on {addr}:{port} ({exc.strerror})"
        return f"ok: free; node 0 will host the rendezvous on {addr}:{port}"
    if code in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINPROGRESS):
        return f"FAIL: no answer from {addr}:{port} within {timeout_s:g} s (firewall or address?)"
    return f"FAIL: {addr}:{port}: {os.strerror(code)}"


def node_report(
    master_addr: str | None = None, master_port: int | None = None, node_rank: int = 0
) -> dict[str, Any]:
    """Everything this process can tell about the node, without any process group."""
    import torch

    gpu = gpu_fingerprint()
    report: dict[str, Any] = {
        "host": socket.gethostname(),
        "host_id": host_id(),
        "cpu": {"model": cpu_model(), "cores": os.cpu_count()},
        "versions": {
            **versions(),
            "bench": __version__,
            "driver": gpu.get("driver"),
            "cuda_driver": gpu.get("cuda_driver"),
        },
        "cuda_available": torch.cuda.is_available(),
        "libnccl": nccl_library(),
        "gpu": gpu,
        "multicast": _multicast(len(gpu.get("gpus") or [])),
        "shm": _shm_limits(),
    }
    if master_addr and master_port:
        report["rendezvous"] = check_rendezvous(master_addr, master_port, node_rank)
    return report
