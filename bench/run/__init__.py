"""One rank's side of a sweep: the group context and backend building (`context`), the
fingerprint (`hardware`), known inputs and their check (`inputs`), the clocks (`timing`), one
checked and timed point (`point`) and the sweep loop (`worker`)."""

__all__ = ["context", "hardware", "inputs", "point", "timing", "worker"]
