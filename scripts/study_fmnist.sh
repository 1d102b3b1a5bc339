#!/usr/bin/env bash
# The Fashion-MNIST study of docs/findings.md: every objective at batch 16, 64 and 256 with equal samples
# seen (about 10 epochs of 1,500 pairs), seeds 0-2, normalizer diagnostics at every evaluation; then CLIP and
# AmorLIP on 12,000 pairs with the same samples seen (1.3 epochs); then CLIP with cached-feature
# accumulation to batch 256 beside AmorLIP and CLIP at batch 32 on 1,500 pairs (equal steps: 8x the samples for CLIP).
# The ablation part varies one AmorLIP setting at a time (t_online, alpha, beta ramp, divide_by, reinit,
# dim_factor) at batch 16 and 64 with the main part's length; it reuses main's tiny-amorlip runs when present.
# The steps part runs CLIP and AmorLIP at batch 16, 64 and 256 with 240 steps each (equal steps, not samples).
# The regime part is the small-batch regime AmorLIP is for: all 60,000 pairs, batch 16 and 64 (0.03% and 0.1% of
# the data), 10 epochs, CLIP / AmorLIP (plain temperature) / AmorLIP (rescaled + rho) / FastCLIP-v3, seeds 0-4
# (SEEDS=0,1,...), the micro ViT (the fmnist60k-* presets). It runs one seed at a time (every entry and batch of
# seed 0, then seed 1, ...) so that a study cut short leaves complete seeds, then writes the tables of all seeds.
# About 90 core-minutes per seed; it resumes where it stopped when rerun. KEEP=DIR (e.g. results/fmnist60k-regime
# in the repository) keeps the finished runs' small files there after each seed and restores them first, so that
# a study spanning several machines or sessions skips what finished before (commit DIR to share it).
# The long part trains CLIP and AmorLIP (rescaled + rho) at batch 64 for 20 epochs of the 60,000 pairs (18,750
# steps, twice the regime part's length; evaluations every 1.4 epochs), seeds 0-2 (SEEDS=...), 2 runs at once;
# about 45 core-minutes per run. KEEP=DIR works as for the regime part.
# Needs Debian's dataset-fashion-mnist. Usage: scripts/study_fmnist.sh [JOBS] [PART...]  (parts: main size accum ablation steps regime long)
# Each part is one `amorlip compare`; rerunning skips finished runs, so parts can also run side by side.
# TABLES_ONLY=1 writes the tables and plots of the runs finished so far, training nothing.
set -euo pipefail
JOBS=${1:-2}; shift || true
PARTS=${*:-main size accum ablation steps regime long}
AMORLIP=${AMORLIP:-amorlip}
OUT=${OUT:-runs/study-fmnist}
DATA=(--data.source fashion-mnist --data.val-size 500 --data.eval-size 1000 --data.workers 0
      --eval.normalizers true --eval.normalizer-size 512 --train.threads 1)
LENGTH=(--train.batch-size 64 --train.steps 240 --train.eval-every 80 --train.log-every 10)
ALL='tiny-clip,tiny-clip[temperature.scheme=rescaled],tiny-siglip,tiny-sogclr,tiny-fastclip,tiny-amorlip,tiny-neuclip'
REGIME='fmnist60k-clip,fmnist60k-amorlip,fmnist60k-amorlip-rho,fmnist60k-fastclip'
LONG='fmnist60k-clip,fmnist60k-amorlip-rho'
ABLATION='tiny-amorlip,tiny-amorlip[amor.t_online=8],tiny-amorlip[amor.alpha=0.999],tiny-amorlip[amor.beta_decay_epochs=8],tiny-amorlip[amor.divide_by=target],tiny-amorlip[amor.reinit=warm],tiny-amorlip[amor.dim_factor=2]'
for part in $PARTS; do  # every part is checked before any runs
  case $part in main|size|accum|ablation|steps|regime|long) ;; *) echo "study_fmnist.sh: error: unknown part $part (main, size, accum, ablation, steps, regime, long)" >&2; exit 2 ;; esac
