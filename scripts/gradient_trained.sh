#!/bin/bash
# The gradient-fidelity tables of docs/findings.md ("Is the small-batch gradient biased ..."), on checkpoints of the
# small-batch regime study (scripts/study_fmnist.sh ... regime): each measurement is one `amorlip eval
# --gradient-fidelity` on all 60,000 training pairs, skipped once its JSON exists.
#
#   * CLIP's final checkpoint at batch 64, every objective from a fresh state warmed up on its frozen features;
#   * AmorLIP (plain) at batch 64 and 16, and FastCLIP-v3 at batch 64, each with its own trained state
#     (--gf-trained-state) from its last checkpoint before the final one, which lies inside an epoch (the final
#     one ends an epoch, where AmorLIP's nets are re-initialised), against CLIP's gradient on the same features.
#
# The checkpoints' places in their epochs differ (they were saved by the clock), so AmorLIP at batch 16 is measured
# on two seeds' checkpoints: early (seed 4) and late (seed 3) in an epoch.
#
# Usage: scripts/gradient_trained.sh RUNS OUT   (RUNS: the study's runs folder)
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: scripts/gradient_trained.sh RUNS OUT" >&2; exit 2; fi
RUNS=$1; OUT=$2; AMORLIP=${AMORLIP:-amorlip}
mkdir -p "$OUT"
git -C "$(dirname "$0")" rev-parse HEAD > "$OUT/COMMIT" 2>/dev/null || true

run_of() {  # the run folder of entry $1 at batch $2 for seed $3
  local d
  for d in "$RUNS/$1-s$3-"*; do
    if grep -q "^  batch_size: $2\$" "$d/config.yaml" 2>/dev/null; then echo "$d"; return; fi
  done
  echo "gradient_trained.sh: error: no run of $1 at batch $2, seed $3 under $RUNS" >&2; exit 2
}

measure() {  # NAME ENTRY BATCH SEED WHICH(final|inside) OBJECTIVES [eval options...]
  local name=$1 entry=$2 batch=$3 seed=$4 which=$5 objectives=$6 run ckpt
  shift 6
  run=$(run_of "$entry" "$batch" "$seed")
  if [ -s "$OUT/$name.json" ]; then echo "$name: done"; return; fi
  if [ "$which" = final ]; then ckpt=$(ls "$run"/checkpoints/step_*.pt | sort | tail -1)
  else ckpt=$(ls "$run"/checkpoints/step_*.pt | sort | tail -2 | head -1); fi
  echo "$name: $ckpt"
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $AMORLIP eval "$ckpt" --gradient-fidelity --gf-objectives "$objectives" \
    --gf-batch-sizes 16,64,256,1024 --gf-warmup 2 --gf-epochs 3 --device cpu --out "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
}

measure amorlip-b64-trained fmnist60k-amorlip 64 4 inside clip,amorlip --gf-trained-state
measure amorlip-b16-trained fmnist60k-amorlip 16 4 inside clip,amorlip --gf-trained-state
measure fastclip-b64-trained fmnist60k-fastclip 64 4 inside clip,fastclip --gf-trained-state
measure amorlip-b16-trained-s3 fmnist60k-amorlip 16 3 inside clip,amorlip --gf-trained-state
measure clip-b64-fresh fmnist60k-clip 64 4 final clip,sogclr,fastclip,amorlip,neuclip
