"""What vLLM runs for each algorithm a thresholds.json may name (data).

Tables tuned on this project's own kernels name those (`custom_one_shot`, ...): each maps to
the nearest of vLLM's own paths. Tables tuned on vLLM's implementations (the sweep's
`vllm_*` plug-in backends, `bench.vllm.backends`) name the path itself. The paths and how each
is called are `bench.vllm.paths.PATHS`. A name with no vLLM path is refused at start-up, with
its reason, never silently ignored.

A rule's `params` are knobs of this project's kernels; vLLM's kernels take none, so they are
not applied (the start-up line says so).
"""

from __future__ import annotations

from bench.run.hardware import device_of_key

__all__ = ["VLLM_PATH", "NO_VLLM_PATH", "NOT_EXACT", "vllm_path", "first_unmapped", "first_inexact"]

VLLM_PATH: dict[str, str] = {
    # this project's algorithms -> the nearest of vLLM's paths
    "custom_one_shot": "vllm_custom_ar_one_shot",  # CustomAllreduce, 1-stage kernel forced
    "custom_two_shot": "vllm_custom_ar_two_shot",  # CustomAllreduce, 2-stage kernel forced
    "symm_mem_two_shot": "vllm_symm_mem_two_shot",  # SymmMemCommunicator, force_multimem=False
    "symm_mem_multimem": "vllm_symm_mem_multimem",  # SymmMemCommunicator, force_multimem=True
    "pynccl": "vllm_pynccl",  # PyNcclCommunicator
    "nccl": "nccl",  # torch.distributed on the device group: vLLM's own last resort
    # vLLM's own implementations, as the sweep's plug-in backends name them
    "vllm_custom_ar": "vllm_custom_ar",  # CustomAllreduce, vLLM's own 1/2-stage choice
    "vllm_custom_ar_one_shot": "vllm_custom_ar_one_shot",
    "vllm_custom_ar_two_shot": "vllm_custom_ar_two_shot",
    "vllm_symm_mem_two_shot": "vllm_symm_mem_two_shot",
    "vllm_symm_mem_multimem": "vllm_symm_mem_multimem",
    "vllm_pynccl": "vllm_pynccl",
    "vllm_quick_reduce": "vllm_quick_reduce",  # QuickAllReduce: ROCm MI300/MI350 only
}

NO_VLLM_PATH: dict[str, str] = {
    "symm_mem_one_shot": "vLLM never calls torch's one-shot symmetric-memory all-reduce",
    "pynccl_symm": "vLLM's NCCL symmetric-memory path (VLLM_USE_NCCL_SYMM_MEM) allocates and "
    "copies per call, not the registered window measured here",
    "gloo": "CPU only: vLLM's CudaCommunicator has no gloo path",
    "shm_one_shot": "CPU only: vLLM's CudaCommunicator has no shared-memory path",
    "shm_two_shot": "CPU only: vLLM's CudaCommunicator has no shared-memory path",
}
_OTHER = "not one of vLLM's all-reduce paths"


def vllm_path(algorithm: str) -> tuple[str | None, str | None]:
    """(the vLLM path, None) for a name vLLM runs, else (None, why not)."""
    path = VLLM_PATH.get(algorithm)
    return (path, None) if path else (None, NO_VLLM_PATH.get(algorithm, _OTHER))


def first_unmapped(tables, skip_cpu: bool = True) -> str | None:
    """The first rule (in file order) whose algorithm has no vLLM path, as one line naming
    it; None if every rule has one. `tables` are (index, Table) pairs. CPU tables (hardware
    key cpu-...) are left out unless `skip_cpu` is False: vLLM serves GPUs."""
    for index, table in tables:
        if skip_cpu and device_of_key(table.hardware_key) == "cpu":
            continue
        for number, rule in enumerate(table.rules):
            path, reason = vllm_path(rule.algorithm)
            if path is None:
                return (
                    f"tables[{index}].rules[{number}].algorithm: {rule.algorithm} has no "
                    f"vLLM path ({reason}); vLLM runs {', '.join(VLLM_PATH)}"
                )
    return None


# vLLM paths whose arithmetic an exact-numerics table cannot promise, whatever was measured:
# NCCL picks its algorithm (ring or tree), protocol and channels per call and message size, so
# the order of the sum changes with the batch
NOT_EXACT: dict[str, str] = {
    "vllm_pynccl": "NCCL picks its algorithm and channels per message size: the order of its "
    "sum changes with the batch",
    "nccl": "NCCL picks its algorithm and channels per message size: the order of its sum "
    "changes with the batch",
}


def first_inexact(tables, skip_cpu: bool = True) -> str | None:
    """The first rule of an exact-numerics table (`numerics: exact`) that vLLM cannot run with
    the arithmetic the table promises, as one line naming it; None where every one can.

    The promise holds for what was measured: a rule naming one of vLLM's own implementations
    (the sweep's `vllm_*` backends, measured on vLLM's code) keeps it, unless NCCL sums it
    (`NOT_EXACT`). A rule naming this project's own kernel (`custom_one_shot`, ...) runs on
    vLLM's nearest path, whose arithmetic that measurement says nothing about: refused, with
    how to get a table that holds (fit on the vllm_* backends)."""
    for index, table in tables:
        if table.numerics != "exact":
            continue
        if skip_cpu and device_of_key(table.hardware_key) == "cpu":
            continue
        for number, rule in enumerate(table.rules):
            path, _ = vllm_path(rule.algorithm)
            where = f"tables[{index}].rules[{number}].algorithm"
            if path in NOT_EXACT:
                return f"{where}: {rule.algorithm} in an exact-numerics table: {NOT_EXACT[path]}"
            if path is not None and path != rule.algorithm:
                return (
                    f"{where}: {rule.algorithm} in an exact-numerics table runs as vLLM's "
                    f"{path}, whose arithmetic was not measured (the table measured this "
                    "project's kernel); fit the exact table on the vllm_* backends"
                )
    return None
