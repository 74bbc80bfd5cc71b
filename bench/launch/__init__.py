"""Launching: the command-line plumbing every CLI shares (`flags`), the sweep's flag table and
its checks (`config`), `bench sweep` itself (`sweep`), starting the ranks through torchrun's
launcher API (`launcher`), and the per-rank watchdog that names silent peers (`watchdog`)."""

__all__ = ["config", "flags", "launcher", "sweep", "watchdog"]
