"""vLLM's static all-reduce choice, re-enacted on our results (for "gain over vLLM's tables").

The facts below are vLLM's, read from vllm-project/vllm (numbers and conditions only):

- ``vllm/distributed/device_communicators/all_reduce_utils.py``: the max-size tables, keyed by
  CUDA capability string and world size (values in bytes).
- ``vllm/distributed/device_communicators/cuda_communicator.py`` (``CudaCommunicator.all_reduce``,
  the version with ``qr_comm`` / ``ca_comm`` / ``symm_mem_comm``): tries quick all-reduce (ROCm
  only), then the custom all-reduce, then torch symmetric memory, then pynccl.
- ``custom_all_reduce.py``: supported world sizes 2, 4, 6, 8; default ``max_size`` 8 MiB, lowered
  to ``CUSTOM_ALL_REDUCE_MAX_SIZES[capability][world_size]`` when the symmetric-memory
  communicator is enabled; ``should_custom_ar``: bytes a multiple of 16, (weakly) contiguous,
  world size 2 or fully connected, ``bytes < max_size``.
- ``csrc/custom_all_reduce.cuh``: world size 2 runs the one-stage kernel; fully connected runs
  one-stage when (ws <= 4 and bytes < 512 KiB) or (ws <= 8 and bytes < 256 KiB), else two-stage.
- ``symm_mem.py``: bfloat16 only; bytes a multiple of 4; ``bytes < SYMM_MEM_ALL_REDUCE_MAX_SIZES
  [capability][world_size]``; multimem for world sizes {"9.0": 4, 6, 8; "10.0": 6, 8}, else
  two-shot; the communicator disables itself when the rendezvous has no multicast pointer.

Our names for vLLM's paths: one-stage custom -> ``custom_one_shot``, two-stage ->
``custom_two_shot``, symm-mem multimem -> ``symm_mem_multimem``, symm-mem two-shot ->
``symm_mem_two_shot``, pynccl -> ``pynccl`` (``nccl`` where pynccl was not measured).
vLLM's CPU communicator is not modelled: on CPU there is no static table to re-enact.
"""

from __future__ import annotations

from collections.abc import Mapping

from bench.analysis.results import TABLE_KEY, correct_rows

__all__ = [
    "MiB",
    "CUSTOM_ALL_REDUCE_MAX_SIZES",
    "SYMM_MEM_ALL_REDUCE_MAX_SIZES",
    "CUSTOM_AR_DEFAULT_MAX_SIZE",
    "CUSTOM_AR_WORLD_SIZES",
    "SYMM_MEM_MULTIMEM_WORLD_SIZES",
    "static_choice",
    "reenact",
]

MiB = 1024 * 1024

CUSTOM_ALL_REDUCE_MAX_SIZES: Mapping[str, Mapping[int, int]] = {
    "9.0": {2: 64 * MiB, 4: 32 * MiB, 6: MiB // 2, 8: MiB // 4},
    "10.0": {2: 2 * MiB, 4: 2 * MiB, 6: 1 * MiB, 8: 1 * MiB},
}
SYMM_MEM_ALL_REDUCE_MAX_SIZES: Mapping[str, Mapping[int, int]] = {
    "9.0": {2: 64 * MiB, 4: 32 * MiB, 6: 64 * MiB, 8: 64 * MiB},
    "10.0": {2: 8 * MiB, 4: 32 * MiB, 6: 128 * MiB, 8: 128 * MiB},
}
CUSTOM_AR_DEFAULT_MAX_SIZE = 8 * MiB
CUSTOM_AR_WORLD_SIZES = (2, 4, 6, 8)
SYMM_MEM_MULTIMEM_WORLD_SIZES: Mapping[str, tuple[int, ...]] = {"9.0": (4, 6, 8), "10.0": (6, 8)}


def _symm_mem_on(capability: str, world_size: int, multicast: bool, symm_mem: bool) -> bool:
    return (
        symm_mem
        and multicast
        and capability in SYMM_MEM_ALL_REDUCE_MAX_SIZES
        and world_size in SYMM_MEM_ALL_REDUCE_MAX_SIZES[capability]
    )


def static_choice(
    capability: str | None,
    world_size: int,
    dtype: str,
    nbytes: int,
    *,
    symm_mem: bool = True,
    multicast: bool = False,
    fully_connected: bool = True,
    custom_ar: bool = True,
) -> str | None:
    """Our name of the path vLLM's CUDA communicator takes for this all-reduce (None on CPU).

    `symm_mem`: VLLM_ALLREDUCE_USE_SYMM_MEM; `multicast`: the node has NVLink multicast (off on
    the machines this project is measured on, which disables vLLM's symm-mem communicator)."""
    if capability is None or capability == "cpu":
        return None
    sm_on = _symm_mem_on(capability, world_size, multicast, symm_mem)
    if custom_ar and world_size in CUSTOM_AR_WORLD_SIZES and (world_size == 2 or fully_connected):
        max_size = CUSTOM_AR_DEFAULT_MAX_SIZE
        if sm_on and capability in CUSTOM_ALL_REDUCE_MAX_SIZES:
            max_size = min(max_size, CUSTOM_ALL_REDUCE_MAX_SIZES[capability][world_size])
        if nbytes % 16 == 0 and nbytes < max_size:
            one_stage = (
                world_size == 2
                or (world_size <= 4 and nbytes < 512 * 1024)
                or (world_size <= 8 and nbytes < 256 * 1024)
            )
            return "custom_one_shot" if one_stage else "custom_two_shot"
    if (
        sm_on
        and dtype == "bfloat16"
        and nbytes % 4 == 0
        and (nbytes < SYMM_MEM_ALL_REDUCE_MAX_SIZES[capability][world_size])
    ):
        multimem = world_size in SYMM_MEM_MULTIMEM_WORLD_SIZES.get(capability, ())
        return "symm_mem_multimem" if multimem else "symm_mem_two_shot"
    return "pynccl"


def reenact(rows, capability: str, **options):
    """vLLM's static choice at every measured point of `rows` (a results frame) and its
    latency there: columns hardware_key, world_size, dtype, mode, bytes, vllm_backend,
    latency_us (NaN where that backend was not measured at the point). Only correct rows;
    several rows of one backend at a point give their median."""
    import pandas as pd

    ok = correct_rows(rows)
    keys = [*TABLE_KEY, "bytes"]
    latency = ok.groupby(keys + ["backend"])["latency_us"].median()
    out = []
    for point, part in ok.groupby(keys, sort=True):
        hw, ws, dtype, mode, nbytes = point
        choice = static_choice(capability, int(ws), dtype, int(nbytes), **options)
        if choice is None:
            continue
        measured = set(part["backend"])
        if choice == "pynccl" and "pynccl" not in measured:
            choice = "nccl"
        value = latency.get((*point, choice), float("nan"))
        out.append(
            {
                "hardware_key": hw,
                "world_size": int(ws),
                "dtype": dtype,
                "mode": mode,
                "bytes": int(nbytes),
                "vllm_backend": choice,
                "latency_us": float(value),
            }
        )
    return pd.DataFrame(out, columns=keys + ["vllm_backend", "latency_us"])
