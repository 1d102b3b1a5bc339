#!/usr/bin/env bash
# The Fashion-MNIST study of docs/findings.md at a larger scale, for one CUDA GPU (about 40-60 minutes on one
# recent data-centre GPU, estimated, not yet measured): all 60,000 training pairs, batch 64 to 4096 at equal samples
# seen (10 epochs), every objective, seeds 0-2, normalizer diagnostics at every evaluation, 4 runs at once on
# the one GPU (the tiny model leaves it mostly idle otherwise).
#   scripts/study_gpu.sh [JOBS] [OUT]        e.g. scripts/study_gpu.sh 4 runs/study-gpu
# Rerunning skips finished runs (and resumes interrupted ones), so it can be stopped and started again.
# Environment: OBJECTIVES (entries), SEEDS (0,1,2), BATCHES (64,256,1024,4096), DEVICE (cuda), PRECISION
# (amp_bf16), AMORLIP (the command), EXTRA (more compare words, last: they override the ones here).
set -euo pipefail
JOBS=${1:-4}
OUT=${2:-runs/study-gpu}
AMORLIP=${AMORLIP:-amorlip}
ALL='tiny-clip,tiny-clip[temperature.scheme=rescaled],tiny-siglip,tiny-sogclr,tiny-fastclip,tiny-amorlip,tiny-neuclip'
# base: batch 256 for 2,344 steps = 600,064 samples = 10 epochs of 60,000; the other batch sizes get the same
# samples (--budget samples scales the steps, the warm-up and the evaluation points).
$AMORLIP compare --objectives "${OBJECTIVES:-$ALL}" --seeds "${SEEDS:-0,1,2}" --reference tiny-clip --jobs "$JOBS" \
  --train.device ${DEVICE:-cuda} --model.precision ${PRECISION:-amp_bf16} --train.threads 0 \
  --data.source fashion-mnist --data.dataset-size 60000 --data.val-size 1000 --data.eval-size 2000 --data.workers 2 \
  --eval.normalizers true --eval.normalizer-size 2048 \
  --train.batch-size 256 --train.steps 2344 --train.eval-every 586 --train.log-every 50 --train.checkpoint-every 1000 \
  --sweep "train.batch_size=${BATCHES:-64,256,1024,4096}" --budget samples --out "$OUT" ${EXTRA:-}
