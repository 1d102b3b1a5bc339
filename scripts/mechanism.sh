#!/usr/bin/env bash
# The mechanism measurements of docs/findings.md on one trained run (its frozen features):
#   1. can the amortiser learn log Z at all? `amorlip bench amortizer` (Stage I alone, R2 against the exact
#      full-data log Z after 100 ... 20,000 Stage-I calls) over arch and lr, then f_d, re-initialisation and
#      targets, then a large Stage-I batch;
#   2. is the small-batch gradient biased, and does each objective remove the bias? `amorlip eval RUN
#      --gradient-fidelity` at batch 16 ... 1024.
# Usage: scripts/mechanism.sh RUN [OUT]   e.g. scripts/mechanism.sh runs/study-fmnist/regime/runs/fmnist60k-clip-s0-8685b5b9
# Each step writes its JSON under OUT (default runs/mechanism) and is skipped when that JSON exists. One thread.
set -euo pipefail
RUN=${1:?usage: scripts/mechanism.sh RUN [OUT]}
OUT=${2:-runs/mechanism}
AMORLIP=${AMORLIP:-amorlip}
mkdir -p "$OUT"
step() {  # step NAME CMD...: run CMD unless OUT/NAME.json exists; its output goes to OUT/NAME.log
  local name=$1; shift
  if [ -f "$OUT/$name.json" ]; then echo "mechanism.sh: $name done earlier"; return 0; fi
  echo "mechanism.sh: $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  tail -n 20 "$OUT/$name.log"
}
# shellcheck disable=SC2086
step amortizer_long $AMORLIP bench amortizer --run "$RUN" --threads 1 --no-progress \
  --steps 100,300,1000,3000,10000,20000 --arch mlp,residual --lr 1e-3,1e-2 --batch 64 --json "$OUT/amortizer_long.json"
# shellcheck disable=SC2086
step amortizer_grid $AMORLIP bench amortizer --run "$RUN" --threads 1 --no-progress \
  --steps 100,277,1000,3000 --dim-factor 0.5,2 --batch 64 --reinit-every 0,277 --targets batch,exact \
  --json "$OUT/amortizer_grid.json"
# shellcheck disable=SC2086
step amortizer_batch $AMORLIP bench amortizer --run "$RUN" --threads 1 --no-progress \
  --steps 100,300,1000,3000 --batch 1024 --json "$OUT/amortizer_batch.json"
# shellcheck disable=SC2086
step gradient_fidelity $AMORLIP eval "$RUN" --gradient-fidelity --gf-batch-sizes 16,64,256,1024 --gf-warmup 2 \
  --gf-epochs 3 --device cpu --out "$OUT/gradient_fidelity.json"
