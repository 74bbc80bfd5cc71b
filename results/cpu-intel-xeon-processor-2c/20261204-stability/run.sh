#!/usr/bin/env bash
# issue 19 on the 2-core box: README main job before/after (wall time), then three independent
# README-style sweeps per world size (2, 4) of gloo, shm_one_shot, shm_two_shot, before and
# after interleaved; the load average before each run logged
set -u
OUT=${OUT:-$PWD/stability-runs}   # from the repository root, with .before/ prepared (README)
mkdir -p "$OUT"
REPO=$PWD
export PYTHONUNBUFFERED=1
log=$OUT/log.txt
run() {  # version name args...
  local version=$1 name=$2; shift 2
  local code=$REPO; [ "$version" = before ] && code=$REPO/.before
  local t0=$(date +%s.%N)
  echo "$(date +%T) $version $name start load $(cut -d' ' -f1-3 /proc/loadavg)" >> $log
  # run from the code's own folder: `python -m` puts the current folder first on sys.path
  (cd $code && PYTHONPATH=$code python -m bench.cli sweep "$@" --out $OUT/$version-$name -q > $OUT/$version-$name.log 2>&1)
  local rc=$?
  echo "$(date +%T) $version $name rc=$rc wall $(echo "$(date +%s.%N) - $t0" | bc) s load $(cut -d' ' -f1-3 /proc/loadavg)" >> $log
}
for i in 1 2; do
  run before readme-$i --world-size 2
  run after readme-$i --world-size 2
done
for i in 1 2 3; do
  for ws in 2 4; do
    for version in before after; do
      run $version ws$ws-$i --world-size $ws --backends gloo,shm_one_shot,shm_two_shot
    done
  done
done
for i in 1 2 3; do
  run after r10-ws2-$i --world-size 2 --backends gloo,shm_one_shot,shm_two_shot --rounds 10
done
echo DONE >> $log
