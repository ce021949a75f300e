#!/usr/bin/env bash
# The five-method comparison (Dense, SSD, SMoE, MoE-Dropout, PLD) on one GPU: a 6-layer GPT on the
# Python sources installed on the machine, same tokens for every method. See tools/experiment.py and
# docs/baselines.md. Results (results.json, compare.md, fig3/fig4a PNGs, metrics_all.json,
# experiment.log) land in $OUT (default runs/experiment_gpu/out).
#
#   tools/gpu_experiment.sh                       # everything, cut to fit DEADLINE_MIN minutes (9.3)
#   tools/gpu_experiment.sh data dense ssd        # or in parts on one machine (work dir runs/experiment_gpu
#   tools/gpu_experiment.sh smoe moe_dropout pld report   #  is reused; finished stages are skipped)
#
# Environment: OUT, DEADLINE_MIN (0 = no deadline), EXPERIMENT_ARGS (extra flags, e.g. "--steps 3000"
# or "--compile" or "--backend grouped_mm").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs/experiment_gpu/out}"
mkdir -p "$OUT"
DEADLINE_MIN="${DEADLINE_MIN:-9.3}"
deadline=()
if [ "$DEADLINE_MIN" != "0" ]; then deadline=(--deadline-minutes "$DEADLINE_MIN"); fi
{
  echo "# $(date -u +%FT%TZ) gpu_experiment.sh $*"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, sentencepiece, yaml, matplotlib; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
} 2>&1 | tee -a "$OUT/experiment.log"
# shellcheck disable=SC2086
python3 tools/experiment.py --preset gpu --out "$OUT" "${deadline[@]}" --stages "${@:-all}" ${EXPERIMENT_ARGS:-} \
  2>&1 | tee -a "$OUT/experiment.log"
