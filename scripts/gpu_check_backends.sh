#!/usr/bin/env bash
# GPU backends I on a GPU node, in one go: the environment and fingerprint, a world-size-1
# sweep of every GPU backend (1K..64M, bf16 + fp32, eager + graph), then the GPU tests.
# Everything lands in $OUT: env.log, sweep.log, sweep/{results.csv,meta.json}, gpu-tests.log.
#
#   OUT=/tmp/gpu-check scripts/gpu_check_backends.sh
#
# NVLink multicast stays off (shared machines): never remove the three exports below.
# DEVICE=cpu runs the same plumbing on a machine without a GPU (every GPU backend skips).
set -u -o pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu-check}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
MAX_BYTES="${MAX_BYTES:-64M}"
SWEEP_S="${SWEEP_S:-115}"
TESTS_S="${TESTS_S:-70}"
BACKENDS=nccl,pynccl,pynccl_symm,symm_mem_one_shot,symm_mem_two_shot,symm_mem_multimem,custom_one_shot
mkdir -p "$OUT"

{
  date -u
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PY" - "$DEVICE" <<'EOF'
import json
import sys

import torch

from bench.run.hardware import fingerprint

print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    from bench.backends.libnccl import load_library

    lib = load_library()
    print("libnccl", lib.path, lib.version, "symmetric:", lib.symmetric_support() or "yes")
except Exception as exc:
    print("libnccl:", exc)
print(json.dumps(fingerprint(sys.argv[1]), indent=1))
EOF
} >"$OUT/env.log" 2>&1
echo "== env: $(grep -m1 -E '^libnccl' "$OUT/env.log")"

echo "== sweep (device $DEVICE, 1K..$MAX_BYTES, limit ${SWEEP_S}s)"
timeout "$SWEEP_S" "$PY" -m bench.cli sweep --device "$DEVICE" --world-size 1 \
  --backends "$BACKENDS" -b 1K -e "$MAX_BYTES" --timeout 60 --out "$OUT/sweep" -q 2>&1 \
  | tee "$OUT/sweep.log"
sweep_rc=$?

echo "== GPU tests (limit ${TESTS_S}s)"
timeout "$TESTS_S" "$PY" -m pytest -rs -v -p no:cacheprovider tests/test_gpu_backends.py 2>&1 \
  | tee "$OUT/gpu-tests.log"
tests_rc=$?

echo "== sweep exit $sweep_rc, tests exit $tests_rc"
[ "$sweep_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ]
