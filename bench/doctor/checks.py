"""`bench doctor`: what this node offers, and for each backend whether it can run and why not.

Three parts, each usable when the others fail:
- the node, from this process: versions (torch, CUDA, driver, NCCL, Triton, Python), the libnccl
  that loads (path, version) or why none does, GPUs with their P2P/NVLink matrices and multicast
  support where NVML and the driver tell, shared-memory limits for the CPU backends, and whether
  `--master-addr:--master-port` answers;
- the ranks: `--world-size N [--nnodes M]` starts them through the same launcher as a sweep
  (torchrun's c10d rendezvous); every rank's fingerprint is gathered and any difference between
  ranks (torch, NCCL, driver, GPU model, ...) is flagged before a sweep would start;
- the backends: each is probed and created in that group exactly as a sweep does it
  (`bench.run.worker.create_backend`), then one 4 KiB float32 all-reduce is checked against the
  exact sum.

Exit code 0 when the ranks agree, 1 when they differ or a rank failed, 2 on bad flags.
`ALLREDUCE_AUTOTUNE_DOCTOR_FAKE` exists for the tests of the difference report, never set it
otherwise: a JSON object merged into every rank's fingerprint, or {"<rank>": {...}} per rank.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import errno
import json
import os
import resource
import socket
import sys
from typing import Any

from bench.launch.config import UsageError

__all__ = ["run_doctor", "node_report", "rank_fingerprint", "compare_fingerprints"]

FAKE_ENV = "ALLREDUCE_AUTOTUNE_DOCTOR_FAKE"
CHECK_BYTES = 4096
TIMEOUT_S = 120.0
# fingerprint fields that must be equal on every rank of one sweep
COMPARED = ("python", "torch", "cuda", "nccl", "libnccl", "triton", "driver", "gpu", "cc", "arch",
            "bench")
MULTICAST_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


# ---------------------------------------------------------------------------- the node
def _nccl_library() -> dict[str, Any]:
    try:
        from bench.backends.libnccl import load_library

        lib = load_library()
        return {"path": lib.path, "version": lib.version}
    except Exception as exc:
        return {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}


def _multicast(gpu_count: int) -> dict[str, Any]:
    """CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED per GPU, read from the driver (nothing is
    created), and the switches that turn NVLink multicast off."""
    out: dict[str, Any] = {"env": {k: os.environ[k] for k in MULTICAST_ENV if k in os.environ}}
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
    for name, limit in (("open_files", resource.RLIMIT_NOFILE),
                        ("locked_memory_bytes", resource.RLIMIT_MEMLOCK)):
        soft, hard = resource.getrlimit(limit)
        out[name] = {"soft": "unlimited" if soft == resource.RLIM_INFINITY else soft,
                     "hard": "unlimited" if hard == resource.RLIM_INFINITY else hard}
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
            return (f"not yet: {addr} is reachable but nothing listens on {port} "
                    "(start node 0 first, or check the port)")
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                return f"FAIL: node 0 cannot listen on {addr}:{port} ({exc.strerror})"
        return f"ok: free; node 0 will host the rendezvous on {addr}:{port}"
    if code in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINPROGRESS):
        return f"FAIL: no answer from {addr}:{port} within {timeout_s:g} s (firewall or address?)"
    return f"FAIL: {addr}:{port}: {os.strerror(code)}"


def node_report(master_addr: str | None = None, master_port: int | None = None,
                node_rank: int = 0) -> dict[str, Any]:
    """Everything this process can tell about the node, without any process group."""
    import torch

    from bench import __version__
    from bench.run.context import host_identity
    from bench.run.hardware import _cpu_model, gpu_fingerprint, versions

    gpu = gpu_fingerprint()
    report: dict[str, Any] = {
        "host": socket.gethostname(), "host_id": host_identity(),
        "cpu": {"model": _cpu_model(), "cores": os.cpu_count()},
        "versions": {**versions(), "bench": __version__, "driver": gpu.get("driver"),
                     "cuda_driver": gpu.get("cuda_driver")},
        "cuda_available": torch.cuda.is_available(),
        "libnccl": _nccl_library(),
        "gpu": gpu,
        "multicast": _multicast(len(gpu.get("gpus") or [])),
        "shm": _shm_limits(),
    }
    if master_addr and master_port:
        report["rendezvous"] = check_rendezvous(master_addr, master_port, node_rank)
    return report


# ---------------------------------------------------------------------------- the ranks
def rank_fingerprint(device, rank: int = 0) -> dict[str, Any]:
    """What must agree across the ranks of one sweep, as this rank sees it."""
    import platform

    import torch

    from bench import __version__
    from bench.run.context import host_identity
    from bench.run.hardware import gpu_fingerprint, versions

    v = versions()
    fp: dict[str, Any] = {
        "host": host_identity(),
        "python": v["python"], "torch": v["torch"], "cuda": v["cuda"], "nccl": v["nccl"],
        "triton": v["triton"], "arch": platform.machine(), "bench": __version__,
        "libnccl": _nccl_library().get("version"), "driver": None, "gpu": None, "cc": None,
    }
    if device.type == "cuda":
        gpu = gpu_fingerprint()
        fp["driver"] = gpu.get("driver")
        props = torch.cuda.get_device_properties(device)
        fp["gpu"], fp["cc"] = props.name, f"{props.major}.{props.minor}"
    fake = json.loads(os.environ.get(FAKE_ENV) or "{}")
    if all(key.isdigit() for key in fake):
        fake = fake.get(str(rank), {})
    fp.update(fake)
    return fp


def compare_fingerprints(fps: list[dict[str, Any]]) -> list[str]:
    """One line per field on which ranks differ: `torch: 2.5.1 on ranks 0,1; 2.4.0 on rank 2`."""
    lines = []
    for field in COMPARED:
        groups: dict[str, list[int]] = {}
        for rank, fp in enumerate(fps):
            groups.setdefault(str(fp.get(field)), []).append(rank)
        if len(groups) > 1:
            parts = [f"{value} on rank{'s' if len(ranks) > 1 else ''} "
                     f"{','.join(map(str, ranks))}" for value, ranks in groups.items()]
            lines.append(f"{field}: {'; '.join(parts)}")
    return lines


def _check_backend(name: str, cfg, ctx) -> dict[str, Any]:
    """Probe and create as a sweep does, then one verified all-reduce; agreed on all ranks."""
    import torch
    import torch.distributed as dist

    from bench.run.context import agreed_reason
    from bench.run.inputs import check_result, fill_input
    from bench.run.worker import create_backend

    backend, reason = create_backend(name, cfg, ctx)
    if backend is None:
        return {"backend": name, "status": "unavailable", "reason": reason}
    try:
        tensor = fill_input(torch.empty(CHECK_BYTES // 4, dtype=torch.float32,
                                        device=ctx.device), ctx.rank, seed=7)
        error = float("inf")
        try:
            local = backend.can_take(tensor)
        except Exception as exc:
            local = f"can_take failed: {type(exc).__name__}: {exc}"
        if agreed_reason(local, ctx) is None:
            try:
                out = backend.all_reduce(tensor)
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                error = check_result(out, ctx.rank, ctx.world_size, seed=7)
            except Exception as exc:
                local = f"all_reduce failed: {type(exc).__name__}: {exc}"
        reason = agreed_reason(local, ctx)
        if reason:
            return {"backend": name, "status": "unavailable", "reason": reason}
        worst = torch.tensor([error], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
        if worst.item() != 0.0:
            return {"backend": name, "status": "WRONG",
                    "reason": f"4 KiB float32 sum off by {worst.item():g}"}
        return {"backend": name, "status": "ok", "reason": None}
    finally:
        try:
            backend.release()
        except Exception as exc:  # reported, not fatal: the other backends still get checked
            print(f"bench: doctor: {name}.release() failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)


def _ranks_report(cfg) -> dict[str, Any]:
    """Runs on every rank inside an initialised gloo group. Every rank returns the same report
    (fingerprints are all-gathered, backend verdicts agreed), so every node can print it."""
    import torch.distributed as dist

    from bench import backends as registry
    from bench.run.worker import Watchdog, _make_context, dist_env

    layout = dist_env()
    watchdog = Watchdog(layout["rank"], cfg.timeout_s)
    try:
        ctx = _make_context(cfg, layout, run_tag=_shared_tag(layout["rank"]))
        fps: list = [None] * ctx.world_size
        dist.all_gather_object(fps, rank_fingerprint(ctx.device, ctx.rank), group=ctx.cpu_group)
        results = []
        for name in registry.known_names():
            watchdog.beat(f"doctor {name}")
            results.append(_check_backend(name, cfg, ctx))
        report = {"world_size": ctx.world_size, "hosts": ctx.nnodes, "device": str(ctx.device),
                  "fingerprints": fps, "differences": compare_fingerprints(fps),
                  "backends": results}
        return report
    finally:
        watchdog.stop()


def _shared_tag(rank: int) -> str:
    import uuid

    import torch.distributed as dist

    tag = [f"doc{uuid.uuid4().hex[:7]}" if rank == 0 else None]
    dist.broadcast_object_list(tag, src=0)
    return tag[0]


def _rank_main(cfg) -> dict[str, Any]:
    """Entry point of one launched rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg.timeout_s + 30))
    try:
        return _ranks_report(cfg)
    finally:
        dist.destroy_process_group()


