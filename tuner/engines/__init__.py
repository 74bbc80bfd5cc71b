"""Serving engines that follow thresholds.json with no code change.

- `vllm_plugin`: vLLM's `vllm.general_plugins` entry point (`register`), set by
  ALLREDUCE_AUTOTUNE_THRESHOLDS; `vllm_setup` loads and checks the table, `vllm_names` maps
  the table's algorithms to vLLM's own paths (data), `vllm_comm` makes vLLM's
  CudaCommunicator agree on, size for and route by the table; `post_import` runs a hook when
  vLLM first imports a module. docs/vllm.md says how to use it.

Like `tuner.runtime`, importable without optuna, pandas or matplotlib; nothing imports vLLM
at import time.
"""

__all__ = ["vllm_plugin", "vllm_setup", "vllm_names", "vllm_comm", "post_import"]
