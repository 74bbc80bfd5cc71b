"""The backend protocol: can I take this tensor (and if not, why), all-reduce it, release.

A backend is a communicator for one group and one algorithm. Its family module registers a
`BackendSpec` whose `probe` says whether the backend can run in this group at all (a reason
string, or None), and whose `create` builds it with a buffer of `max_bytes` and its knobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from bench.dtypes import ALL_DTYPES

__all__ = [
    "Backend",
    "BackendSpec",
    "WritesElsewhere",
    "CommContext",
    "Gate",
    "make_gate",
    "params_key",
    "scoped_env",
]


@dataclasses.dataclass
class CommContext:
    """What a backend may know about the group it serves.

    `cpu_group` is always a gloo group over the same ranks: backends use it to exchange
    handles, unique ids and flags out of band. `device` is the tensor device of this rank.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    nnodes: int
    device: torch.device
    cpu_group: Any  # dist.ProcessGroup; Any so a test may pass a stand-in
    timeout_s: float = 60.0
    # a name unique to this run, shared by all ranks: prefixes shm segments, IPC handles
    run_tag: str = "local"
    # ranks whose host differs from this one's (by hostname and boot id)
    same_host: bool = True
    # number of CUDA devices this rank can see (0 on CPU)
    visible_gpus: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)


@runtime_checkable
class Backend(Protocol):
    """One communicator, one algorithm. Three verbs (and the optional fourth: `WritesElsewhere`)."""

    name: str
    # True when all_reduce writes the sum into its input (torch.distributed style)
    in_place: bool

    def can_take(self, tensor: torch.Tensor) -> str | None:
        """None if `all_reduce(tensor)` will work, else a one-line reason. Cheap: no sync."""
        ...

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` across the group and return the result (possibly `tensor` itself)."""
        ...

    def release(self) -> None:
        """Free buffers, handles and communicators. Idempotent."""
        ...


@runtime_checkable
class WritesElsewhere(Backend, Protocol):
    """A backend with the optional fourth verb, for out-of-place callers (the registered op):
    it can write the sum somewhere other than its input, saving the copy an out-of-place call
    otherwise makes first. Asked once, when a caller is built (`isinstance(b, WritesElsewhere)`),
    never per call."""

    def all_reduce_into(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the sum of `tensor` across the group into `out` and return `out`; `out` is a
        contiguous tensor of `tensor`'s dtype and size that `can_take` accepted too, and
        `tensor` is left as it was."""
        ...


ProbeFn = Callable[[CommContext], "str | None"]
CreateFn = Callable[..., Backend]
Gate = Callable[[torch.Tensor], "str | None"]  # can_take's checks, fixed at construction


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """How a family module registers one algorithm, and the one statement of its facts.

    `create(ctx, max_bytes, **params)` builds the backend; `knobs` maps each tunable parameter
    to its candidate values (the tuner searches these; the first value is the default; the
    values' type is the knob's). Every reader asks the spec: the backend's `can_take` is
    `gate()` made at construction, `--param`, the build and the constructors check knobs with
    `check_params` / `unknown_knob`, thresholds.json's validation reads `knobs` and
    `needs_buffer`, the exports `default_params`, the figures and the dispatcher `is_floor`.
    """

    name: str
    device: str  # "cpu" or "cuda"
    probe: ProbeFn
    create: CreateFn
    knobs: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    # bytes a tensor's size must be a multiple of
    alignment: int = 4
    # holds a buffer of max_bytes (False: reduces in the caller's tensor, costs no memory)
    needs_buffer: bool = True
    # the device's default that always works: the dispatcher's last resort, the gains' baseline
    is_floor: bool = False
    # bytes of the host's /dev/shm one instance maps, from (ranks on the host, max_bytes, its
    # knobs); None: it maps none. The launcher refuses what /dev/shm cannot hold before start.
    shared_bytes: Callable[[int, int, Mapping[str, Any]], int] | None = None

    def gate(self, max_bytes: int | None = None, device_index: int | None = None) -> Gate:
        """The backend's `can_take` checks from this spec (its device, dtypes, alignment), with
        the instance's buffer size and GPU; made once, when the backend is built."""
        return make_gate(
            dtypes=self.dtypes,
            device_type=self.device,
            alignment=self.alignment,
            max_bytes=max_bytes,
            device_index=device_index,
        )

    def default_params(self) -> dict[str, Any]:
        return {k: v[0] for k, v in self.knobs.items()}

    def unknown_knob(self, params: Mapping[str, Any]) -> str | None:
        """The reason for the first parameter that is not a knob of this spec, or None."""
        for key in params:
            if key not in self.knobs:
                known = ", ".join(self.knobs) or "none"
                return f"{self.name} has no knob {key!r} (knobs: {known})"
        return None

    def check_params(self, params: Mapping[str, Any]) -> str | None:
        """None if every param is a known knob with an accepted value, else the reason."""
        unknown = self.unknown_knob(params)
        if unknown:
            return unknown
        for key, value in params.items():
            if value not in self.knobs[key]:
                return f"{self.name}.{key}={value!r} not in {list(self.knobs[key])}"
        return None


def params_key(params: Mapping[str, Any]) -> str:
    """Canonical text of a knob setting (the identity of a configuration)."""
    return json.dumps(dict(sorted(params.items())), sort_keys=True)


def make_gate(
    *,
    dtypes: Sequence[torch.dtype],
    device_type: str,
    alignment: int,
    max_bytes: int | None,
    device_index: int | None = None,
) -> Gate:
    """The cheap checks every backend applies first, as vLLM's communicators do, fixed once
    (when the backend is built, from its spec: `BackendSpec.gate`): gate(tensor) -> None or
    the reason.

    Cheap means attribute reads only: `tensor.is_cuda` / `is_cpu`, `tensor.get_device()` and
    `tensor.nbytes` cost ~0.1 us each, where `tensor.device` builds a device object (~0.5 us)
    and the dispatcher's whole decision should stay under 1 us. `device_index`: the GPU a
    communicator serves (a tensor of another GPU is refused: never launch on it)."""
    dtypes = tuple(dtypes)
    on_cuda, on_cpu = device_type == "cuda", device_type == "cpu"
    names = ",".join(str(d).removeprefix("torch.") for d in dtypes)

    def gate(tensor: torch.Tensor) -> str | None:
        if not (
            tensor.is_cuda
            if on_cuda
            else tensor.is_cpu
            if on_cpu
            else tensor.device.type == device_type
        ):
            return f"tensor on {tensor.device.type}, backend needs {device_type}"
        if device_index is not None and tensor.get_device() != device_index:
            return f"tensor on cuda:{tensor.get_device()}, communicator on cuda:{device_index}"
        if tensor.dtype not in dtypes:
            return f"dtype {str(tensor.dtype).removeprefix('torch.')} not supported (takes {names})"
        if not tensor.is_contiguous():
            return "tensor is not contiguous"
        nbytes = tensor.nbytes
        if nbytes % alignment:
            return f"{nbytes} bytes is not a multiple of {alignment}"
        if max_bytes is not None and nbytes > max_bytes:
            return f"{nbytes} bytes exceeds max_size {max_bytes}"
        return None

    return gate


@contextlib.contextmanager
def scoped_env(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, leave) environment variables for the duration of a library's
    initialisation, which reads them (NCCL's, DeepSpeed's); restored after."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is not None:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
