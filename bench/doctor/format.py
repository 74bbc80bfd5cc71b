"""The doctor's text report: the node's sections, then the ranks' agreement and each
backend's verdict."""

from __future__ import annotations

from typing import Any

from bench.doctor.ranks import CHECK_BYTES, COMPARED

__all__ = ["format_report"]


def format_report(
    node: dict[str, Any], ranks: dict[str, Any] | None, failure: str | None, cfg
) -> str:
    lines = _node_lines(node)
    if "rendezvous" in node:
        lines.append(f"## rendezvous {cfg.master_addr}:{cfg.master_port}: {node['rendezvous']}")
    if failure:
        lines.append(f"## ranks: {failure}")
    elif ranks is None:
        lines.append("## ranks: no report came back")
    else:
        lines += _ranks_lines(ranks)
    return "\n".join(lines)


def _node_lines(node: dict[str, Any]) -> list[str]:
    v = node["versions"]
    lines = [
        f"# bench doctor: {node['host']} ({node['cpu']['model']}, {node['cpu']['cores']} cores)",
        "## versions",
    ]
    lines += [
        f"  {k:<12} {v.get(k)}"
        for k in ("python", "torch", "cuda", "cuda_driver", "driver", "nccl", "triton", "bench")
    ]
    lib = node["libnccl"]
    lines.append("## libnccl")
    lines.append(
        f"  loaded {lib['path']} (NCCL {lib['version']})"
        if "path" in lib
        else f"  not loadable: {lib['error']}"
    )
    lines += _gpu_lines(node["gpu"])
    mc = node["multicast"]
    lines.append(
        f"## NVLink multicast: {mc['devices']}" + (f" (switches: {mc['env']})" if mc["env"] else "")
    )
    shm = node["shm"]
    lines.append("## shared memory (CPU backends)")
    if "dev_shm_total_mib" in shm:
        lines.append(
            f"  /dev/shm {shm['dev_shm_free_mib']} MiB free of {shm['dev_shm_total_mib']} "
            f"MiB, writable {shm['dev_shm_writable']}"
        )
    else:
        lines.append(f"  /dev/shm {shm.get('dev_shm')}")
    lines.append(
        f"  open files {shm['open_files']['soft']} (hard {shm['open_files']['hard']}), "
        f"locked memory {shm['locked_memory_bytes']['soft']}"
    )
    return lines


def _gpu_lines(gpu: dict[str, Any]) -> list[str]:
    lines = ["## GPUs"]
    if "error" in gpu:
        return lines + [f"  none usable: {gpu['error']}"]
    for i, g in enumerate(gpu.get("gpus", [])):
        lines.append(
            f"  GPU{i} {g['name']} {g['memory_gib']} GiB cc {g.get('compute_capability')} "
            f"bus {g.get('pci_bus_id', '?')} nvlinks {g.get('nvlink_active')}"
        )
    for key, title in (("p2p", "P2P read"), ("p2p_nvlink", "P2P over NVLink")):
        if isinstance(gpu.get(key), list) and len(gpu[key]) > 1:
            lines.append(f"  {title}:")
            lines += ["  " + row for row in _matrix(gpu[key])]
    return lines


def _matrix(rows: list[list[str]]) -> list[str]:
    short = {
        "OK": "ok",
        "X": "X",
        "NotSupported": "no",
        "ChipsetNotSupported": "chipset",
        "GpuNotSupported": "gpu",
        "IOHTopologyNotSupported": "topo",
    }
    head = "        " + " ".join(f"{f'GPU{i}':>7}" for i in range(len(rows)))
    return [head] + [
        f"  GPU{i:<3}" + " ".join(f"{short.get(c, c[:7]):>7}" for c in row)
        for i, row in enumerate(rows)
    ]


def _ranks_lines(ranks: dict[str, Any]) -> list[str]:
    lines = [
        f"## ranks: {ranks['world_size']} on {ranks['hosts']} host(s), device {ranks['device']}"
    ]
    if ranks["differences"]:
        lines.append("  RANKS DIFFER (a sweep across them would compare unlike things):")
        lines += [f"    {d}" for d in ranks["differences"]]
    else:
        fp = ranks["fingerprints"][0]
        lines.append(
            "  every rank agrees on "
            + ", ".join(f"{k} {fp[k]}" for k in COMPARED if fp.get(k) is not None)
        )
    lines.append(
        f"## backends (probed, created and checked with {ranks['world_size']} "
        f"rank(s), {CHECK_BYTES} B float32)"
    )
    width = max([20, *(len(b["backend"]) for b in ranks["backends"])])  # vllm_symm_mem_...: 22
    for b in ranks["backends"]:
        lines.append(f"  {b['backend']:<{width}} {b['status']:<12} {b['reason'] or ''}".rstrip())
    if ranks["world_size"] == 1:
        lines.append("  (one rank: `bench doctor --world-size N` probes N ranks as a sweep would)")
    return lines
