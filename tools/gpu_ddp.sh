#!/usr/bin/env bash
# Multi-GPU checks and timing of GPT-base SSD under DDP, in one call on a machine with NPROC (default 2) GPUs:
# the NCCL tests (two ranks against one; the captured DDP step against eager DDP, dense and SSD), then GPT-base SSD
# (embedded corpus) under torchrun, eager against the whole step captured (`train.cuda_graph=true`) and against
# per-block graphs (`train.cuda_graph=blocks`), ACCUM (default 1) micro-batches of 16 x 1024 per rank per step,
# 120 steps whose phases are dense 0-39, sparse 40-89, dense 90-119 (ssd.monitor_interval=20, ssd.threshold=0.0),
# timed per phase by tools/step_times.py (each segment's first 13 steps dropped: torch.compile, DDP's 11 eager
# iterations, the capture). Results in $OUT (default runs/gpu_ddp): nccl_tests.log, run_*.log, steps.json.
# NPROC=1 times the same three ways of stepping in one process (no NCCL tests).
#
#   tools/gpu_ddp.sh            # tests, then the three runs
#   tools/gpu_ddp.sh runs       # the runs only
#   NPROC=1 ACCUM=2 tools/gpu_ddp.sh
#
# Environment: OUT, NPROC, ACCUM, TRITON_ENV (a command prefix, e.g. from tools/carry_triton.sh unpack).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs/gpu_ddp}"
NPROC="${NPROC:-2}"
ACCUM="${ACCUM:-1}"
TRITON_ENV="${TRITON_ENV:-}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m ssd_megatron data build-default 2>&1 | tail -1
if [ "${1:-all}" != "runs" ] && [ "$NPROC" -gt 1 ]; then
  echo "== NCCL tests"
  timeout -k 5 300 $TRITON_ENV python3 -m pytest -q -rs -p no:cacheprovider tests/train/test_loop.py -k nccl \
    > "$OUT/nccl_tests.log" 2>&1
  tail -3 "$OUT/nccl_tests.log"
fi
run() {  # label, overrides...
  local label=$1; shift
  echo "== run $label"
  timeout -k 5 300 $TRITON_ENV python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    -m ssd_megatron train configs/gpt_base_ssd.yaml ssd.monitor_interval=20 ssd.threshold=0.0 train.max_steps=120 \
    train.global_batch_size=$((16 * NPROC * ACCUM)) train.micro_batch_size=16 train.eval_interval=100000 \
    checkpoint.interval=100000 logging.progress=false logging.report=false logging.tensorboard=false \
    parallel.backend=nccl parallel.data_parallel=ddp train.output_dir="$OUT/runs/$label" "$@" > "$OUT/run_$label.log" 2>&1
  echo "rc $?"; grep -i "error\|captures\|blocks\|Traceback" "$OUT/run_$label.log" | head -5
  rm -rf "$OUT/runs/$label/checkpoints"
}
run graph train.cuda_graph=true
run blocks train.cuda_graph=blocks
run eager train.cuda_graph=false
python3 tools/step_times.py eager="$OUT/runs/eager" graph="$OUT/runs/graph" blocks="$OUT/runs/blocks" --skip 13 \
  --out "$OUT/steps.json"
