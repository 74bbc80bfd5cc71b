"""`bench sweep` arguments: one table of flags, parsed and checked against each other
before any rank starts. Bad input raises `UsageError` with one line naming the flag.
`UsageError` is defined in `bench.launch.flags`, with the other command-line plumbing."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch

from bench import backends as registry
from bench.analysis.results import completed_points, read_meta
from bench.dtypes import DTYPE_ALIASES, DTYPES  # re-exported: DTYPES is imported from here
from bench.launch import capacity
from bench.launch.capacity import RANKS_PER_CORE
from bench.launch.flags import UsageError, UsageParser, int_flag, seconds_flag
from bench.launch.paths import writable_dir
from bench.sizes import parse_size, size_range

__all__ = [
    "SweepConfig",
    "UsageError",
    "add_sweep_arguments",
    "config_from_args",
    "parse_sweep_config",
    "layout_from_args",
    "resolve_device",
    "DTYPES",
    "DTYPE_ALIASES",
    "RUNS_ROOT",
    "runnable_backends",
    "left_out_line",
]

MODES = ("eager", "graph")
# rounds of side-by-side blocks per point (bench.run.rounds says how 5 was chosen)
DEFAULT_ROUNDS = 5
# a block of a fast point runs at least this long (bench.run.point.PointRunner says why)
DEFAULT_BLOCK_MS = 2.0
# a run without --out goes to RUNS_ROOT/<hardware_key>/<run_id>: apart from the committed
# reference runs under results/ (runs/ is ignored by git)
RUNS_ROOT = "runs"
LAUNCHERS = ("torchrun", "mpirun")  # mpirun: for the `mpi` peer (bench.launch.mpirun)


@dataclasses.dataclass
class SweepConfig:
    world_size: int
    backends: list[str]
    sizes: list[int]
    dtypes: list[str]
    modes: list[str]
    device: str  # "cpu" or "cuda" (auto resolved)
    iters: int = 20  # timed iterations per point, spread over the rounds
    warmup: int = 5  # warm-up calls per point, spread over the rounds (at least one a round)
    rounds: int = DEFAULT_ROUNDS
    block_ms: float = DEFAULT_BLOCK_MS  # the least timed work per block (fast points)
    timeout_s: float = 300.0
    out: str | None = None
    resume: bool = False
    graph_calls: int = 10
    l2_flush: bool = False
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    run_id: str | None = None
    params: dict = dataclasses.field(default_factory=dict)  # backend -> knob values
    quiet: bool = False
    launcher: str = "torchrun"
    # backends the default (no --backends) left out as unable to run here: name -> reason
    left_out: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SweepConfig:
        return cls(**data)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's flags, nccl-tests' short forms where it has them. Values stay strings
    here; `config_from_args` checks them so that every error names its flag."""
    p.add_argument(
        "--world-size", "-g", dest="world_size", default="1", help="ranks in total (over all nodes)"
    )
    p.add_argument(
        "--backends",
        default=None,
        help="a comma list of backend names, or all (default: those this machine can run)",
    )
    p.add_argument("-b", "--min-bytes", dest="min_bytes", default="1K", help="smallest size")
    p.add_argument("-e", "--max-bytes", dest="max_bytes", default="64M", help="largest size")
    p.add_argument("-f", "--factor", default="2", help="size step factor")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma list: " + ",".join(DTYPES))
    p.add_argument(
        "--modes", default=None, help="eager,graph (default: eager on CPU, both on CUDA)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "-n", "--iters", default="20", help="timed iterations per point, spread over the rounds"
    )
    p.add_argument(
        "-w", "--warmup", default="5", help="warm-up calls per point (at least one a round)"
    )
    p.add_argument(
        "--block-ms",
        dest="block_ms",
        default=str(DEFAULT_BLOCK_MS),
        help="the least timed work of one backend's block in a round, in milliseconds: a fast "
        "point times more iterations (at most 200), a slow one stays at its share of --iters",
    )
    p.add_argument(
        "--rounds",
        default=str(DEFAULT_ROUNDS),
        help="rounds: in each, every backend measures each size once, side by side, in a "
        "rotating order; a point's latency is the median over rounds",
    )
    p.add_argument(
        "--timeout",
        default="300",
        help="seconds without progress before the sweep is ended (a dead or hung rank)",
    )
    p.add_argument(
        "--out", default=None, help=f"run directory (default {RUNS_ROOT}/<hardware_key>/<run_id>)"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR, measuring only missing points",
    )
    p.add_argument("--graph-calls", default="10", help="all-reduces captured per CUDA graph")
    p.add_argument(
        "--l2-flush", action="store_true", help="evict L2 between timed iterations (CUDA)"
    )
    p.add_argument("--nnodes", default="1", help="nodes (torchrun's c10d rendezvous)")
    p.add_argument("--node-rank", dest="node_rank", default="0")
    p.add_argument("--master-addr", dest="master_addr", default="127.0.0.1")
    p.add_argument("--master-port", dest="master_port", default=None)
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="BACKEND.KNOB=VALUE",
        help="set a backend knob, e.g. shm_two_shot.chunk_bytes=262144",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument(
        "--oversubscribe",
        action="store_true",
        help=f"allow more than {RANKS_PER_CORE} ranks per core on a node",
    )
    p.add_argument(
        "--launcher",
        default="torchrun",
        help="torchrun, or mpirun (ranks an MPI library can join: the mpi peer)",
    )


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device: expected auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here (try --device cpu)")
    return device


