"""From measured rows to thresholds.json: rows of runs (`data`), the exact range builder
(`builder`), `tuner fit` (`fit`), other engines' formats (`export`, `vllm`)."""

__all__ = ["data", "builder", "fit", "export", "vllm"]
