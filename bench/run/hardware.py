"""Hardware fingerprint and the hardware key that names a machine in results and tables.

CPU: model, cores, memory, host hash. GPU (through NVML, nvidia-ml-py): name, memory, driver,
compute capability, the P2P/NVLink matrix where NVML reports it (a NotSupported answer is
recorded, not fatal). Versions of torch, NCCL, Triton, CUDA and Python.

The key names what the measurements depend on: `cpu-<model>-<cores>c` or
`<gpu-model>-x<count>-<link>` where link is nvlink (every GPU pair P2P over NVLink), pcie (P2P
over PCIe), nop2p (some pair without P2P) or single (one GPU).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import socket
import sys
from typing import Any

import torch

__all__ = [
    "fingerprint",
    "hardware_key",
    "host_id",
    "cpu_model",
    "slug",
    "versions",
    "gpu_fingerprint",
    "KEY_PATTERN",
    "device_of_key",
]


def slug(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)|cpu @.*$|@.*$", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:48] or "unknown"


def host_id() -> str:
    """Hostname plus boot id: two ranks with the same value are on one host."""
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        pass
    return f"{socket.gethostname()}/{boot}"


def cpu_model() -> str:
    """The CPU model name, as /proc/cpuinfo gives it."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
        out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
    except Exception as exc:
        out["nccl"] = f"unavailable: {exc}"
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    return out


def _nvml_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_fingerprint() -> dict[str, Any]:
    """NVML view of the GPUs; {'error': ...} when NVML is missing (no NVIDIA driver)."""
    try:
        import pynvml
    except ImportError as exc:
        return {"error": f"nvidia-ml-py not importable: {exc}"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return {"error": f"NVML unavailable ({type(exc).__name__}: {exc})"}
    try:
        info: dict[str, Any] = {"driver": _nvml_text(pynvml.nvmlSystemGetDriverVersion())}
        try:
            cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
            info["cuda_driver"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except Exception as exc:
            info["cuda_driver"] = f"unknown: {exc}"
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        gpus = []
        for h in handles:
            gpu = {
                "name": _nvml_text(pynvml.nvmlDeviceGetName(h)),
                "memory_gib": round(pynvml.nvmlDeviceGetMemoryInfo(h).total / (1 << 30), 1),
            }
            try:
                gpu["compute_capability"] = ".".join(
                    map(str, pynvml.nvmlDeviceGetCudaComputeCapability(h))
                )
            except Exception as exc:
                gpu["compute_capability"] = f"unknown: {exc}"
            try:
                gpu["pci_bus_id"] = _nvml_text(pynvml.nvmlDeviceGetPciInfo(h).busId)
            except Exception as exc:
                gpu["pci_bus_id"] = f"unknown: {exc}"
            gpu["nvlink_active"] = _active_nvlinks(pynvml, h)
            gpus.append(gpu)
        info["gpus"] = gpus
        info["p2p"] = _p2p_matrix(pynvml, handles, _P2P_READ)
        info["p2p_nvlink"] = _p2p_matrix(pynvml, handles, _P2P_NVLINK)
        return info
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


# nvmlGpuP2PCapsIndex_t values from nvml.h (some nvidia-ml-py releases define the READ
# constant as a one-element tuple, which NVML then rejects: use the C values)
_P2P_READ, _P2P_NVLINK = 0, 2
_P2P_STATUS = {
    0: "OK",
    1: "ChipsetNotSupported",
    2: "GpuNotSupported",
    3: "IOHTopologyNotSupported",
    4: "DisabledByRegKey",
    5: "NotSupported",
    6: "Unknown",
}


def _active_nvlinks(pynvml, handle) -> int | str:
    active = 0
    for link in range(int(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18))):
        try:
            if pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED:
                active += 1
        except Exception as exc:
            if link == 0:
                return f"NotSupported ({exc})"
            break
    return active


def _p2p_matrix(pynvml, handles, index: int) -> list[list[str]]:
    """P2P status between every pair for one capability, 'OK' or NVML's word for why not."""
    matrix = []
    for i, a in enumerate(handles):
        row = []
        for j, b in enumerate(handles):
            if i == j:
                row.append("X")
                continue
            try:
                status = int(pynvml.nvmlDeviceGetP2PStatus(a, b, index))
                row.append(_P2P_STATUS.get(status, str(status)))
            except Exception as exc:
                row.append(f"error: {exc}")
        matrix.append(row)
    return matrix


def _all_ok(matrix: Any) -> bool:
    return isinstance(matrix, list) and all(c in ("OK", "X") for row in matrix for c in row)


def _link_type(gpu: dict[str, Any]) -> str:
    gpus = gpu.get("gpus") or []
    if len(gpus) < 2:
        return "single"
    if _all_ok(gpu.get("p2p_nvlink")) or all(
        isinstance(g.get("nvlink_active"), int) and g["nvlink_active"] > 0 for g in gpus
    ):
        return "nvlink"
    if _all_ok(gpu.get("p2p")):
        return "pcie"
    return "nop2p"


def hardware_key(fp: dict[str, Any], device_type: str) -> str:
    if device_type == "cuda" and fp.get("gpu", {}).get("gpus"):
        gpus = fp["gpu"]["gpus"]
        visible = fp.get("visible_gpus", len(gpus))
        link = _link_type(fp["gpu"]) if visible > 1 else "single"
        return f"{slug(fp.get('cuda_name') or gpus[0]['name'])}-x{visible}-{link}"
    if device_type == "cuda" and fp.get("cuda_name"):  # CUDA without NVML: link unknown
        return f"{slug(fp['cuda_name'])}-x{fp.get('visible_gpus', 1)}-unknown"
    return f"cpu-{slug(fp['cpu']['model'])}-{fp['cpu']['cores']}c"


# the shapes `hardware_key` writes: cpu-<model>-<cores>c, <gpu>-x<count>-<link>
KEY_PATTERN = re.compile(r"cpu-[a-z0-9-]+-\d+c|[a-z0-9-]+-x\d+-(nvlink|pcie|nop2p|single|unknown)")


def device_of_key(key: str) -> str:
    """The device ("cpu" or "cuda") of the node a hardware key names."""
    return "cpu" if key.startswith("cpu-") else "cuda"


def fingerprint(device_type: str = "cpu") -> dict[str, Any]:
    """Everything a run's meta.json records about this node."""
    fp: dict[str, Any] = {
        "cpu": {
            "model": cpu_model(),
            "cores": os.cpu_count(),
            "arch": platform.machine(),
            "memory_gib": _mem_total_gib(),
        },
        "host_hash": hashlib.sha256(host_id().encode()).hexdigest()[:12],
        "platform": sys.platform,
        "versions": versions(),
    }
    if device_type == "cuda":
        fp["gpu"] = gpu_fingerprint()
        fp["visible_gpus"] = torch.cuda.device_count()
        if fp["visible_gpus"]:
            fp["cuda_name"] = torch.cuda.get_device_name(0)
    fp["hardware_key"] = hardware_key(fp, device_type)
    return fp
