"""vLLM's CudaCommunicator following the table: agreement, sizing and routing.

`install(module, current)` runs when vLLM imports its cuda_communicator module; it wraps
`CudaCommunicator.__init__` and `.all_reduce` once (the originals do the work), and the
wrappers read this process's `Setup` through `current()`.

Constructing the tensor-parallel group's communicator (unique_name "tp:..."; every other
group is vLLM's alone), before vLLM's own constructor builds its communicators:

1. one all_gather over the group's CPU group: each rank's table digest and file, and the
   first rank's hardware key. Ranks that loaded different tables (or could not load one)
   would pick different communicators for one call and hang: every rank refuses (strict) or
   keeps vLLM's own choice, each with one line.
2. the tables of that hardware key and the group's world size; none: one warning (first
   rank) naming what was looked for, and vLLM's own choice stays.
3. sizing: vLLM's max-size entries for this capability and world size are grown in place
   (`bench.vllm.paths.grow_max_sizes`) so the buffers vLLM builds next hold what the table
   routes to them; above CustomAllreduce's 8 MiB default, max_size is passed to it for
   this construction (CudaCommunicator passes none, so vLLM's own clamp would cap it).

Then vLLM's constructor runs and the routes are attached.

Each `all_reduce(x)`: mode graph while the current stream captures a CUDA graph, else eager;
the rule of the (dtype, mode) table for x's byte size (cached per size) names a vLLM path;
if that path's communicator takes x (its own gate), it reduces; else vLLM's own all_reduce
runs, in vLLM's order. A (dtype, mode) without a table is vLLM's alone. Decisions are local
and depend only on the agreed table and x's shape: every rank picks alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable

import torch
import torch.distributed as dist

from bench.dtypes import DTYPES
from bench.sizes import format_size
from bench.vllm.paths import (
    CUSTOM_AR_DEFAULT_MAX_SIZE,
    PATHS,
    Path,
    bind,
    custom_ar_max_size,
    device_capability,
    grow_max_sizes,
    run,
    symm_mem_max_size,
)
from tuner.engines.vllm_names import first_unmapped, vllm_path
from tuner.engines.vllm_setup import ENV_THRESHOLDS, Setup, logger, node_hardware_key, refuse
from tuner.runtime.route import SizeRoute
from tuner.runtime.schema import Table

__all__ = ["Routes", "install", "prepare", "custom_ar_built_with", "ROUTES_ATTRIBUTE"]

ROUTES_ATTRIBUTE = "allreduce_autotune_routes"  # on each CudaCommunicator: Routes or None
_MARK = "__allreduce_autotune__"
_capturing = torch.cuda.is_current_stream_capturing


class Routes:
    """Per (dtype, mode) of the agreed tables: the rule bounds and each rule's vLLM path."""

    def __init__(self, tables: list[Table]) -> None:
        self.tables = tuple(tables)
        # per (dtype, mode): each rule's path, by size (vLLM's own gate is the path's)
        self.by_key: dict[tuple[torch.dtype, str], SizeRoute[Path]] = {}
        for table in tables:
            bounds = [r.max_bytes for r in table.rules if r.max_bytes is not None]
            paths = tuple(PATHS[vllm_path(r.algorithm)[0]] for r in table.rules)
            self.by_key[(DTYPES[table.dtype], table.mode)] = SizeRoute(
                bounds, paths, source=f"{table.dtype} {table.mode}"
            )

    def choose(self, nbytes: int, dtype: torch.dtype, mode: str) -> Path | None:
        """The path the table names for this call; None: no table for (dtype, mode)."""
        route = self.by_key.get((dtype, mode))
        return None if route is None else route[nbytes]

    def all_reduce(self, comms, tensor: torch.Tensor) -> torch.Tensor | None:
        """The sum through the table's path; None: vLLM's own order takes it."""
        mode = "graph" if tensor.is_cuda and _capturing() else "eager"
        path = self.choose(tensor.nbytes, tensor.dtype, mode)
        return None if path is None else run(path, comms, tensor)

    def paths(self) -> list[Path]:
        return list({p.name: p for r in self.by_key.values() for p in r.values}.values())

    def describe(self) -> str:
        parts = []
        for table in self.tables:
            spans = [
                f"<={format_size(r.max_bytes)} {vllm_path(r.algorithm)[0]}"
                if r.max_bytes is not None
                else f"rest {vllm_path(r.algorithm)[0]}"
                for r in table.rules
            ]
            parts.append(f"{table.dtype} {table.mode}: {', '.join(spans)}")
        return "; ".join(parts)


