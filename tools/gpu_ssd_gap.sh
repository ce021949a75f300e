#!/usr/bin/env bash
# SSD vs dense final perplexity (issue 4's quality check) under several LR schedules in one device call:
# one corpus, then for every schedule a dense and an SSD run of tools/experiment.py, all runs at once on
# the one GPU (a 6 x 384 GPT leaves an H100 mostly idle, so four processes share it well; their wall
# times are therefore not comparable with each other, only perplexities and FLOPs are), then one
# report per schedule. Results land in $OUT/<schedule>/ (results.json, compare.md, figures, logs).
#
#   STEPS=3000 SCHEDULES="noam cosine" tools/gpu_ssd_gap.sh
#   PRESET=tiny STEPS=30 tools/gpu_ssd_gap.sh          # CPU smoke test of the same pipeline
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs/ssd_gap/out}"
PRESET="${PRESET:-gpu}"
STEPS="${STEPS:-3000}"
SCHEDULES="${SCHEDULES:-noam cosine}"
DEADLINE_MIN="${DEADLINE_MIN:-9.0}"
WORK="${WORK:-runs/ssd_gap}"
mkdir -p "$OUT" "$WORK"
exp() { python3 tools/experiment.py --preset "$PRESET" --steps "$STEPS" --no-sweep "$@"; }
{
  echo "# $(date -u +%FT%TZ) gpu_ssd_gap.sh preset $PRESET steps $STEPS schedules $SCHEDULES"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  exp --work "$WORK/data_build" --stages data
  pids=()
  for s in $SCHEDULES; do
    mkdir -p "$WORK/$s"
    rm -rf "$WORK/$s/data" && cp -r "$WORK/data_build/data" "$WORK/$s/data"
    for m in dense ssd; do
      exp --work "$WORK/$s" --schedule "$s" --stages "$m" --deadline-minutes "$DEADLINE_MIN" \
        > "$OUT/${s}_${m}.log" 2>&1 &
      pids+=($!)
    done
  done
  status=0
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  for s in $SCHEDULES; do
    exp --work "$WORK/$s" --schedule "$s" --stages report --out "$OUT/$s" || status=1
    cp "$WORK/$s/runs/ssd/report/report.md" "$OUT/$s/ssd_report.md" 2>/dev/null || true
    cp "$WORK/$s/runs/ssd/report/ppl_phases.png" "$OUT/$s/" 2>/dev/null || true
  done
  exit $status
} 2>&1 | tee -a "$OUT/ssd_gap.log"
