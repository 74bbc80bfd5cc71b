"""The dtypes the project measures and serves: one name -> `torch.dtype` map.

thresholds.json, results.csv and the command lines name dtypes by these strings; every module
that turns a name into a torch dtype (or back) imports this one."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "DTYPE_ALIASES", "DTYPE_NAMES", "ALL_DTYPES"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# what a command line may say instead
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float": "float32",
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
# every dtype above, in the map's order (a backend spec's default)
ALL_DTYPES: tuple[torch.dtype, ...] = tuple(DTYPES.values())
