"""The project's own GPU kernels (Triton): the N-input reduction and the one-shot / two-shot
all-reduce over CUDA IPC buffers (`reduce`), and the IPC buffer exchange (`ipc`).

Importing this package needs nothing; `reduce` needs Triton and `ipc` a CUDA build of torch.
"""

__all__ = ["ipc", "reduce"]
