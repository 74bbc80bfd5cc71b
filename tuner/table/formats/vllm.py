"""`--format vllm`: vLLM's per-capability / world-size max-size tables, for a vLLM patched by
hand (the plugin, tuner.engines.vllm_plugin, applies a thresholds.json itself).

vLLM routes an all-reduce by fixed order and one strict upper bound per communicator
(`bytes < max_size`): custom all-reduce first, then torch symmetric memory, then NCCL (see
tuner/table/vllm.py for the facts). Our rules are ordered ranges, so the export walks them from the
smallest size: the leading rules served by the custom kernels give
``CUSTOM_ALL_REDUCE_MAX_SIZES``, the rules right after them served by symmetric memory give
``SYMM_MEM_ALL_REDUCE_MAX_SIZES``; the bound is the last such rule's max_bytes + 1 (so every
size the rule covers is below it). What that shape cannot say (a middle range after NCCL, say)
is listed as a comment, never silently dropped. CPU tables export the same shape under
``SHM_ALL_REDUCE_MAX_SIZES`` keyed by hardware key (vLLM has no CPU table; same style).
"""

from __future__ import annotations

from bench.sizes import format_size
from tuner.runtime.schema import Table, Thresholds
from tuner.table.builder import config_label
from tuner.table.formats.common import capability_of

__all__ = ["FAMILIES", "vllm_dicts", "format_vllm"]

# dictionary name -> our algorithms it stands for, in vLLM's dispatch order
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("CUSTOM_ALL_REDUCE_MAX_SIZES", ("custom_one_shot", "custom_two_shot")),
    (
        "SYMM_MEM_ALL_REDUCE_MAX_SIZES",
        ("symm_mem_one_shot", "symm_mem_two_shot", "symm_mem_multimem"),
    ),
    ("SHM_ALL_REDUCE_MAX_SIZES", ("shm_one_shot", "shm_two_shot")),
)
FLOORS = ("nccl", "pynccl", "pynccl_symm", "gloo")


def _bound(table: Table, index: int) -> int:
    rule = table.rules[index]
    top = rule.max_bytes if rule.max_bytes is not None else table.max_size.get(rule.algorithm)
    return (top or 0) + 1


def _walk(table: Table) -> tuple[dict[str, int], list[str]]:
    """{dictionary name: bound} and what the vLLM shape cannot express."""
    bounds: dict[str, int] = {}
    index = 0
    for name, members in FAMILIES:
        last = None
        while index < len(table.rules) and table.rules[index].algorithm in members:
            last = index
            index += 1
        if last is not None:
            bounds[name] = _bound(table, last)
    notes = []
    rest = table.rules[index:]
    low = table.rules[index - 1].max_bytes if index else 0
    for rule in rest:
        high = "inf" if rule.max_bytes is None else format_size(rule.max_bytes)
        if rule.algorithm not in FLOORS:  # after the families everything goes to NCCL
            notes.append(
                f"not expressible: ({format_size(low) if low else '0'} .. {high}] "
                f"{rule.algorithm} (vLLM's order: custom, symm mem, then NCCL)"
            )
        low = rule.max_bytes
    for rule in table.rules:
        label = config_label(rule.algorithm, rule.params)
        note = f"knobs not exported (vLLM's tables hold sizes only): {label}"
        if label != rule.algorithm and note not in notes:
            notes.append(note)
    return bounds, notes


def vllm_dicts(
    thresholds: Thresholds,
    dtype: str | None = None,
    mode: str | None = None,
    capability: str | None = None,
):
    """({dictionary: {capability: {world_size: bytes}}}, notes, (dtype, mode) used)."""
    pairs = sorted({(t.dtype, t.mode) for t in thresholds.tables})
    if not pairs:
        return {}, ["no tables in the file"], (dtype, mode)
    want = (dtype or "bfloat16", mode or "graph")
    if want not in pairs:
        fallback = [
            p for p in pairs if (dtype is None or p[0] == dtype) and (mode is None or p[1] == mode)
        ]
        if not fallback:
            return (
                {},
                [
                    f"no table for dtype {dtype or 'any'}, mode {mode or 'any'} "
                    f"(the file has {', '.join(f'{d}/{m}' for d, m in pairs)})"
                ],
                want,
            )
        want = fallback[0]
    out: dict[str, dict[str, dict[int, int]]] = {}
    notes: list[str] = []
    for table in sorted(thresholds.tables, key=lambda t: (t.hardware_key, t.world_size)):
        if (table.dtype, table.mode) != want:
            continue
        key = capability or capability_of(table.hardware_key)
        bounds, table_notes = _walk(table)
        for name, value in bounds.items():
            out.setdefault(name, {}).setdefault(key, {})[table.world_size] = value
        notes += [f"{table.hardware_key} ws{table.world_size}: {n}" for n in table_notes]
    return out, notes, want


def _size_expr(nbytes: int) -> str:
    extra = ""
    if nbytes % 1024 == 1 and nbytes > 1:
        nbytes, extra = nbytes - 1, " + 1"
    if nbytes % (1 << 20) == 0:
        return f"{nbytes >> 20} * MiB{extra}"
    if nbytes % 1024 == 0:
        return f"{nbytes >> 10} * KiB{extra}"
    return f"{nbytes}{extra}"


def format_vllm(
    thresholds: Thresholds,
    source: str,
    dtype: str | None = None,
    mode: str | None = None,
    capability: str | None = None,
) -> str:
    dicts, notes, (used_dtype, used_mode) = vllm_dicts(thresholds, dtype, mode, capability)
    lines = [
        f"# tuner export --format vllm {source}  (tables for {used_dtype}, {used_mode})",
        "# vLLM style: a communicator takes an all-reduce when bytes < max size; order",
        "# custom all-reduce, then symmetric memory, then NCCL. '+ 1' keeps the table's",
        "# own bound (its rules include max_bytes).",
        "KiB = 1024",
        "MiB = 1024 * 1024",
        "",
    ]
    for name, _members in FAMILIES:
        if name not in dicts:
            continue
        lines.append(f"{name} = {{")
        for key, per_ws in sorted(dicts[name].items()):
            lines.append(f"    {key!r}: {{")
            for ws, value in sorted(per_ws.items()):
                lines.append(f"        {ws}: {_size_expr(value)},  # {format_size(value - 1)}")
            lines.append("    },")
        lines += ["}", ""]
    if not dicts:
        lines += ["# no rule of these tables maps onto vLLM's communicators", ""]
    lines += [f"# {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"
