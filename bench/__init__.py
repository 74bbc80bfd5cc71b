"""allreduce-autotune's measuring side: backends, the sweep worker, timers, the results table."""

__version__ = "0.1.0"
__all__ = ["__version__"]
