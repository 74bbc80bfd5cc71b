"""CUDA IPC: one device allocation per rank, mapped into every peer process of one host.

Each rank allocates its buffer with torch, exports it through torch's own CUDA IPC path
(`torch.multiprocessing.reductions.reduce_tensor`, which records the storage's offset inside
its caching-allocator block, so sub-allocations are safe), exchanges the handles over the gloo
CPU group, and opens every peer's handle in the context of ITS OWN device (as vLLM does with
`cudaIpcOpenMemHandle`: the driver enables peer access lazily), so a kernel on this rank's
GPU can read and write the peer memory directly. With several ranks on one GPU the same path
maps the peers' buffers of that GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["IpcBuffer"]

# position of the storage device in reduce_tensor's rebuild arguments
_DEVICE_ARG = 6


class IpcBuffer:
    """`nbytes` of device memory per rank; `tensors[r]` is rank r's buffer as a uint8 tensor
    in this process (this rank's own allocation at index `rank`). The first `zero_bytes` are
    zeroed before any peer can see the buffer (flag areas)."""

    def __init__(
        self,
        nbytes: int,
        device: torch.device,
        cpu_group,
        rank: int,
        world_size: int,
        zero_bytes: int = 0,
    ) -> None:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

        self.rank, self.world_size, self.nbytes = rank, world_size, nbytes
        self.device = device
        self.local = torch.empty(nbytes, dtype=torch.uint8, device=device)
        if zero_bytes:
            self.local[:zero_bytes].zero_()
        torch.cuda.synchronize(device)
        # one export per peer: torch gives each export its own reference counter, and each
        # peer's mapping releases exactly one (one export shared by several peers would be
        # released more than once, and the owner would never see it free)
        exports = [reduce_tensor(self.local)[1] for _ in range(world_size - 1)]
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, exports, group=cpu_group)
        self.tensors: list[torch.Tensor] = []
        for peer, peer_exports in enumerate(gathered):
            if peer == rank:
                self.tensors.append(self.local)
                continue
            opened = list(peer_exports[rank if rank < peer else rank - 1])
            opened[_DEVICE_ARG] = device.index
            self.tensors.append(rebuild_cuda_tensor(*opened))
        torch.cuda.synchronize(device)

    def addresses(self) -> list[int]:
        """Each rank's buffer address as seen from this process."""
        return [t.data_ptr() for t in self.tensors]

    def close_peers(self) -> None:
        """Drop the mappings of the peers' buffers (first step of a release; the caller
        synchronises first). Torch counts the mappings of an exported block: dropping ours
        lets each owner free its buffer without "Producer process has been terminated before
        all shared CUDA tensors released"."""
        self.tensors = [self.local] if self.local is not None else []

    def free_local(self) -> None:
        """Free this rank's own buffer (second step: after every peer closed its mapping, a
        barrier in between) and collect what torch kept for the handles it exported."""
        self.tensors = []
        self.local = None  # type: ignore[assignment]
        torch.cuda.ipc_collect()

    def release(self) -> None:
        """Both steps at once (no peer to wait for: a crashed group, or world size 1)."""
        self.close_peers()
        self.free_local()
