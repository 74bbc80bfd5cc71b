#!/usr/bin/env bash
# The custom all-reduce on a GPU node, in one go, logs and outputs in $OUT:
#   kernels  `bench kernels` (own N-input reduction vs copy bandwidth and PyTorch's) -> kernels.csv/.log
#   ncu      Nsight Compute on one launch of each (DRAM throughput, % of peak)       -> ncu.txt
#   tests    under the MPS daemon: pytest tests/test_custom_allreduce.py (CPU checks, the
#            timeout path, correctness with 2, 3, 4 and 8 ranks on this node's GPUs)  -> tests.log, checks.tgz
#   sweep    under MPS: `bench sweep` of custom_one_shot,custom_two_shot for 2, 3, 4, 8 ranks,
#            meta.json marked with the MPS setting                                     -> sweeps.tgz, sweep.log
#
#   OUT=/tmp/gpu-check STAGES=kernels,ncu,tests scripts/gpu_check_custom.sh
#
# Several ranks on one GPU time-slice without MPS (~2.6-17 ms a barrier round); the MPS control
# daemon (private pipe and log directories under /tmp) lets their kernels run at once. It is
# stopped before the script ends. NVLink multicast stays off: never remove the exports below.
set -u -o pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache-custom}"
OUT="${OUT:-/tmp/gpu-check-custom}"
PY="${PYTHON:-python3}"
STAGES="${STAGES:-kernels,ncu,tests,sweep}"
WORLD_SIZES="${WORLD_SIZES:-2 3 4 8}"
KERNELS_S="${KERNELS_S:-80}"
TESTS_S="${TESTS_S:-150}"
SWEEP_S="${SWEEP_S:-60}"  # per world size
mkdir -p "$OUT"
status=0
has() { [[ ",$STAGES," == *",$1,"* ]]; }

MPS_ON=0
start_mps() {
  export CUDA_MPS_PIPE_DIRECTORY="/tmp/mps-pipe-custom-$$" CUDA_MPS_LOG_DIRECTORY="/tmp/mps-log-custom-$$"
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then MPS_ON=1; echo "== MPS daemon started ($CUDA_MPS_PIPE_DIRECTORY)"
  else echo "== MPS daemon did not start: ranks sharing a GPU will time-slice"; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; fi
}
stop_mps() {
  if [ "$MPS_ON" = 1 ]; then echo quit | nvidia-cuda-mps-control; MPS_ON=0; echo "== MPS daemon stopped"; fi
}
trap stop_mps EXIT

# a Triton cache brought back from an earlier run (ignored file, passed with the device tool's carry)
if [ -f .device-carry/triton-cache.tgz ]; then
  mkdir -p "$(dirname "$TRITON_CACHE_DIR")" && tar -xzf .device-carry/triton-cache.tgz -C "$(dirname "$TRITON_CACHE_DIR")" && echo "== Triton cache restored"
fi
echo "== $(date -u) $(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader)"

if has kernels; then
  echo "== bench kernels (limit ${KERNELS_S}s)"
  timeout "$KERNELS_S" "$PY" -m bench.cli kernels --max-bytes 64M --inputs 2,4,8 \
    --dtype bfloat16 --out "$OUT/kernels.csv" 2>&1 | tee "$OUT/kernels.log" || status=1
fi

if has ncu; then
  echo "== ncu (clock control off)"
  timeout 45 ncu --clock-control none -k 'regex:reduce_n_kernel|reduce_kernel' -c 4 \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__cycles_elapsed.avg.per_second,dram__cycles_elapsed.avg.per_second \
    "$PY" -c "from bench.kernels.benchmark import profile_once; profile_once(8, 64 << 20)" \
    >"$OUT/ncu.txt" 2>&1 || echo "ncu exit $?" >>"$OUT/ncu.txt"
  grep -E "reduce_n_kernel|reduce_kernel|dram__|gpu__time" "$OUT/ncu.txt" | head -40
fi

if has tests || has sweep; then start_mps; fi

if has tests; then
  echo "== pytest tests/test_custom_allreduce.py (limit ${TESTS_S}s, MPS=$MPS_ON)"
  mkdir -p /tmp/custom-checks
  BENCH_GPU_LOG_DIR=/tmp/custom-checks timeout "$TESTS_S" "$PY" -m pytest -rs -v -s \
    -p no:cacheprovider -k "${PYTEST_K:-not interpreter}" tests/test_custom_allreduce.py 2>&1 \
    | tee "$OUT/tests.log" | grep -E "PASS|FAIL|SKIP|ERROR|ws=|passed|failed|Timeout" || status=1
  tar -czf "$OUT/checks.tgz" -C /tmp custom-checks
fi

if has sweep; then
  mkdir -p /tmp/custom-sweeps
  for ws in $WORLD_SIZES; do
    echo "== sweep ws=$ws (limit ${SWEEP_S}s, MPS=$MPS_ON)"
    timeout "$SWEEP_S" "$PY" -m bench.cli sweep --device cuda --world-size "$ws" \
      --backends custom_one_shot,custom_two_shot -b 1K -e 64M -f 4 \
      --dtypes bfloat16,float16,float32 --modes eager,graph -n 10 -w 2 --timeout 60 \
      --out "/tmp/custom-sweeps/ws$ws" -q 2>&1 | tee -a "$OUT/sweep.log" | tail -25 || status=1
    "$PY" - "/tmp/custom-sweeps/ws$ws/meta.json" "$MPS_ON" <<'PYEOF'
import json, sys
path, mps = sys.argv[1], sys.argv[2] == "1"
try:
    meta = json.load(open(path))
except OSError:
    sys.exit(0)
meta["mps"] = mps
meta["note"] = ("all ranks share ONE GPU through CUDA IPC" + (" under the MPS daemon" if mps else
                " (time-sliced, no MPS)") + ": protocol overhead, not NVLink timings")
json.dump(meta, open(path, "w"), indent=1)
PYEOF
  done
  tar -czf "$OUT/sweeps.tgz" -C /tmp custom-sweeps
fi

stop_mps
if [ -d "$TRITON_CACHE_DIR" ]; then
  tar -czf "$OUT/triton-cache.tgz" -C "$(dirname "$TRITON_CACHE_DIR")" "$(basename "$TRITON_CACHE_DIR")"
fi
echo "== done, status $status"
exit $status
