"""`--format sglang-env`: the environment and server flags that make SGLang follow a table.

What SGLang lets an operator set without code (read from its current code; the facts below):

- custom all-reduce v2 (its CUDA default) tries, by size: one-shot push up to
  `SGLANG_FORCE_CUSTOM_ALL_REDUCE_V2_PUSH_SIZE_KB`, its own tuned one-shot pull / multicast
  bands, then two-shot pull up to `SGLANG_FORCE_CUSTOM_ALL_REDUCE_V2_PULL_SIZE_KB`; above that
  the call falls through. Both are KiB, apply to graph and eager alike, and are clipped to
  `SGLANG_CUSTOM_ALL_REDUCE_V2_MAX_SIZE_KB` (16 MiB by default);
- torch symmetric memory (`--enable-torch-symm-mem`, bfloat16 only) takes sizes below a fixed
  per-world-size bound, multimem at some world sizes and two-shot at the others: no variable;
- then NCCL (pynccl in graphs, torch.distributed eagerly); `--enable-symm-mem` puts NCCL on
  symmetric memory ahead of everything, for every size.

So a table exports when its rules are a leading run of the own custom kernels (one-shot before
two-shot), then at most a torch symmetric-memory range that ends where SGLang's does, then
NCCL. Anything else is refused in one line naming the rule, never dropped silently.
"""

from __future__ import annotations

from bench.sizes import format_size
from tuner.runtime.schema import Table, Thresholds
from tuner.table.formats.common import NCCL, ExportError, capability_of, pick_tables, spans

__all__ = ["format_sglang_env", "sglang_settings"]

MiB = 1 << 20
# python/sglang/srt/distributed/device_communicators/all_reduce_utils.py:
# TORCH_SYMM_MEM_ALL_REDUCE_MAX_SIZES {capability major: {world size: bytes}}, sizes below it
SYMM_MEM_MAX = {
    9: {2: 64 * MiB, 4: 64 * MiB, 6: 128 * MiB, 8: 128 * MiB},
    10: {2: 64 * MiB, 4: 64 * MiB, 6: 128 * MiB, 8: 128 * MiB},
}
# torch_symm_mem.py _WORLD_SIZES_MULTIMEM: multimem there, two-shot at other world sizes
SYMM_MEM_MULTIMEM = {9: (4, 6, 8), 10: (6, 8)}
# configs/custom_all_reduce_v2.py: the world sizes v2 has tables for, per capability major
V2_WORLD_SIZES = {9: (2, 3, 4, 5, 6, 7, 8), 10: (2, 3, 4, 5, 6, 7, 8, 16)}
V2_DEFAULT_MAX_KB = 16 * 1024
CUSTOM = ("custom_one_shot", "custom_two_shot")


def _major(table: Table) -> int:
    capability = capability_of(table.hardware_key)
    if table.hardware_key == capability:
        raise ExportError(
            f"sglang-env: {table.hardware_key} is not a GPU SGLang knows (a CPU "
            "node, or a model this exporter has no capability for)"
        )
    return int(capability.split(".")[0])


def _custom_prefix(table: Table, where: str) -> tuple[int, int | None, int]:
    """(rules in the leading custom run, end of its one-shot part or None, end of the run)."""
    count, push_end, end, two_shot_seen = 0, None, 0, False
    for _low, high, rule in spans(table):
        if rule.algorithm not in CUSTOM:
            break
        if high is None:
            raise ExportError(
                f"{where}: {rule.algorithm} for every size: SGLang's custom "
                "all-reduce needs an upper bound (its workspace)"
            )
        if rule.algorithm == "custom_two_shot":
            two_shot_seen = True
        elif two_shot_seen:
            raise ExportError(
                f"{where}: custom_one_shot after custom_two_shot: SGLang tries "
                "one-shot first, by size"
            )
        else:
            push_end = high
        count, end = count + 1, high
    return count, push_end, end