@dataclasses.dataclass
class Prepared:
    """What the pre-construction step decided for one communicator."""

    routes: Routes
    custom_ar_max_size: int | None  # passed to CustomAllreduce (None: vLLM's default)
    notes: list[str]
    hardware_key: str
    rank: int
    unique_name: str
    source: str

    def announce(self, comm) -> None:
        """One line on the group's first rank: what vLLM now follows, what it cannot."""
        if self.rank != 0:
            return
        missing = [
            p.name
            for p in self.routes.paths()
            if getattr(comm, p.communicator, None) is None
            or getattr(getattr(comm, p.communicator), "disabled", False)
        ]
        ignored = sorted({r.algorithm for t in self.routes.tables for r in t.rules if r.params})
        text = (
            f"allreduce-autotune: {self.unique_name} all_reduce follows {self.source} "
            f"({self.hardware_key}, world_size {comm.world_size}): "
            f"{self.routes.describe()}"
        )
        text += "".join(f"; {note}" for note in self.notes)
        if ignored:
            text += f"; params of {', '.join(ignored)} not applied (vLLM's kernels take none)"
        if missing:
            text += f"; not available here, their sizes go vLLM's own way: {', '.join(missing)}"
        (logger.warning if missing else logger.info)(text)


def _agree(gathered: list[tuple], setup: Setup, unique_name: str) -> bool:
    """True when every rank loaded the same tables; else one line on each rank (refuse)."""
    if len({digest for digest, _, _ in gathered}) == 1:
        return True
    ranks: dict[tuple[str, str], list[str]] = {}
    for rank, (digest, path, _) in enumerate(gathered):
        ranks.setdefault((digest, path), []).append(str(rank))
    listing = "; ".join(
        f"rank {','.join(r)}: {path} ({digest})" for (digest, path), r in ranks.items()
    )
    refuse(
        f"{ENV_THRESHOLDS}: the ranks of {unique_name} loaded different tables ({listing}); "
        "every rank must load the same file",
        setup.strict,
    )
    return False


def _needed(tables: list[Table]) -> dict[str, int]:
    """Per vLLM communicator, the largest size the tables route to it."""
    need: dict[str, int] = {}
    for table in tables:
        for rule in table.rules:
            communicator = PATHS[vllm_path(rule.algorithm)[0]].communicator
            largest = rule.max_bytes or table.max_size.get(rule.algorithm)
            if largest:
                need[communicator] = max(need.get(communicator, 0), largest)
    return need


def _sizes(tables: list[Table], world_size: int) -> tuple[list[str], int | None]:
    """Grow vLLM's max-size entries for the tables; (notes, CustomAllreduce max_size)."""
    need = _needed(tables)
    custom = custom_ar_max_size(need["ca_comm"]) if "ca_comm" in need else None
    symm = symm_mem_max_size(need["symm_mem_comm"]) if "symm_mem_comm" in need else None
    inject = custom if custom and custom > CUSTOM_AR_DEFAULT_MAX_SIZE else None
    if custom is None and symm is None:
        return [], None
    capability = device_capability()
    if capability is None:
        return ["device capability unknown: vLLM's max-size tables left as they are"], inject
    notes = grow_max_sizes(capability, world_size, custom_ar=custom, symm_mem=symm)
    if inject:
        notes.append(f"CustomAllreduce max_size {inject} (above its 8 MiB default)")
    return notes, inject


