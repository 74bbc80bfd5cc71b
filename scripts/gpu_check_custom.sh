#!/usr/bin/env bash
# The custom all-reduce on a GPU node, in one go, logs and outputs in $OUT:
#   kernels  `bench kernels` (own N-input reduction vs copy bandwidth and PyTorch's) -> kernels.csv/.log
#   ncu      Nsight Compute on one launch of each (DRAM throughput, % of peak)       -> ncu.txt
#   tests    under the MPS daemon: pytest tests/test_custom_allreduce.py (CPU checks, the
#            timeout path, correctness with 2, 3, 4 and 8 ranks on this node's GPUs)  -> tests.log, checks.tgz
#   sweep    under MPS: `bench sweep` of custom_one_shot,custom_two_shot for 2, 3, 4, 8 ranks,
#            meta.json marked with the MPS setting                                     -> sweeps.tgz, sweep.log
#   release  issue 13, ONE GPU under MPS: short sweeps of both IPC backends with 2, 3, 4, 8 ranks;
#            every log grepped for torch's "Producer process has been terminated" (must be 0),
#            /dev/shm before and after (no torch_* or aat-* left)                  -> release/, release-summary.txt
#   firstcall  issue 13: scripts/check_custom_allreduce.py with 3 and 8 ranks on ONE GPU under
#            MPS (the first calls after creating a communicator, peers busy on the host) -> release/
#   crash    issue 13: a rank SIGKILLed mid-sweep (4 ranks, one GPU): the sweep ends with one
#            line per failed rank, no process and nothing in /dev/shm left (scripts/gpu_crash_check.py)
#
#   OUT=/tmp/gpu-check STAGES=kernels,ncu,tests scripts/gpu_check_custom.sh
#   OUT=/tmp/gpu-check STAGES=release,firstcall,crash scripts/gpu_check_custom.sh   # ~3 min on an H200
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

if has tests || has sweep || has release || has firstcall || has crash; then start_mps; fi

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

# -- issue 13: clean shutdown of the IPC backends, their first calls, a crashed peer ----------
REL="$OUT/release"
SUMMARY="$OUT/release-summary.txt"
WARNING="Producer process has been terminated"
if has release || has firstcall || has crash; then
  mkdir -p "$REL"
  { echo "# issue 13 on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), one GPU" \
         "(CUDA_VISIBLE_DEVICES=0), MPS=$MPS_ON, $(date -u)"; } >"$SUMMARY"
  shm_list() { ls /dev/shm 2>/dev/null | grep -E '^(torch_|aat-)' | sort; }
  shm_list >"$REL/shm-before.txt"
fi

if has release; then
  for ws in $WORLD_SIZES; do
    echo "== release: sweep ws=$ws on one GPU (limit ${RELEASE_S:-60}s, MPS=$MPS_ON)"
    start=$(date +%s)
    CUDA_VISIBLE_DEVICES=0 timeout "${RELEASE_S:-60}" "$PY" -m bench.cli sweep --device cuda \
      --world-size "$ws" --backends custom_one_shot,custom_two_shot -b 4K -e 4M -f 32 \
      --dtypes bfloat16,float32 --modes eager,graph -n 5 -w 2 --timeout 40 \
      --out "$REL/sweep-ws$ws" -q >"$REL/sweep-ws$ws.log" 2>&1
    rc=$?
    rows=$(( $(wc -l <"$REL/sweep-ws$ws/results.csv" 2>/dev/null || echo 1) - 1 ))
    wrong=$(grep -c ",False," "$REL/sweep-ws$ws/results.csv" 2>/dev/null)
    warnings=$(grep -c "$WARNING" "$REL/sweep-ws$ws.log")
    echo "release ws=$ws rc=$rc rows=$rows/24 wrong=${wrong:-0} producer_warnings=$warnings" \
         "secs=$(( $(date +%s) - start ))" | tee -a "$SUMMARY"
    [ "$rc" = 0 ] && [ "$rows" = 24 ] && [ "$warnings" = 0 ] || status=1
  done
fi

if has firstcall; then
  for ws in ${FIRSTCALL_SIZES:-3 8}; do
    echo "== firstcall: scripts/check_custom_allreduce.py ws=$ws on one GPU (limit ${FIRSTCALL_S:-90}s)"
    start=$(date +%s)
    CUDA_VISIBLE_DEVICES=0 timeout "${FIRSTCALL_S:-90}" "$PY" \
      scripts/check_custom_allreduce.py --world-size "$ws" --max-bytes $(( (1 << 20) + 16 )) \
      --out "$REL/check-ws$ws.json" >"$REL/check-ws$ws.log" 2>&1
    rc=$?
    warnings=$(grep -c "$WARNING" "$REL/check-ws$ws.log")
    echo "firstcall ws=$ws rc=$rc producer_warnings=$warnings secs=$(( $(date +%s) - start ))" \
         "$(grep -m1 -E '^ws=' "$REL/check-ws$ws.log")" | tee -a "$SUMMARY"
    [ "$rc" = 0 ] && [ "$warnings" = 0 ] || status=1
  done
fi

if has crash; then
  echo "== crash: a rank SIGKILLed mid-sweep, 4 ranks on one GPU (limit ${CRASH_S:-150}s)"
  CUDA_VISIBLE_DEVICES=0 timeout "${CRASH_S:-150}" "$PY" scripts/gpu_crash_check.py \
    --world-size 4 --limit 60 --out "$REL/crash.json" --log "$REL/crash.log" \
    | tee -a "$SUMMARY" || status=1
fi

if has release || has firstcall || has crash; then
  shm_list >"$REL/shm-after.txt"
  left=$(comm -13 "$REL/shm-before.txt" "$REL/shm-after.txt" | tr '\n' ' ')
  echo "shm_left=[${left}] gpu_apps_after=$(nvidia-smi --query-compute-apps=pid,process_name \
    --format=csv,noheader | tr '\n' ';')" | tee -a "$SUMMARY"
  [ -z "$left" ] || status=1
  echo "verdict: $([ "$status" = 0 ] && echo PASS || echo FAIL)" | tee -a "$SUMMARY"
fi

stop_mps
if [ -d "$TRITON_CACHE_DIR" ]; then
  tar -czf "$OUT/triton-cache.tgz" -C "$(dirname "$TRITON_CACHE_DIR")" "$(basename "$TRITON_CACHE_DIR")"
fi
echo "== done, status $status"
exit $status
