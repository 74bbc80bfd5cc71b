"""The vLLM plugin's settings, from the environment, and the table they name.

| variable | meaning |
| --- | --- |
| `ALLREDUCE_AUTOTUNE_THRESHOLDS` | the thresholds.json every vLLM process loads; unset: the plugin does nothing |
| `ALLREDUCE_AUTOTUNE_STRICT` | `1` (default): a table the plugin cannot use stops vLLM from starting (raises); `0`: one warning, vLLM keeps its own all-reduce choice |
| `ALLREDUCE_AUTOTUNE_HARDWARE_KEY` | the hardware key to look up, read on the group's first rank; unset: this project's fingerprint of the node on CUDA (`bench.run.hardware`), as `bench sweep` records it |

Every problem is one line naming the variable and the file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Mapping

from bench.environment import get
from bench.run.hardware import fingerprint
from tuner.engines.vllm_names import first_inexact, first_unmapped
from tuner.runtime.schema import TableError, Thresholds, load

__all__ = [
    "ENV_THRESHOLDS",
    "ENV_STRICT",
    "ENV_HARDWARE_KEY",
    "ThresholdsRefused",
    "Setup",
    "settings_of",
    "load_setup",
    "refuse",
    "node_hardware_key",
    "logger",
]

ENV_THRESHOLDS = "ALLREDUCE_AUTOTUNE_THRESHOLDS"
ENV_STRICT = "ALLREDUCE_AUTOTUNE_STRICT"
ENV_HARDWARE_KEY = "ALLREDUCE_AUTOTUNE_HARDWARE_KEY"
# a child of vLLM's logger: vLLM's format, level and stream apply
logger = logging.getLogger("vllm.allreduce_autotune")
_TRUE, _FALSE = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


class ThresholdsRefused(RuntimeError):
    """vLLM must not start with this table (one line: the variable, the file, why)."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one process loaded: the table (None: unusable, already said), its digest (equal
    on every rank that loaded the same tables), and the settings."""

    path: str
    strict: bool
    thresholds: Thresholds | None
    digest: str
    hardware_key: str | None  # ALLREDUCE_AUTOTUNE_HARDWARE_KEY, if set

    @property
    def settings(self) -> tuple:
        return (self.path, self.strict, self.hardware_key)


def _strict(environ: Mapping[str, str] | None) -> bool:
    value = (get(ENV_STRICT, environ) or "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ThresholdsRefused(f"{ENV_STRICT}: expected 0 or 1, got {value!r}")
    return value in _TRUE


def settings_of(environ: Mapping[str, str] | None = None) -> tuple | None:
    """(path, strict, hardware key) from the environment, None when the plugin is off."""
    path = (get(ENV_THRESHOLDS, environ) or "").strip()
    if not path:
        return None
    return (path, _strict(environ), (get(ENV_HARDWARE_KEY, environ) or "").strip() or None)


def refuse(message: str, strict: bool) -> None:
    """Stop vLLM (strict) or warn that vLLM keeps its own choice."""
    if strict:
        raise ThresholdsRefused(
            f"{message} (vLLM does not start; {ENV_STRICT}=0 starts it with "
            "its own all-reduce choice)"
        )
    logger.warning("%s; vLLM keeps its own all-reduce choice (%s=0)", message, ENV_STRICT)


def load_setup(environ: Mapping[str, str] | None = None) -> Setup | None:
    """Load and check the table the environment names (see the module docstring)."""
    settings = settings_of(environ)
    if settings is None:
        return None
    path, strict, hardware_key = settings
    try:
        thresholds = load(path)
        unmapped = first_unmapped(enumerate(thresholds.tables))
        unmapped = unmapped or first_inexact(enumerate(thresholds.tables))
        if unmapped:
            raise TableError(f"{path}: {unmapped}")
    except TableError as exc:
        message = f"{ENV_THRESHOLDS}: {exc}"
        refuse(message, strict)
        return Setup(path, strict, None, _digest("unusable"), hardware_key)
    return Setup(path, strict, thresholds, _digest(thresholds.dumps()), hardware_key)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def node_hardware_key(setup: Setup) -> str:
    """The key to look tables up by: the variable, else the fingerprint's (once a process).
    Never raises: it is computed on one rank just before the others wait for it."""
    try:
        return setup.hardware_key or _fingerprint_key()
    except Exception as exc:
        return f"unknown (fingerprint failed: {type(exc).__name__}: {exc})".splitlines()[0]


@functools.cache
def _fingerprint_key() -> str:
    return fingerprint("cuda")["hardware_key"]
