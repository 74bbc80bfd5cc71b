"""What forcing vLLM's custom all-reduce kernel costs per call: `VLLM_CUSTOM_ALLREDUCE_ALGO`
set around the call and restored (bench.vllm.paths, vLLM's only way in), against the same call
without it. Prints the median per-call cost of each and the difference, in microseconds.

    python scripts/vllm_algo_env_cost.py [--calls 200000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.vllm.paths import PATHS, Communicators, run


class _Custom:
    """vLLM's method names, an empty call: only the path's own work is timed."""

    disabled = False

    def should_custom_ar(self, tensor: torch.Tensor) -> bool:
        return True

    def custom_all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _per_call_us(name: str, comms: Communicators, tensor: torch.Tensor, calls: int) -> float:
    path = PATHS[name]
    start = time.perf_counter()
    for _ in range(calls):
        run(path, comms, tensor)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    comms, tensor = Communicators(ca_comm=_Custom()), torch.ones(1024)
    plain, forced = [], []
    for _ in range(args.repeats):  # interleaved, side by side
        plain.append(_per_call_us("vllm_custom_ar", comms, tensor, args.calls))
        forced.append(_per_call_us("vllm_custom_ar_one_shot", comms, tensor, args.calls))
    p, f = statistics.median(plain), statistics.median(forced)
    print(f"vllm_custom_ar (vLLM's choice)      {p:6.2f} us/call")
    print(f"vllm_custom_ar_one_shot (env forced) {f:6.2f} us/call")
    print(f"the variable's cost                  {f - p:6.2f} us/call")


if __name__ == "__main__":
    main()
