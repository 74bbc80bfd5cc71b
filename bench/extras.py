"""Which optional dependency (a pyproject extra) a command needs, for a one-line hint.

The core install is what a serving process needs (torch, nvidia-ml-py: the backends and the
dispatcher); the sweep, the tuner and the figures each add their own (pyproject.toml)."""

from __future__ import annotations

__all__ = ["EXTRA_OF", "missing_dependency"]

# top-level module -> the extra that installs it
EXTRA_OF = {"tqdm": "bench", "pandas": "bench", "optuna": "tuner", "matplotlib": "analysis"}


def missing_dependency(exc: ModuleNotFoundError) -> str | None:
    """One line naming the missing module and the install command, or None when the module is
    not one of the project's optional dependencies (a real bug: let it raise)."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF.get(module)
    if extra is None:
        return None
    return (
        f"this command needs {module}, which is not installed: "
        f"pip install 'allreduce-autotune[{extra}]' (or [all])"
    )
