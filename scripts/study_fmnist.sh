#!/usr/bin/env bash
# The Fashion-MNIST study of docs/findings.md: every objective at batch 16, 64 and 256 with equal samples
# seen (about 10 epochs of 1,500 pairs), seeds 0-2, normalizer diagnostics at every evaluation; then CLIP and
# AmorLIP on 12,000 pairs with the same samples seen (1.3 epochs); then CLIP with cached-feature
# accumulation to batch 256 beside AmorLIP and CLIP at batch 32 on 1,500 pairs (equal steps: 8x the samples for CLIP).
# Needs Debian's dataset-fashion-mnist. Usage: scripts/study_fmnist.sh [JOBS] [PART...]  (parts: main size accum)
# Each part is one `amorlip compare`; rerunning skips finished runs, so parts can also run side by side.
set -euo pipefail
JOBS=${1:-2}; shift || true
PARTS=${*:-main size accum}
AMORLIP=${AMORLIP:-amorlip}
OUT=${OUT:-runs/study-fmnist}
DATA=(--data.source fashion-mnist --data.val-size 500 --data.eval-size 1000 --data.workers 0
      --eval.normalizers true --eval.normalizer-size 512 --train.threads 1)
LENGTH=(--train.batch-size 64 --train.steps 240 --train.eval-every 80 --train.log-every 10)
ALL='tiny-clip,tiny-clip[temperature.scheme=rescaled],tiny-siglip,tiny-sogclr,tiny-fastclip,tiny-amorlip,tiny-neuclip'
for part in $PARTS; do
  case $part in
    main)   # (a) and (b): all objectives, three batch sizes, equal samples seen
      # OBJECTIVES=... REFERENCE= runs a subset (the runs are then reused by the full command)
      $AMORLIP compare --objectives "${OBJECTIVES:-$ALL}" --seeds 0,1,2 ${REFERENCE---reference tiny-clip} --jobs "$JOBS" \
        "${DATA[@]}" "${LENGTH[@]}" --data.dataset-size 1500 \
        --sweep train.batch_size=16,64,256 --budget samples --out "$OUT/main" ;;
    size)   # 12,000 pairs at the same samples seen (1.3 epochs instead of 10): fewer repeats of each pair
      $AMORLIP compare --objectives 'tiny-clip,tiny-amorlip' --seeds 0,1,2 --reference tiny-clip \
        --jobs "$JOBS" "${DATA[@]}" "${LENGTH[@]}" --data.dataset-size 12000 \
        --sweep train.batch_size=16,256 --budget samples --out "$OUT/size" ;;
    accum)  # CLIP at an effective batch of 256 (8 micro-batches of 32) beside AmorLIP and CLIP at 32, equal steps
      $AMORLIP compare --objectives 'tiny-clip,tiny-amorlip,tiny-clip[train.accum_steps=8,train.batch_size=256]' \
        --seeds 0,1,2 --reference tiny-clip --jobs "$JOBS" "${DATA[@]}" --data.dataset-size 1500 \
        --train.batch-size 32 --train.steps 100 --train.eval-every 50 --train.log-every 10 --out "$OUT/accum" ;;
    *) echo "unknown part $part (main, size, accum)" >&2; exit 2 ;;
  esac
done
