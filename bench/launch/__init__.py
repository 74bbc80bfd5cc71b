"""Launching: the command-line plumbing every CLI shares (`flags`), the sweep's flag table and
its checks (`config`), `bench sweep` itself (`sweep`), and starting the ranks through torchrun's
launcher API (`launcher`). The per-rank watchdog lives with the ranks, in `bench.run.watchdog`."""

__all__ = ["config", "flags", "launcher", "sweep"]
