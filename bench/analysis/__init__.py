"""What a sweep leaves behind and how people read it: the results table (`results`), its
rounds with the paired statistics and the A/A figure (`rounds`), the
nccl-tests-style report (`report`), the figures (`plots`), the index of a results folder
(`index`, `bench report --index`), side-by-side sweeps with ratios (`compare`, `bench compare`)
and summaries of ratios (`stats`)."""

__all__ = ["results", "rounds", "report", "plots", "index", "compare", "stats"]
