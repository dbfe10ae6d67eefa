#!/usr/bin/env bash
# Train ShapesWorld v3 in the background on one CPU thread, stage after stage, resumably.
#
#   nohup scripts/train_shapesworld_v3.sh > runs/shapesworld-v3/chain.log 2>&1 &
#
# Stages: vae, base (grounded), words, the four LoRAs; each logs to RUNS/<stage>.out and its
# losses to RUNS/<stage>/log.jsonl. Killed, start it again: finished stages are skipped (their
# checkpoint is at the last step), the interrupted one resumes from its last checkpoint.
# Environment: RUNS (default runs/shapesworld-v3), PYTHON (default python), STEPS (every stage's
# step count, for smoke runs), CHECKPOINT_EVERY (default 250).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/shapesworld-v3}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$RUNS"
extra=(--world v3 --runs "$RUNS" --threads 1 --checkpoint-every "${CHECKPOINT_EVERY:-250}")
if [[ -n "${STEPS:-}" ]]; then extra+=(--steps "$STEPS"); fi
stage() {
    local name=$1
    shift
    echo "$(date -Is) start $name"
    nice -n 19 "$PYTHON" scripts/train_shapesworld.py "$@" "${extra[@]}" >"$RUNS/$name.out" 2>&1
    echo "$(date -Is) done $name"
}
stage vae vae
stage base base
stage words words
for word in zorblax quiffle blorp snerk; do
    stage "lora-$word" lora --word "$word"
done
echo "$(date -Is) all stages done"
