"""Launching a sweep: the flag table and its checks (`config`), starting the ranks through
torchrun's launcher API (`launcher`), and the per-rank watchdog that names silent peers."""

__all__ = ["config", "launcher", "watchdog"]
