#!/bin/sh
# issue 23: the own shm all-reduce (exact arithmetic: the default since issue 23) beside the
# peers, with every point's numerics, on the 2-core box. From the repository root, in a venv
# with the [peers] extra (.ci/run's). Then tuner fit --numerics exact|any on each run.
set -e
OUT=${OUT:-runs}
python -m bench.cli compare --launcher mpirun --world-sizes 2,4 -b 1K -e 64M \
  --dtypes float32,bfloat16 --backends gloo,shm_one_shot,shm_two_shot,mpi,deepspeed_shm \
  --baseline best-of:mpi,deepspeed_shm --candidates shm_one_shot,shm_two_shot \
  --repeats 2 -n 20 -w 5 --label exact-peers --out "$OUT" --markdown "$OUT/compare.md" -- -f 4
