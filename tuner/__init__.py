"""allreduce-autotune's deciding side: Optuna study, thresholds.json, the runtime dispatcher."""

__all__: list[str] = []
