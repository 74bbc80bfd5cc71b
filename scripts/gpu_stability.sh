#!/usr/bin/env bash
# Issue 19's stability benchmark on a GPU node: three independent sweeps of each configuration,
# for two code versions side by side (before = the backend-major sweep at the commit given,
# unpacked into .before/ by `scripts/gpu_stability.sh --prepare COMMIT` here; after = this
# checkout), interleaved so that both see the same machine:
#   ws1   every GPU backend at world size 1, eager and graph (no MPS: one process)
#   ws2, ws4  the own IPC kernels (custom_one_shot, custom_two_shot), 2 and 4 ranks on ONE GPU
#         under the MPS daemon (started here, private pipe/log folders, stopped at the end)
# Outputs: $OUT/<stage>.tgz with runs/<version>-ws<N>-<i>/ (results.csv, meta.json, rounds.csv)
# and $OUT/<stage>.log. Tables are fitted and compared on the CPU box afterwards:
#   scripts/stability.py runs/before-ws1-{1,2,3} ...  (tuner fit per run, each scored on the others)
#   STAGES=ws1 OUT=/tmp/x scripts/gpu_stability.sh ; STAGES=ipc OUT=/tmp/x scripts/gpu_stability.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  rm -rf .before && mkdir .before && git archive "$2" bench tuner pyproject.toml | tar -x -C .before
  grep -qx '/.before/' .git/info/exclude 2>/dev/null || echo '/.before/' >> .git/info/exclude
  echo "the code of $2 is in .before/ (carry it: carry=[\".before\"])"; exit 0
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache-stability
OUT="${OUT:-/tmp/gpu-stability}"
STAGES="${STAGES:-ws1,ipc}"
REPEATS="${REPEATS:-3}"
VERSIONS="${VERSIONS:-before after}"  # after: this checkout; before: .before/
PY="${PYTHON:-python3}"
RUNS=/tmp/stability-runs
mkdir -p "$OUT" "$RUNS"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
echo "== $(date -u) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"

sweep() {  # version ws backends sizes... -> one run directory
  local version=$1 ws=$2 backends=$3 max=$4 i=$5 code=$PWD
  [ -f "$code/.before/bench/__init__.py" ] || [ "$version" != before ] || { echo "no .before/"; return 1; }
  [ "$version" = before ] && code=$PWD/.before
  [ -n "${TAG:-}" ] && version="$version$TAG"
  local run="$RUNS/$version-ws$ws-$i" t0=$SECONDS
  # from the code's own folder: `python -m` puts the current folder first on sys.path
  (cd "$code" && PYTHONPATH="$code" timeout 200 "$PY" -m bench.cli sweep --device cuda \
    --world-size "$ws" --backends "$backends" -b 1K -e "$max" --out "$run" -q >"$run.log" 2>&1)
  echo "$version ws=$ws #$i rc=$? $((SECONDS - t0)) s $(grep -c . "$run/results.csv" 2>/dev/null) rows"
}

if has ws1; then
  GPU1=nccl,pynccl,pynccl_symm,symm_mem_one_shot,symm_mem_two_shot
  for i in $(seq "$REPEATS"); do
    for version in $VERSIONS; do sweep "$version" 1 "$GPU1" 64M "$i"; done
  done | tee "$OUT/ws1.log"
  tar -czf "$OUT/ws1.tgz" -C /tmp stability-runs
fi

if has ipc; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe-stab-$$ CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log-stab-$$
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && trap 'echo quit | nvidia-cuda-mps-control' EXIT
  for i in $(seq "$REPEATS"); do
    for ws in 2 4; do
      for version in $VERSIONS; do
        sweep "$version" "$ws" custom_one_shot,custom_two_shot 16M "$i"
      done
    done
  done | tee "$OUT/ipc.log"
  rm -rf "$RUNS"/*-ws1-* && tar -czf "$OUT/ipc.tgz" -C /tmp stability-runs
fi
