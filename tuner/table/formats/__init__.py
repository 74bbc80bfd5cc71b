"""`tuner export --format F`: a thresholds.json in the form another engine reads.

Each format is a function (thresholds, source, dtype, mode, world_size) -> text; a table a
format cannot express is refused with `ExportError`, one line naming the rule and why."""

from __future__ import annotations

from collections.abc import Callable

from tuner.table.formats.common import ExportError
from tuner.table.formats.nccl import format_nccl_env, format_nccl_tuner
from tuner.table.formats.sglang import format_sglang_env
from tuner.table.formats.vllm import format_vllm

__all__ = ["FORMATS", "ExportError", "export"]

FORMATS: dict[str, Callable[..., str]] = {
    "vllm": format_vllm,
    "sglang-env": format_sglang_env,
    "nccl-tuner": format_nccl_tuner,
    "nccl-env": format_nccl_env,
}


def export(
    thresholds,
    fmt: str,
    source: str,
    dtype: str | None = None,
    mode: str | None = None,
    world_size: int | None = None,
    capability: str | None = None,
) -> str:
    if fmt == "vllm":
        return format_vllm(thresholds, source, dtype, mode, capability)
    return FORMATS[fmt](thresholds, source, dtype, mode, world_size)
