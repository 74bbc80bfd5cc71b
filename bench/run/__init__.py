"""One rank's side of a sweep: its set-up (`session`: layout, watchdog, gloo group, context),
the group context and backend building (`context`), the fingerprint (`hardware`), known inputs
and their check (`inputs`), the clocks (`timing`), one checked and timed point (`point`), the
sweep loop (`worker`), the watchdog that ends a rank whose peers went silent (`watchdog`), and
`bench soak`, the shm all-reduce soak (`soak`)."""

__all__ = [
    "context",
    "hardware",
    "inputs",
    "point",
    "session",
    "soak",
    "timing",
    "watchdog",
    "worker",
]
