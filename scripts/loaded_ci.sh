#!/usr/bin/env bash
# The whole suite on clean clones, N times in a row, while busy loops keep every core busy:
# what a newcomer on a loaded machine sees (issue 25). Each run's log and a summary line land in OUT.
#
#   scripts/loaded_ci.sh [RUNS=3] [LOOPS=nproc] [OUT=/tmp/loaded-ci]
#
# The load is LOOPS shell busy loops at normal priority (`while :; do :; done`), started before
# the first clone and stopped when the last run ends; each run is `.ci/run` on a fresh `git clone`
# of this checkout's HEAD (set-up, lint and the full test command, slow tests included).
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
LOOPS=${LOOPS:-$(nproc)}
OUT=${OUT:-/tmp/loaded-ci}
mkdir -p "$OUT"
commit=$(git rev-parse --short HEAD)
loops=()
for _ in $(seq "$LOOPS"); do
    sh -c 'while :; do :; done' &
    loops+=($!)
done
trap 'kill "${loops[@]}" 2>/dev/null' EXIT
echo "$(date -Is) $commit: $RUNS runs under $LOOPS busy loops on $(nproc) cores" | tee -a "$OUT/summary.txt"
for run in $(seq "$RUNS"); do
    clone="$OUT/clone-$run"
    rm -rf "$clone"
    git clone -q . "$clone"
    tested=$(git -C "$clone" rev-parse --short HEAD)  # this checkout's HEAD now: commits made meanwhile count
    start=$(date +%s)
    (cd "$clone" && ./.ci/run) >"$OUT/run-$run.log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    result=$(grep -E '^=+ .*(passed|failed|error).* =+$' "$OUT/run-$run.log" | tail -1)
    echo "$(date -Is) run $run ($tested): exit $rc, ${took}s, $result" | tee -a "$OUT/summary.txt"
done
