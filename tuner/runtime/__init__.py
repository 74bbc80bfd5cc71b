"""What a serving process imports: thresholds.json (`schema`) and the dispatcher (`dispatch`).

Needs torch and the backends only (no optuna, pandas or matplotlib)."""

__all__ = ["schema", "dispatch"]
