"""A CommContext for a process group, and backends built the same way on every rank.

The sweep's worker, `bench doctor`, the dispatcher and `tuner live` all serve a group: a gloo
group over the same ranks for out-of-band exchange (the group itself when it is gloo), a run tag
shared by all ranks (names of shm segments and IPC handles), and the host layout gathered from
every rank (nodes are detected by hostname and boot id, never assumed).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from bench.backends import CommContext, device_reason, get_spec
from bench.run.hardware import host_id

__all__ = ["make_context", "agreed_reason", "build_backend", "broadcast_object"]


def broadcast_object(value: Any, group) -> Any:
    """Rank 0 of `group`'s value, on every rank."""
    payload = [value]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
    return payload[0]


def make_context(
    group=None,
    device: torch.device | str | None = None,
    timeout_s: float = 60.0,
    run_tag: str | None = None,
) -> CommContext:
    """Collective over `group` (default: the world group)."""
    group = group or dist.group.WORLD
    if dist.get_backend(group) == "gloo":
        cpu_group = group
    else:
        cpu_group = dist.new_group(dist.get_process_group_ranks(group), backend="gloo")
    if device is None:
        backend = dist.get_backend(group)
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl" and torch.cuda.is_available()
            else torch.device("cpu")
        )
    device = torch.device(device)
    rank, world = dist.get_rank(cpu_group), dist.get_world_size(cpu_group)
    hosts: list = [None] * world
    dist.all_gather_object(hosts, host_id(), group=cpu_group)
    local = [r for r in range(world) if hosts[r] == hosts[rank]]
    if run_tag is None:
        run_tag = "ar-" + broadcast_object(uuid.uuid4().hex[:10] if rank == 0 else None, cpu_group)
    return CommContext(
        rank=rank,
        world_size=world,
        local_rank=local.index(rank),
        local_world_size=len(local),
        nnodes=len(set(hosts)),
        device=device,
        cpu_group=cpu_group,
        timeout_s=timeout_s,
        run_tag=run_tag,
        same_host=len(set(hosts)) == 1,
        visible_gpus=torch.cuda.device_count() if device.type == "cuda" else 0,
        extra={"hosts": hosts},
    )


def agreed_reason(reason: str | None, ctx: CommContext) -> str | None:
    """Every rank's reason gathered: any rank's reason is everyone's."""
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, reason, group=ctx.cpu_group)
    for rank, r in enumerate(gathered):
        if r:
            return r if all(g == r for g in gathered) else f"rank {rank}: {r}"
    return None


def build_backend(
    name: str, params: Mapping[str, Any], max_bytes: int, ctx: CommContext, instance: str = ""
) -> tuple[Any, str | None]:
    """Probe and create on every rank (collective); a reason on any rank skips it everywhere.

    `instance` makes the run tag unique when one group holds several backends of one
    algorithm (with different knobs): their shm segments and IPC names must not collide."""
    if instance:
        ctx = dataclasses.replace(ctx, run_tag=f"{ctx.run_tag}-{instance}")
    backend, reason, spec = None, None, None
    try:
        spec = get_spec(name)
    except KeyError as exc:
        reason = str(exc.args[0])
    if spec is not None:
        reason = device_reason(spec, ctx.device.type)
    if spec is not None and reason is None:
        reason = spec.unknown_knob(params)  # values are the backend's to judge when built
    if spec is not None and reason is None:
        try:
            reason = spec.probe(ctx)
        except Exception as exc:
            reason = f"probe failed: {type(exc).__name__}: {exc}"
    reason = agreed_reason(reason, ctx)
    if reason is None:
        try:
            backend = spec.create(ctx, max_bytes, **dict(params))
        except Exception as exc:
            reason = f"create failed: {type(exc).__name__}: {exc}"
        reason = agreed_reason(reason, ctx)
        if reason and backend is not None:
            backend.release()
            backend = None
    return backend, reason
