#!/usr/bin/env bash
# One device-tool call: the GPU measurements the dense-training and SSD issues quote.
#   1. clustering of the base model's 12 FFN layers on the GPU (SSD monitor cost);
#   2. `ssd-bench step`: dense GPT-base training step, ours vs HF GPT2LMHeadModel (compiled, bf16),
#      and our sparse-phase step (N=32, K=6), tokens/s and MFU, side by side in one run.
# JSON and logs land in $OUT; a short table is printed last.
#   device run:  bash tools/gpu_evidence.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ssd_gpu_evidence}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"

echo "== clustering on GPU"
timeout "${CLUSTER_TIMEOUT:-150}" $PY tools/bench_clustering.py --device cuda --sizes base,large --backends torch \
  --out "$OUT/clustering_gpu.json" 2>&1 | tee "$OUT/clustering.log" | tail -n 25

echo "== training step: dense (ours vs HF) and sparse phase"
timeout "${STEP_TIMEOUT:-420}" $PY -m ssd_megatron.bench.step --phase both --backend "${BACKEND:-auto}" \
  --steps "${STEPS:-20}" --out "$OUT/step.json" 2>&1 | tee "$OUT/step.log" | tail -n 12