def prepare(setup: Setup | None, cpu_group, unique_name: str) -> Prepared | None:
    """Steps 1-3 of the module docstring (collective over `cpu_group` for a TP group)."""
    if setup is None or cpu_group is None or str(unique_name).split(":")[0] != "tp":
        return None
    world_size = dist.get_world_size(cpu_group)
    if world_size < 2:
        return None
    rank = dist.get_rank(cpu_group)
    mine = (setup.digest, setup.path, node_hardware_key(setup) if rank == 0 else None)
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, mine, group=cpu_group)
    if not _agree(gathered, setup, unique_name) or setup.thresholds is None:
        return None
    key = gathered[0][2]
    found = setup.thresholds.tables_for(key, world_size)
    if not found:
        if rank == 0:
            logger.warning(
                "allreduce-autotune: %s; vLLM keeps its own all-reduce choice",
                setup.thresholds.no_table(key, world_size, setup.path),
            )
        return None
    unmapped = first_unmapped(found, skip_cpu=False)
    if unmapped:
        refuse(f"{ENV_THRESHOLDS}: {setup.path}: {unmapped}", setup.strict)
        return None
    tables = [t for _, t in found]
    notes, inject = _sizes(tables, world_size)
    return Prepared(Routes(tables), inject, notes, key, rank, unique_name, setup.path)


def _warm_up_device_group(comm, routes: Routes) -> None:
    """The table's `nccl` path reduces on the device group: one small all-reduce now, on
    every rank alike (same routes), so its communicator exists before any graph capture."""
    group = getattr(comm, "device_group", None)
    if group is not None and any(p.name == "nccl" for p in routes.paths()):
        dist.all_reduce(torch.zeros(1, device=comm.device), group=group)


@contextlib.contextmanager
def custom_ar_built_with(size: int | None):
    """CustomAllreduce built with max_size=`size` inside the block (None: untouched)."""
    if size is None:
        yield
        return
    from vllm.distributed.device_communicators.custom_all_reduce import CustomAllreduce

    init = CustomAllreduce.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def sized(self, *args, **kwargs):
        if "max_size" not in signature.bind(self, *args, **kwargs).arguments:
            kwargs["max_size"] = size  # the caller left vLLM's default
        init(self, *args, **kwargs)

    CustomAllreduce.__init__ = sized
    try:
        yield
    finally:
        CustomAllreduce.__init__ = init


def install(module, current: Callable[[], Setup | None]) -> None:
    """Wrap `module.CudaCommunicator` (once per process)."""
    cls = module.CudaCommunicator
    if getattr(cls.all_reduce, _MARK, False):
        return
    init, all_reduce = cls.__init__, cls.all_reduce
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        prepared = prepare(current(), arguments.get("cpu_group"), arguments.get("unique_name", ""))
        setattr(self, ROUTES_ATTRIBUTE, None)
        with custom_ar_built_with(prepared.custom_ar_max_size if prepared else None):
            init(self, *args, **kwargs)
        if prepared is not None:
            bind(prepared.routes.paths(), self)  # each path's algorithm chosen now, not per call
            setattr(self, ROUTES_ATTRIBUTE, prepared.routes)
            _warm_up_device_group(self, prepared.routes)
            prepared.announce(self)

    @functools.wraps(all_reduce)
    def routed_all_reduce(self, input_):
        routes = getattr(self, ROUTES_ATTRIBUTE, None)
        if routes is not None:
            out = routes.all_reduce(self, input_)
            if out is not None:
                return out
        return all_reduce(self, input_)

    setattr(routed_all_reduce, _MARK, True)
    cls.__init__, cls.all_reduce = __init__, routed_all_reduce
