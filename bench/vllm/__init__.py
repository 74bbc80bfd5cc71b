"""vLLM's own all-reduce communicators, seen from this project.

- `paths`: how each of vLLM's all-reduce paths is gated and called (custom all-reduce with its
  one-stage/two-stage kernel forced or not, symmetric memory two-shot/multimem, pynccl, quick
  reduce, torch.distributed on the device group), and the in-place sizing of vLLM's max-size
  tables. Shared by the sweep's plug-in backends and the vLLM plugin (`tuner.engines`).
- `backends`: those paths as plug-in backends of `bench sweep` (entry point group
  `allreduce_autotune.backends`), so a table tuned on a node can name what vLLM will run.

Nothing here imports vLLM at import time; the tested version is in docs/vllm.md.
"""

__all__ = ["paths", "backends"]
