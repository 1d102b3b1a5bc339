#!/usr/bin/env bash
# Runs the GPU paths end to end and the efficiency benchmarks on one CUDA device; writes logs and JSON to $1.
#   bash scripts/gpu_check.sh OUTDIR [smoke|bench|tests]
# smoke: a short bf16 training run with evaluation, bench loss at B=4096 d=512, a small bench overhead.
# bench: bench overhead on RN50 (the paper's Table 2 setting, batch 256: three side-by-side processes must fit
#        on one GPU) and bench throughput against open_clip's trainer on ViT-B-32.
# tests: the test suite with the GPU visible (training tests then run on CUDA).
# AMORLIP (default: amorlip) is the command to run, e.g. AMORLIP="python3 -m amorlip.cli".
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR [smoke|bench|tests]}; what=${2:-smoke}
mkdir -p "$out"
AMORLIP=${AMORLIP:-amorlip}
export PYTHONUNBUFFERED=1
step() {  # step NAME TIMEOUT_S CMD...: run one command with a time limit, log it, never stop the script
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1; local rc=$?
  tail -n 25 "$out/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
}
nvidia-smi -L
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__, torch.cuda.get_device_name())"
case $what in
smoke)
  rm -rf "${TMPDIR:-/tmp}/gpu-check-runs/gpu-demo"
  step train 150 $AMORLIP train --config tiny-demo --train.name gpu-demo --train.output_dir "${TMPDIR:-/tmp}/gpu-check-runs" --train.steps 300 \
       --train.eval_every 150 --model.precision bf16 --train.progress false
  cp "${TMPDIR:-/tmp}/gpu-check-runs/gpu-demo/summary.json" "$out/train_summary.json"
  step loss 150 $AMORLIP bench loss --no-progress --json "$out/loss.json"
  step overhead_small 150 $AMORLIP bench overhead --model tiny-vit --batch-size 256 --objectives clip,amorlip \
       --t-online 1,8 --aa --no-progress --json "$out/overhead_small.json"
  ;;
bench)
  step overhead_rn50 280 $AMORLIP bench overhead --model RN50 --batch-size 256 --precision bf16 \
       --objectives clip,amorlip --t-online 1,8 --no-progress --json "$out/overhead_rn50.json"
  step throughput 250 $AMORLIP bench throughput --model ViT-B-32 --batch-size 256 --precision bf16 --workers 8 \
       --steps 60 --repeats 2 --no-progress --json "$out/throughput.json"
  ;;
tests)
  skip=""  # the DataComp / clip_benchmark tests need clip_benchmark installed
  python3 -c "import clip_benchmark" 2>/dev/null || skip="not clip_benchmark and not datacomp"
  step tests 420 python3 -m pytest -q ${skip:+-k "$skip"} tests
  ;;
esac