def _in_process(cfg) -> dict[str, Any]:
    """World size 1: a one-rank gloo group in this process, no launcher needed."""
    import torch.distributed as dist

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=cfg.timeout_s + 30))
    try:
        return _ranks_report(cfg)
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _launched(cfg) -> tuple[dict[str, Any] | None, str | None]:
    """Start this node's ranks through torchrun's launcher API; (report or None, failure)."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from bench.cli import _free_port

    port = cfg.master_port or _free_port(cfg.master_addr)
    extra = {}
    if "shutdown_timeout" in getattr(LaunchConfig, "__dataclass_fields__", {}):  # torch >= 2.12
        extra["shutdown_timeout"] = 5
    config = LaunchConfig(
        min_nodes=cfg.nnodes, max_nodes=cfg.nnodes, nproc_per_node=cfg.world_size // cfg.nnodes,
        run_id=f"doctor-{uuid.uuid4().hex[:8]}" if cfg.nnodes == 1 else "bench-doctor",
        rdzv_backend="c10d", rdzv_endpoint=f"{cfg.master_addr}:{port}",
        rdzv_configs={"is_host": cfg.node_rank == 0, "join_timeout": cfg.timeout_s},
        max_restarts=0, monitor_interval=0.5, start_method="spawn", **extra,
    )
    try:
        results = elastic_launch(config, _rank_main)(cfg)
    except ChildFailedError as exc:
        ranks = ", ".join(f"rank {r} ({_why(f)})" for r, f in sorted(exc.failures.items()))
        return None, f"failed: {ranks}"
    except Exception as exc:  # rendezvous timeout, unreachable store
        return None, f"launch failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    reports = [report for _, report in sorted((results or {}).items()) if report]
    return (reports[0] if reports else None), None


def _why(failure) -> str:
    signal_name = failure.signal_name()
    return f"signal {signal_name}" if signal_name != "<N/A>" else f"exit code {failure.exitcode}"


# ---------------------------------------------------------------------------- the CLI
def _int_flag(flag: str, value: str, minimum: int, maximum: int | None = None) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum or (maximum is not None and number > maximum):
        upper = f"..{maximum}" if maximum is not None else " or more"
        raise UsageError(f"{flag}: expected an integer {minimum}{upper}, got {value!r}")
    return number


def _config(args: argparse.Namespace):
    from bench import backends as registry
    from bench.launch.config import SweepConfig, resolve_device

    world_size = _int_flag("--world-size", args.world_size, 1)
    nnodes = _int_flag("--nnodes", args.nnodes, 1)
    node_rank = _int_flag("--node-rank", args.node_rank, 0, nnodes - 1)
    if world_size % nnodes:
        raise UsageError(f"--world-size: {world_size} ranks do not split evenly over "
                         f"--nnodes {nnodes}")
    port = None if args.master_port is None else _int_flag("--master-port", args.master_port,
                                                           1, 65535)
    if nnodes > 1 and port is None:
        raise UsageError("--master-port: required with --nnodes > 1")
    device = resolve_device(args.device)
    return SweepConfig(world_size=world_size, backends=registry.known_names(),
                       sizes=[CHECK_BYTES], dtypes=["float32"], modes=["eager"], device=device,
                       timeout_s=TIMEOUT_S, nnodes=nnodes, node_rank=node_rank,
                       master_addr=args.master_addr or "127.0.0.1", master_port=port,
                       quiet=True)


def run_doctor(args: argparse.Namespace) -> int:
    cfg = _config(args)
    node = node_report(args.master_addr, cfg.master_port, cfg.node_rank)
    failure = None
    if cfg.world_size == 1 and cfg.nnodes == 1:
        ranks = _in_process(cfg)
    else:
        ranks, failure = _launched(cfg)
    if args.json:
        print(json.dumps({"node": node, "ranks": ranks, "failure": failure}, indent=2,
                         default=str))
    else:
        print(format_report(node, ranks, failure, cfg))
    if failure:
        print(f"bench: doctor: {failure}", file=sys.stderr)
        return 1
    return 1 if ranks and ranks["differences"] else 0


def _matrix(rows: list[list[str]]) -> list[str]:
    short = {"OK": "ok", "X": "X", "NotSupported": "no", "ChipsetNotSupported": "chipset",
             "GpuNotSupported": "gpu", "IOHTopologyNotSupported": "topo"}
    head = "        " + " ".join(f"{f'GPU{i}':>7}" for i in range(len(rows)))
    return [head] + [f"  GPU{i:<3}" + " ".join(f"{short.get(c, c[:7]):>7}" for c in row)
                     for i, row in enumerate(rows)]


def format_report(node: dict[str, Any], ranks: dict[str, Any] | None, failure: str | None,
                  cfg) -> str:
    v = node["versions"]
    lines = [f"# bench doctor: {node['host']} ({node['cpu']['model']}, {node['cpu']['cores']} cores)",
             "## versions"]
    lines += [f"  {k:<12} {v.get(k)}" for k in ("python", "torch", "cuda", "cuda_driver",
                                                  "driver", "nccl", "triton", "bench")]
    lib = node["libnccl"]
    lines.append("## libnccl")
    lines.append(f"  loaded {lib['path']} (NCCL {lib['version']})" if "path" in lib
                 else f"  not loadable: {lib['error']}")
    gpu = node["gpu"]
    lines.append("## GPUs")
    if "error" in gpu:
        lines.append(f"  none usable: {gpu['error']}")
    else:
        for i, g in enumerate(gpu.get("gpus", [])):
            lines.append(f"  GPU{i} {g['name']} {g['memory_gib']} GiB cc {g.get('compute_capability')} "
                         f"bus {g.get('pci_bus_id', '?')} nvlinks {g.get('nvlink_active')}")
        for key, title in (("p2p", "P2P read"), ("p2p_nvlink", "P2P over NVLink")):
            if isinstance(gpu.get(key), list) and len(gpu[key]) > 1:
                lines.append(f"  {title}:")
                lines += ["  " + row for row in _matrix(gpu[key])]
    mc = node["multicast"]
    lines.append(f"## NVLink multicast: {mc['devices']}"
                 + (f" (switches: {mc['env']})" if mc["env"] else ""))
    shm = node["shm"]
    lines.append("## shared memory (CPU backends)")
    if "dev_shm_total_mib" in shm:
        lines.append(f"  /dev/shm {shm['dev_shm_free_mib']} MiB free of {shm['dev_shm_total_mib']} "
                     f"MiB, writable {shm['dev_shm_writable']}")
    else:
        lines.append(f"  /dev/shm {shm.get('dev_shm')}")
    lines.append(f"  open files {shm['open_files']['soft']} (hard {shm['open_files']['hard']}), "
                 f"locked memory {shm['locked_memory_bytes']['soft']}")
    if "rendezvous" in node:
        lines.append(f"## rendezvous {cfg.master_addr}:{cfg.master_port}: {node['rendezvous']}")
    if failure:
        lines.append(f"## ranks: {failure}")
        return "\n".join(lines)
    if ranks is None:
        lines.append("## ranks: no report came back")
        return "\n".join(lines)
    lines.append(f"## ranks: {ranks['world_size']} on {ranks['hosts']} host(s), device "
                 f"{ranks['device']}")
    if ranks["differences"]:
        lines.append("  RANKS DIFFER (a sweep across them would compare unlike things):")
        lines += [f"    {d}" for d in ranks["differences"]]
    else:
        fp = ranks["fingerprints"][0]
        lines.append("  every rank agrees on " + ", ".join(
            f"{k} {fp[k]}" for k in COMPARED if fp.get(k) is not None))
    lines.append(f"## backends (probed, created and checked with {ranks['world_size']} "
                 f"rank(s), {CHECK_BYTES} B float32)")
    for b in ranks["backends"]:
        lines.append(f"  {b['backend']:<20} {b['status']:<12} {b['reason'] or ''}".rstrip())
    if ranks["world_size"] == 1:
        lines.append("  (one rank: `bench doctor --world-size N` probes N ranks as a sweep would)")
    return "\n".join(lines)
