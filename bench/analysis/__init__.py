"""What a sweep leaves behind and how people read it: the results table (`results`), the
nccl-tests-style report (`report`) and the figures (`plots`)."""

__all__ = ["results", "report", "plots"]
