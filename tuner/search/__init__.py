"""Searching algorithms x knobs with Optuna: studies (`study`), the per-size search
(`search`), measured trials (`measure`) and `tuner live` (`live`)."""

__all__ = ["study", "search", "measure", "live"]
