"""`bench kernels`: the own N-input reduction kernel against the device's copy bandwidth and
PyTorch's N-input reductions, on one GPU, measured side by side in one run.

Bytes counted for every reduction variant: N inputs read + 1 output written (the least any
implementation must move), whatever it really moves; the copy counts read + write. So each
figure is an effective bandwidth, and its ratio to the copy's says how close a variant comes
to moving its bytes at copy speed. Times are CUDA-event medians (`triton.testing.do_bench`,
which clears the L2 cache before every timed call). Our kernel's launch configuration is
searched at the largest size and the best one reused at the smaller sizes.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.dtypes import DTYPE_ALIASES, DTYPES
from bench.launch.flags import UsageError, UsageParser
from bench.launch.paths import writable_file, write_output
from bench.sizes import format_size, parse_size

__all__ = ["main", "CONFIGS", "profile_once"]

# (BLOCK elements per program, num_warps, eviction policy of the input loads)
CONFIGS: tuple[tuple[int, int, str], ...] = (
    (4096, 8, ""),
    (2048, 4, ""),
    (4096, 4, ""),
    (8192, 8, ""),
    (8192, 16, ""),
    (4096, 8, "evict_first"),
    (8192, 8, "evict_first"),
)
CSV_COLUMNS = (
    "n_inputs",
    "bytes",
    "dtype",
    "variant",
    "config",
    "time_us",
    "counted_bytes",
    "effective_tbps",
    "ratio_to_copy",
    "copy_tbps",
    "max_abs_err",
)
MIN_BYTES = 1 << 20


def main(argv: list[str]) -> int:
    """`bench kernels [--max-bytes 64M] [--inputs 2,4,8] [--dtype bfloat16] [--out CSV]`."""
    p = UsageParser(
        prog="bench kernels", description="Own reduction kernels vs copy bandwidth (one GPU)."
    )
    p.add_argument("--max-bytes", "-e", dest="max_bytes", default="64M")
    p.add_argument("--inputs", default="2,4,8", help="comma list of input counts")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None, help="write a CSV of the figures here")
    return _run(p.parse_args(argv))


def _parse_args(args) -> tuple[int, list[int], str, Path | None]:
    """(max_bytes, input counts, dtype name, csv path); UsageError naming the flag."""
    try:
        max_bytes = parse_size(args.max_bytes)
    except ValueError as exc:
        raise UsageError(f"--max-bytes: {exc}") from None
    try:
        inputs = [int(v) for v in str(args.inputs).split(",") if v.strip()]
    except ValueError:
        raise UsageError(
            f"--inputs: expected a comma list of integers 2..8, got {args.inputs!r}"
        ) from None
    if not inputs or any(not 2 <= n <= 8 for n in inputs):
        raise UsageError(f"--inputs: expected a comma list of integers 2..8, got {args.inputs!r}")
    dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: expected one of {', '.join(DTYPES)}, got {args.dtype!r}")
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    if max_bytes % (16 * itemsize) or max_bytes < MIN_BYTES:
        raise UsageError(
            f"--max-bytes: expected at least 1M and a multiple of 16 elements, "
            f"got {args.max_bytes!r}"
        )
    out = writable_file("--out", args.out) if args.out else None
    return max_bytes, inputs, dtype, out


def _sizes(max_bytes: int) -> list[int]:
    sizes, size = [], MIN_BYTES
    while size < max_bytes:
        sizes.append(size)
        size *= 4
    return sizes + [max_bytes]


def _time_us(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=60, return_mode="median")) * 1e3


def _torch_variants(xs: torch.Tensor, parts: list[torch.Tensor], out: torch.Tensor):
    def sum0():
        return xs.sum(0)

    def chained_add():
        torch.add(parts[0], parts[1], out=out)
        for x in parts[2:]:
            out.add_(x)
        return out

    def stack_sum():
        return torch.stack(parts).sum(0)

    return {"torch_sum0": sum0, "torch_add_": chained_add, "torch_stack_sum": stack_sum}


def _run(args) -> int:
    max_bytes, inputs, dtype_name, out_path = _parse_args(args)
    if not torch.cuda.is_available():
        raise UsageError("kernels: needs a CUDA device (none is visible here)")
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(1234)
    rows: list[dict] = []
    print(
        f"# bench kernels on {torch.cuda.get_device_name(device)}, {dtype_name}, "
        f"inputs {inputs}, sizes {format_size(MIN_BYTES)}..{format_size(max_bytes)}; "
        "bytes counted: N reads + 1 write (copy: read + write)",
        flush=True,
    )
    best_config: dict[int, tuple[int, int, str]] = {}
    for nbytes in reversed(_sizes(max_bytes)):
        copy_tbps = _copy_tbps(nbytes, DTYPES[dtype_name], device, gen)
        rows.append(
            _row(
                0,
                nbytes,
                dtype_name,
                "copy",
                "",
                2 * nbytes / copy_tbps / 1e6,
                2 * nbytes,
                copy_tbps,
                None,
            )
        )
        for n in inputs:
            rows += _reduction_rows(n, nbytes, dtype_name, device, gen, copy_tbps, best_config)
        torch.cuda.empty_cache()
    rows.sort(key=lambda r: (r["bytes"], r["n_inputs"]))
    _print_table(rows)
    if out_path is not None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        write_output("--out", out_path, text.getvalue())
        print(f"# wrote {out_path}")
    return 0


def _copy_tbps(nbytes: int, dtype: torch.dtype, device: torch.device, gen) -> float:
    count = nbytes // torch.empty((), dtype=dtype).element_size()
    src = torch.randn(count, device=device, generator=gen).to(dtype)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time_us(lambda: dst.copy_(src)) / 1e6


def _reduction_rows(
    n: int,
    nbytes: int,
    dtype_name: str,
    device: torch.device,
    gen,
    copy_tbps: float,
    best_config: dict,
) -> list[dict]:
    """Our kernel (every config at the first size seen, then the best and the default) and
    PyTorch's variants, N inputs of `nbytes` each."""
    from bench.kernels.reduce import reduce_n  # optional: triton

    dtype = DTYPES[dtype_name]
    count = nbytes // torch.empty((), dtype=dtype).element_size()
    xs = torch.randn(n, count, device=device, generator=gen).to(dtype)
    parts = list(xs.unbind(0))
    out = torch.empty(count, device=device, dtype=dtype)
    counted = (n + 1) * nbytes
    ref = xs.to(torch.float32).sum(0)
    configs = CONFIGS if n not in best_config else (best_config[n], CONFIGS[0])
    timed = []
    for block, warps, evict in dict.fromkeys(configs):
        out.fill_(float("nan"))
        reduce_n(parts, out, block=block, num_warps=warps, evict=evict)
        err = (out.to(torch.float32) - ref).abs().max().item()
        t_us = _time_us(
            lambda b=block, w=warps, e=evict: reduce_n(parts, out, block=b, num_warps=w, evict=e)
        )
        timed.append((t_us, (block, warps, evict), err))
    timed.sort(key=lambda item: item[0])
    best_config.setdefault(n, timed[0][1])
    rows = []
    for t_us, cfg, err in timed:
        variant = "triton_reduce_n" if cfg == timed[0][1] else "triton_reduce_n_alt"
        rows.append(
            _row(n, nbytes, dtype_name, variant, _cfg_text(cfg), t_us, counted, copy_tbps, err)
        )
    for name, fn in _torch_variants(xs, parts, out).items():
        result = fn()
        err = (result.to(torch.float32) - ref).abs().max().item()
        rows.append(_row(n, nbytes, dtype_name, name, "", _time_us(fn), counted, copy_tbps, err))
    return rows


