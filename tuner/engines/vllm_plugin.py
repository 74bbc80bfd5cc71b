"""vLLM plugin: every vLLM worker follows thresholds.json (entry point `vllm.general_plugins`).

    ALLREDUCE_AUTOTUNE_THRESHOLDS=thresholds.json vllm serve MODEL --tensor-parallel-size 8

vLLM calls `register()` once in every process it starts (front end, engine core, each
worker), before any communicator exists. With ALLREDUCE_AUTOTUNE_THRESHOLDS unset it returns
at once. Set, it

1. loads and validates the file, and checks that every algorithm of its GPU tables has a vLLM
   path (`vllm_names`): a bad file or such an algorithm is one line naming the variable and the
   file, and vLLM does not start (`ThresholdsRefused`) unless ALLREDUCE_AUTOTUNE_STRICT=0,
   which warns and keeps vLLM's own choice (`vllm_setup`);
2. arranges for `vllm_comm.install` to wrap CudaCommunicator when vLLM first imports it (at
   once where it already has), without importing it here: processes that build no
   communicator pay nothing more. The tensor-parallel group's communicator then agrees on the
   table, sizes vLLM's buffers for it and routes each all_reduce by it (`vllm_comm`).

Cheap and idempotent: a second call with the same settings does nothing; one with other
settings (tests) loads the new table, read by communicators built after it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from bench.environment import get
from tuner.engines.post_import import when_imported

__all__ = ["register", "current", "CUDA_COMMUNICATOR"]

CUDA_COMMUNICATOR = "vllm.distributed.device_communicators.cuda_communicator"
_lock = threading.Lock()
_state: dict = {"setup": None, "hooked": False}


def current():
    """This process's `vllm_setup.Setup`, None when the plugin is off."""
    return _state["setup"]


def register(environ: Mapping[str, str] | None = None):
    """vLLM's entry point (see the module docstring); returns the Setup, or None when off."""
    if not (get("ALLREDUCE_AUTOTUNE_THRESHOLDS", environ) or "").strip():
        return None
    from tuner.engines import (
        vllm_setup,  # optional: torch; vLLM loads this plug-in in every process
    )

    with _lock:
        settings = vllm_setup.settings_of(environ)
        setup = _state["setup"]
        if setup is None or setup.settings != settings:
            setup = _state["setup"] = vllm_setup.load_setup(environ)
        if not _state["hooked"]:
            _state["hooked"] = True
            from tuner.engines import (
                vllm_comm,  # optional: torch; vLLM loads this plug-in in every process
            )

            when_imported(CUDA_COMMUNICATOR, lambda module: vllm_comm.install(module, current))
    return setup