def sglang_settings(table: Table) -> tuple[dict[str, int], list[str], list[str]]:
    """(environment, server flags, notes) for one table; ExportError when it cannot be said."""
    where = f"sglang-env: {table.hardware_key} ws{table.world_size} {table.dtype} {table.mode}"
    major = _major(table)
    count, push_end, end = _custom_prefix(table, where)
    env: dict[str, int] = {}
    flags: list[str] = []
    notes: list[str] = []
    if count:
        if table.world_size not in V2_WORLD_SIZES.get(major, ()):
            raise ExportError(
                f"{where}: SGLang's custom all-reduce v2 has no world size "
                f"{table.world_size} on capability {major}.x"
            )
        env["SGLANG_OPT_USE_CUSTOM_ALL_REDUCE_V2"] = 1
        env["SGLANG_FORCE_CUSTOM_ALL_REDUCE_V2_PUSH_SIZE_KB"] = (push_end or 0) // 1024
        env["SGLANG_FORCE_CUSTOM_ALL_REDUCE_V2_PULL_SIZE_KB"] = end // 1024
        if end > V2_DEFAULT_MAX_KB * 1024:
            env["SGLANG_CUSTOM_ALL_REDUCE_V2_MAX_SIZE_KB"] = -(-end // 1024)
        if any(b % 1024 for b in (push_end or 0, end)):
            notes.append("bounds rounded down to whole KiB (SGLang's variables are KiB)")
        notes.append("SGLang's own one-shot pull and multicast bands stay inside the custom range")
    else:
        flags.append("--disable-custom-all-reduce")
    rest = list(spans(table))[count:]
    if rest and rest[0][2].algorithm.startswith("symm_mem_"):
        flags.append(_symm_mem_flag(table, rest.pop(0), major, where))
    for _low, _high, rule in rest:
        _fall_through(rule.algorithm, table, where, flags)
    if any(r.params for r in table.rules):
        notes.append(
            "knobs are not exported (SGLang sets its own blocks; NCCL's algorithm and "
            "protocol: --format nccl-tuner)"
        )
    return env, flags, notes


def _symm_mem_flag(table: Table, span, major: int, where: str) -> str:
    _low, high, rule = span
    bound = SYMM_MEM_MAX.get(major, {}).get(table.world_size)
    multimem = table.world_size in SYMM_MEM_MULTIMEM.get(major, ())
    flavour = "symm_mem_multimem" if multimem else "symm_mem_two_shot"
    if rule.algorithm == "symm_mem_one_shot":
        raise ExportError(f"{where}: symm_mem_one_shot: SGLang has no torch one-shot path")
    if table.dtype != "bfloat16" or bound is None:
        raise ExportError(
            f"{where}: {rule.algorithm}: SGLang's torch symmetric memory takes "
            f"bfloat16 at world sizes {sorted(SYMM_MEM_MAX.get(major, {}))} only"
        )
    if rule.algorithm != flavour or high is None or high + 1 != bound:
        raise ExportError(
            f"{where}: {rule.algorithm} up to {format_size(high) if high else 'inf'}"
            f": SGLang's torch symmetric memory is {flavour} below "
            f"{format_size(bound)} here, with no variable to move it"
        )
    return "--enable-torch-symm-mem"


def _fall_through(name: str, table: Table, where: str, flags: list[str]) -> None:
    if name in NCCL:
        return
    if name == "pynccl_symm" and len(table.rules) == 1:
        flags.append("--enable-symm-mem")
        return
    why = {
        "pynccl_symm": "--enable-symm-mem puts NCCL symmetric memory ahead of every size",
        "custom_one_shot": "custom all-reduce after another range: SGLang tries it first",
        "custom_two_shot": "custom all-reduce after another range: SGLang tries it first",
    }
    raise ExportError(
        f"{where}: {name}: " + why.get(name, "not one of SGLang's all-reduce paths in that place")
    )


def format_sglang_env(
    thresholds: Thresholds,
    source: str,
    dtype: str | None = None,
    mode: str | None = None,
    world_size: int | None = None,
) -> str:
    tables = pick_tables(thresholds, "sglang-env", dtype, mode, world_size)
    nodes = sorted({(t.hardware_key, t.world_size) for t in tables})
    if len(nodes) > 1:
        raise ExportError(
            "sglang-env: the variables are per deployment, and the file has "
            f"tables for {', '.join(f'{h} ws{w}' for h, w in nodes)}: pick one "
            "with --world-size"
        )
    settings = {t.mode: sglang_settings(t) for t in tables}
    if len({repr(s[:2]) for s in settings.values()}) > 1:
        raise ExportError(
            "sglang-env: the graph and eager tables differ, and SGLang's "
            "variables apply to both: pick one with --mode"
        )
    env, flags, notes = next(iter(settings.values()))
    (hardware_key, ws), modes = nodes[0], "/".join(sorted(settings))
    lines = [
        f"# tuner export --format sglang-env {source}",
        f"# {hardware_key} ws{ws} {tables[0].dtype} {modes}: SGLang's custom all-reduce v2,"
        " its torch symmetric memory, then NCCL",
    ]
    lines += [f"export {name}={value}" for name, value in env.items()]
    lines += [f"# server flags: {' '.join(flags)}"] if flags else []
    lines += [f"# note: {note}" for note in notes]
    return "\n".join(lines) + "\n"
