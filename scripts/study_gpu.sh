#!/usr/bin/env bash
# The small-batch regime study of docs/findings.md on one CUDA GPU, sized to the time a GPU is lent: at most 8
# minutes on one H200, start-up included. The fmnist60k-* presets (all 60,000 Fashion-MNIST pairs, micro ViT,
# 10 epochs, equal samples at every batch size), CLIP / AmorLIP (plain) / AmorLIP (rescaled + rho) / FastCLIP-v3,
# one seed at a time (all entries and batch sizes of seed 0, then seed 1, ...), JOBS runs at once on the one GPU.
#   scripts/study_gpu.sh [JOBS] [OUT]        e.g. scripts/study_gpu.sh 8 runs/study-gpu
# The time budget is checked by the script: BUDGET_S (default 420) seconds after it started, the running compare
# gets SIGTERM, so every running run saves a checkpoint and stops, and no new run starts; every finished run
# stands on its own (its metrics and summary), and the next call resumes the stopped ones and skips the finished
# ones. The tables of everything finished so far are written at the end (allow ~30 s after the budget). The
# script exits 0 when it stayed within BUDGET_S + GRACE_S (default 60), 3 when it did not.
# Environment: OBJECTIVES (entries), SEEDS (0,1,2), BATCHES (256,1024), DEVICE (cuda), PRECISION (amp_bf16),
# WORKERS (loader processes per run, 2), AMORLIP (the command), EXTRA (more compare words, last: they override the
# ones here), BUDGET_S, GRACE_S.
set -uo pipefail
JOBS=${1:-8}
OUT=${2:-runs/study-gpu}
AMORLIP=${AMORLIP:-amorlip}
BUDGET_S=${BUDGET_S:-420}
GRACE_S=${GRACE_S:-60}
ALL='fmnist60k-clip,fmnist60k-amorlip,fmnist60k-amorlip-rho,fmnist60k-fastclip'
SEEDS=${SEEDS:-0,1,2}
start=$SECONDS
REFERENCE=$(echo "${OBJECTIVES:-$ALL}" | cut -d, -f1)
# shellcheck disable=SC2206
STUDY=($AMORLIP compare --objectives "${OBJECTIVES:-$ALL}" --reference "$REFERENCE" --jobs "$JOBS"
       --train.device "${DEVICE:-cuda}" --model.precision "${PRECISION:-amp_bf16}" --train.threads 0
       --data.workers "${WORKERS:-2}" --train.checkpoint-minutes 1 --train.progress false
       --sweep "train.batch_size=${BATCHES:-256,1024}" --budget samples --out "$OUT")
stopped=""
for seed in ${SEEDS//,/ }; do
  left=$((BUDGET_S - (SECONDS - start)))
  if [ "$left" -le 0 ]; then stopped="before seed $seed"; break; fi
  echo "study_gpu.sh: seed $seed, $left s of the budget left"
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=90 "$left" "${STUDY[@]}" --seeds "$seed" ${EXTRA:-}
  rc=$?
  if [ "$rc" -eq 124 ]; then stopped="during seed $seed"; break; fi
  if [ "$rc" -ne 0 ]; then echo "study_gpu.sh: the compare of seed $seed exited $rc" >&2; fi
done
# shellcheck disable=SC2086
"${STUDY[@]}" --seeds "$SEEDS" --tables-only ${EXTRA:-} > "$OUT.tables.log" 2>&1 || echo "study_gpu.sh: writing the tables failed (see $OUT.tables.log)" >&2
tail -n 30 "$OUT.tables.log"
used=$((SECONDS - start))
if [ -n "$stopped" ]; then
  echo "study_gpu.sh: the budget of $BUDGET_S s ran out $stopped: running runs saved a checkpoint; rerun to resume"
fi
echo "study_gpu.sh: used $used s of a budget of $BUDGET_S s (+ $GRACE_S s grace)"
if [ "$used" -gt $((BUDGET_S + GRACE_S)) ]; then
  echo "study_gpu.sh: error: over the time budget ($used s > $BUDGET_S + $GRACE_S s)" >&2
  exit 3
fi
