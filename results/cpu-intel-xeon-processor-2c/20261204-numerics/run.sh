#!/bin/sh
# The numerics run (issue 23): every point's arithmetic beside its timing, world sizes 2 and 4.
# Run from the repository root on the 2-core CPU box; then tuner fit --numerics exact|any.
set -e
D=results/cpu-intel-xeon-processor-2c/20261204-numerics
for ws in 2 4; do
  python -m bench.cli sweep --world-size $ws --backends gloo,shm_one_shot,shm_two_shot \
    -b 512 -e 8M -f 4 --dtypes bfloat16,float32 --out $D/ws$ws --quiet
done
