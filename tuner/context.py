"""The group helpers the dispatcher and `tuner live` use live in `bench.group` (the sweep's
worker and `bench doctor` build their groups and backends with the same code)."""

from bench.group import agreed_reason, broadcast_object, build_backend, make_context

__all__ = ["make_context", "agreed_reason", "build_backend", "broadcast_object"]