done
reuse_main() {  # reuse_main PART ENTRY...: copy main's runs of these entries (the stale-config check reuses the equal ones)
  local part=$1 entry run; shift
  mkdir -p "$OUT/$part/runs"
  for entry in "$@"; do
    for run in "$OUT"/main/runs/"$entry"-s*; do
      [ -d "$run" ] && [ ! -e "$OUT/$part/runs/${run##*/}" ] && cp -r "$run" "$OUT/$part/runs/"
    done
  done
  return 0
}
keep() {  # keep FROM TO: copy the small files of every finished run (config.yaml, summary.json, metrics.jsonl;
  # no checkpoints) from FROM/runs to TO/runs, newer files only: what a rerun needs to skip the run and to table it
  local from=$1 to=$2 run f
  for run in "$from"/runs/*/; do
    [ -f "$run/summary.json" ] || continue
    mkdir -p "$to/runs/$(basename "$run")"
    for f in config.yaml summary.json metrics.jsonl; do cp -u "$run/$f" "$to/runs/$(basename "$run")/$f"; done
  done
  return 0
}
kept_study() {  # kept_study PART ALL BATCH...: restore KEEP's runs into OUT/PART (the runs finished in earlier
  # sessions are then skipped); run the function PART with --seeds BATCH for each batch, copying the finished runs
  # to KEEP after each; then the tables of the seeds ALL
  local part=$1 all=$2 batch; shift 2
  if [ -n "${KEEP:-}" ]; then keep "$KEEP" "$OUT/$part"; fi
  if [ -z "${TABLES_ONLY:-}" ]; then
    for batch in "$@"; do
      "$part" --seeds "$batch"
      if [ -n "${KEEP:-}" ]; then keep "$OUT/$part" "$KEEP"; fi
    done
  fi
  "$part" --seeds "$all" --tables-only
}
for part in $PARTS; do
  case $part in
    main)   # (a) and (b): all objectives, three batch sizes, equal samples seen
      # OBJECTIVES=... REFERENCE= runs a subset (the runs are then reused by the full command)
      $AMORLIP compare --objectives "${OBJECTIVES:-$ALL}" --seeds 0,1,2 ${REFERENCE---reference tiny-clip} ${TABLES_ONLY:+--tables-only} --jobs "$JOBS" \
        "${DATA[@]}" "${LENGTH[@]}" --data.dataset-size 1500 \
        --sweep train.batch_size=16,64,256 --budget samples --out "$OUT/main" ;;
    size)   # 12,000 pairs at the same samples seen (1.3 epochs instead of 10): fewer repeats of each pair
      $AMORLIP compare --objectives 'tiny-clip,tiny-amorlip' ${TABLES_ONLY:+--tables-only} --seeds 0,1,2 \
        --reference tiny-clip --jobs "$JOBS" "${DATA[@]}" "${LENGTH[@]}" --data.dataset-size 12000 \
        --sweep train.batch_size=16,256 --budget samples --out "$OUT/size" ;;
    accum)  # CLIP at an effective batch of 256 (8 micro-batches of 32) beside AmorLIP and CLIP at 32, equal steps
      $AMORLIP compare --objectives 'tiny-clip,tiny-amorlip,tiny-clip[train.accum_steps=8,train.batch_size=256]' \
        ${TABLES_ONLY:+--tables-only} --seeds 0,1,2 --reference tiny-clip --jobs "$JOBS" "${DATA[@]}" \
        --data.dataset-size 1500 --train.batch-size 32 --train.steps 100 --train.eval-every 50 --train.log-every 10 --out "$OUT/accum" ;;
    ablation)  # (c): one AmorLIP setting changed at a time, paired against the preset
      reuse_main ablation tiny-amorlip
      $AMORLIP compare --objectives "${OBJECTIVES:-$ABLATION}" ${TABLES_ONLY:+--tables-only} --seeds 0,1,2 --reference tiny-amorlip --jobs "$JOBS" \
        "${DATA[@]}" "${LENGTH[@]}" --data.dataset-size 1500 \
        --sweep train.batch_size=16,64 --budget samples --out "$OUT/ablation" ;;
    steps)  # (a) at equal steps instead: a larger batch also sees more samples (more epochs)
      reuse_main steps tiny-clip tiny-amorlip
      $AMORLIP compare --objectives 'tiny-clip,tiny-amorlip' ${TABLES_ONLY:+--tables-only} --seeds 0,1,2 \
        --reference tiny-clip --jobs "$JOBS" "${DATA[@]}" "${LENGTH[@]}" --data.dataset-size 1500 \
        --sweep train.batch_size=16,64,256 --budget steps --out "$OUT/steps" ;;
    regime)  # the small-batch regime: 60,000 pairs, batch 16 and 64, 10 epochs, one seed at a time, then all seeds' tables
      regime() { $AMORLIP compare --objectives "${OBJECTIVES:-$REGIME}" --reference fmnist60k-clip --jobs "$JOBS" \
                   --sweep train.batch_size=16,64 --budget samples --out "$OUT/regime" "$@"; }
      seeds=${SEEDS:-0,1,2,3,4}
      kept_study regime "$seeds" ${seeds//,/ } ;;
    long)  # twice the regime part's length at batch 64: does AmorLIP catch up with CLIP given more steps?
      long() { $AMORLIP compare --objectives "${OBJECTIVES:-$LONG}" --reference fmnist60k-clip --jobs "$JOBS" \
                 --train.steps 18750 --train.eval-every 1312 --out "$OUT/long" "$@"; }
      seeds=${SEEDS:-0,1,2}
      kept_study long "$seeds" "$seeds" ;;
  esac
done