def _parse_param(text: str, known: list[str]) -> tuple[str, str, object]:
    head, sep, raw = text.partition("=")
    backend, dot, knob = head.partition(".")
    if not sep or not dot or not knob:
        raise UsageError(f"--param: expected BACKEND.KNOB=VALUE, got {text!r}")
    if backend not in known:
        raise UsageError(f"--param: unknown backend {backend!r} (known: {', '.join(known)})")
    value: object = raw
    for cast in (int, float):
        try:
            value = cast(raw)
            break
        except ValueError:
            continue
    return backend, knob, value


def parse_sweep_config(argv: list[str] | None = None) -> SweepConfig:
    """`bench sweep` flags (also `python -m bench.run.worker`'s) -> a checked SweepConfig."""
    parser = UsageParser(prog="bench sweep")
    add_sweep_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """Check every flag and their combination; raise UsageError naming the first bad one."""

    world_size, nnodes, node_rank, master_port = layout_from_args(args)
    known = registry.known_names()
    if args.backends is not None:
        backends = _backends(args.backends, known)
    sizes = _sizes(args)
    dtypes = [DTYPE_ALIASES.get(d, d) for d in _split(args.dtypes)]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise UsageError(
            f"--dtypes: unknown {','.join(bad) or '(empty)'} (accepted: {', '.join(DTYPES)})"
        )
    device = resolve_device(args.device)
    modes = (
        _split(args.modes)
        if args.modes
        else (["eager", "graph"] if device == "cuda" else ["eager"])
    )
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UsageError(f"--modes: unknown {','.join(bad) or '(empty)'} (accepted: eager, graph)")
    iters = int_flag("--iters", args.iters)
    warmup = int_flag("--warmup", args.warmup, minimum=0)
    rounds = int_flag("--rounds", args.rounds)
    block_ms = _block_ms(args.block_ms)
    graph_calls = int_flag("--graph-calls", args.graph_calls)
    timeout_s = seconds_flag("--timeout", args.timeout)
    params = _params(args.param, known)
    local_ranks = world_size // nnodes
    _fits(args, sizes, local_ranks, device)
    out, resume = _run_dir(args, node_rank)
    launcher = _launcher(args.launcher, nnodes)
    left_out: dict[str, str] = {}
    if args.backends is None:
        backends, left_out = runnable_backends(device, world_size, nnodes, launcher)
    if device == "cpu":
        too_big = capacity.shared_memory_reasons(backends, local_ranks, max(sizes), params)
        if too_big and args.backends is not None:
            name, why = next(iter(too_big.items()))
            raise UsageError(f"--backends: {name} {why}")
        backends = [b for b in backends if b not in too_big]
        left_out.update(too_big)
    return SweepConfig(
        world_size=world_size,
        backends=backends,
        sizes=sizes,
        dtypes=dtypes,
        modes=modes,
        device=device,
        iters=iters,
        warmup=warmup,
        rounds=rounds,
        block_ms=block_ms,
        timeout_s=timeout_s,
        out=out,
        resume=resume,
        graph_calls=graph_calls,
        l2_flush=bool(args.l2_flush),
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=args.master_addr,
        master_port=master_port,
        params=params,
        quiet=bool(args.quiet),
        launcher=launcher,
        left_out=left_out,
    )


