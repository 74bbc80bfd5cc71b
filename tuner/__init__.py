"""allreduce-autotune's deciding side: Optuna study, thresholds.json, the runtime dispatcher."""

__version__ = "0.1.0"
__all__: list[str] = ["__version__"]