def _cfg_text(cfg: tuple[int, int, str]) -> str:
    block, warps, evict = cfg
    return f"BLOCK={block} warps={warps}" + (f" {evict}" if evict else "")


def _row(
    n: int,
    nbytes: int,
    dtype: str,
    variant: str,
    config: str,
    t_us: float,
    counted: int,
    copy_tbps: float,
    err: float | None,
) -> dict:
    tbps = counted / t_us / 1e6
    return {
        "n_inputs": n,
        "bytes": nbytes,
        "dtype": dtype,
        "variant": variant,
        "config": config,
        "time_us": round(t_us, 3),
        "counted_bytes": counted,
        "effective_tbps": round(tbps, 4),
        "ratio_to_copy": round(tbps / copy_tbps, 4),
        "copy_tbps": round(copy_tbps, 4),
        "max_abs_err": err,
    }


def _print_table(rows: list[dict]) -> None:
    variants = ("triton_reduce_n", "torch_sum0", "torch_add_", "torch_stack_sum")
    print(
        f"{'bytes':>6} {'N':>2} {'copy TB/s':>9} "
        + " ".join(f"{v:>16}" for v in variants)
        + f" {'ours/best torch':>15}  config"
    )
    print(f"{'':>6} {'':>2} {'':>9} " + " ".join(f"{'TB/s (x copy)':>16}" for _ in variants))
    keyed = {(r["bytes"], r["n_inputs"], r["variant"]): r for r in rows}
    for nbytes, n in sorted({(r["bytes"], r["n_inputs"]) for r in rows if r["n_inputs"]}):
        cells = []
        for v in variants:
            r = keyed.get((nbytes, n, v))
            cells.append(f"{r['effective_tbps']:.2f} ({r['ratio_to_copy']:.2f})" if r else "-")
        ours = keyed[(nbytes, n, "triton_reduce_n")]
        best_torch = max(keyed[(nbytes, n, v)]["effective_tbps"] for v in variants[1:])
        copy = ours["copy_tbps"]
        print(
            f"{format_size(nbytes):>6} {n:>2} {copy:>9.2f} "
            + " ".join(f"{c:>16}" for c in cells)
            + f" {ours['effective_tbps'] / best_torch:>15.2f}  {ours['config']}",
            flush=True,
        )


def profile_once(
    n_inputs: int = 8,
    nbytes: int = 64 << 20,
    dtype_name: str = "bfloat16",
    block: int = 4096,
    num_warps: int = 8,
    evict: str = "",
) -> None:
    """One launch each of our kernel, xs.sum(0) and a copy, for Nsight Compute to read."""
    from bench.kernels.reduce import reduce_n  # optional: triton

    dtype = DTYPES[dtype_name]
    count = nbytes // torch.empty((), dtype=dtype).element_size()
    xs = torch.randn(n_inputs, count, device="cuda").to(dtype)
    parts = list(xs.unbind(0))
    out = torch.empty(count, device="cuda", dtype=dtype)
    for _ in range(2):
        reduce_n(parts, out, block=block, num_warps=num_warps, evict=evict)
        xs.sum(0)
        out.copy_(parts[0])
    torch.cuda.synchronize()
    print("profile_once done", file=sys.stderr)