def _block_ms(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = -1.0
    if not 0.0 <= value <= 1000.0:  # NaN included
        raise UsageError(f"--block-ms: expected milliseconds in 0..1000, got {text!r}")
    return value


def layout_from_args(args: argparse.Namespace) -> tuple[int, int, int, int | None]:
    """(world size, nnodes, node rank, master port or None) from the flags of that name,
    checked against each other (`bench sweep` and `bench doctor` share them)."""
    world_size = int_flag("--world-size", args.world_size)
    nnodes = int_flag("--nnodes", args.nnodes)
    node_rank = int_flag("--node-rank", args.node_rank, minimum=0)
    if node_rank >= nnodes:
        raise UsageError(
            f"--node-rank: expected 0..{nnodes - 1} for --nnodes {nnodes}, got {node_rank}"
        )
    if world_size % nnodes:
        raise UsageError(
            f"--world-size: {world_size} ranks do not split evenly over --nnodes {nnodes}"
        )
    master_port = None
    if args.master_port is not None:
        master_port = int_flag("--master-port", args.master_port, 1, 65535)
    if nnodes > 1 and master_port is None:
        raise UsageError("--master-port: required with --nnodes > 1")
    return world_size, nnodes, node_rank, master_port


def _launcher(name: str, nnodes: int) -> str:
    if name not in LAUNCHERS:
        raise UsageError(f"--launcher: expected {' or '.join(LAUNCHERS)}, got {name!r}")
    if name == "mpirun" and nnodes > 1:
        raise UsageError(
            "--launcher mpirun: one node only; across nodes start `mpirun -H ... "
            "python -m bench.run.worker` yourself"
        )
    return name


def _backends(text: str, known: list[str]) -> list[str]:
    if text.strip() == "all":
        return known
    backends = _split(text)
    unknown = [b for b in backends if b not in known]
    if unknown or not backends:
        raise UsageError(
            f"--backends: unknown {','.join(unknown) or '(empty)'} (known: all, {', '.join(known)})"
        )
    return backends


def runnable_backends(
    device: str, world_size: int, nnodes: int, launcher: str
) -> tuple[list[str], dict[str, str]]:
    """(the backends this machine can run, {every other known name: why not}), asked of each
    backend's probe before any rank starts: a stand-in context of this node's share of the
    ranks, no communicator built. A reason that only a rank can see still skips its rows."""

    ctx = registry.CommContext(
        rank=0,
        world_size=world_size,
        local_world_size=world_size // nnodes,
        local_rank=0,
        nnodes=nnodes,
        device=torch.device(device),
        cpu_group=None,
        same_host=nnodes == 1,
        visible_gpus=torch.cuda.device_count() if device == "cuda" else 0,
        extra={"launcher": launcher},
    )
    reasons = registry.reasons_here(ctx)
    runnable = [name for name, reason in reasons.items() if reason is None]
    if not runnable:  # nothing can run: measure the floor, whose skipped rows say why
        runnable = [registry.floor_name(device)]
    return runnable, {n: r for n, r in reasons.items() if r is not None and n not in runnable}


def left_out_line(left_out: dict[str, str]) -> str:
    """The backends the default sweep left out, grouped by reason, in one line."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in left_out.items():
        by_reason.setdefault(reason, []).append(name)
    parts = [f"{_compact(names)}: {reason}" for reason, names in by_reason.items()]
    return (
        f"bench: {len(left_out)} more backends cannot run here ({'; '.join(parts)}); "
        "`--backends all` records them as skipped rows, `bench doctor` says more"
    )


def _compact(names: list[str]) -> str:
    """nccl, pynccl*, symm_mem_*: names that share their first word, written once."""
    families: dict[str, list[str]] = {}
    for name in names:
        families.setdefault(name.split("_")[0], []).append(name)
    out = []
    for members in families.values():
        out.append(members[0] if len(members) == 1 else os.path.commonprefix(members) + "*")
    return ", ".join(out)


def _sizes(args: argparse.Namespace) -> list[int]:
    try:
        min_bytes = parse_size(args.min_bytes)
    except ValueError as exc:
        raise UsageError(f"--min-bytes: {exc}") from None
    try:
        max_bytes = parse_size(args.max_bytes)
    except ValueError as exc:
        raise UsageError(f"--max-bytes: {exc}") from None
    factor = int_flag("--factor", args.factor, minimum=2)
    if min_bytes > max_bytes:
        raise UsageError(
            f"--min-bytes: {args.min_bytes} is larger than --max-bytes {args.max_bytes}"
        )
    return size_range(min_bytes, max_bytes, factor)


def _fits(args: argparse.Namespace, sizes: list[int], local_ranks: int, device: str) -> None:
    """What this node cannot hold (memory, ranks per core), refused before any rank starts."""
    reason = capacity.memory_reason(max(sizes), local_ranks, device) or capacity.ranks_reason(
        local_ranks, bool(getattr(args, "oversubscribe", False))
    )
    if reason:
        raise UsageError(reason)


def _params(texts: list[str], known: list[str]) -> dict[str, dict]:
    """--param BACKEND.KNOB=VALUE flags -> {backend: {knob: value}}, checked by each spec."""

    params: dict[str, dict] = {}
    for text in texts:
        backend, knob, value = _parse_param(text, known)
        params.setdefault(backend, {})[knob] = value
    for backend, values in params.items():
        try:
            spec = registry.get_spec(backend)
        except KeyError:
            continue  # not importable here; the sweep records the reason
        reason = spec.check_params(values)
        if reason:
            raise UsageError(f"--param: {reason}")
    return params


def _run_dir(args: argparse.Namespace, node_rank: int) -> tuple[str | None, bool]:
    """(--out or --resume directory, resume?) once it is known to be usable: written into by
    doing it, on node 0 only (the other nodes write nothing there)."""
    out, resume = args.out, False
    if args.resume is not None:
        if args.out is not None and Path(args.out) != Path(args.resume):
            raise UsageError("--resume: give either --resume DIR or --out DIR, not both")
        resume_dir = Path(args.resume)
        if not (resume_dir / "results.csv").is_file():
            raise UsageError(f"--resume: {resume_dir} has no results.csv to resume")
        out, resume = str(resume_dir), True
    if out is not None:
        flag = "--resume" if resume else "--out"
        _check_run_dir(Path(out), flag)
        if (
            not resume
            and node_rank == 0
            and (Path(out) / "results.csv").is_file()
            and (Path(out) / "results.csv").stat().st_size > 0
        ):
            raise UsageError(
                f"--out: {out} already holds a run (results.csv); continue it "
                f"with --resume {out}, or pick another --out"
            )
        if node_rank == 0:
            writable_dir(flag, out)
    return out, resume


def _check_run_dir(path: Path, flag: str) -> None:
    """A run directory we would append to must hold this project's table and meta.json."""

    if not path.is_dir():
        return
    try:
        completed_points(path)
        read_meta(path)
    except (ValueError, KeyError, TypeError, OSError) as exc:  # SchemaError, JSON, bad cells
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{flag}: {path} is not a readable run directory ({detail})") from None
