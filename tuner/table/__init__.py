"""From measured rows to thresholds.json: rows of runs (`data`), the exact range builder
(`builder`), paired decisions from rounds (`paired`), held-out and validation regret
(`evidence`), `tuner fit` (`fit`), other engines' formats (`export`, `vllm`)."""

__all__ = ["data", "builder", "paired", "evidence", "fit", "export", "vllm"]
