#!/usr/bin/env bash
# One device-tool call: install what the GPU machine lacks, run the GPU correctness tests of every
# expert backend, then `ssd-bench ffn`; a short table is printed last, JSON + logs land in $OUT.
#
#   device run (carry [".whl"]):  bash tools/gpu_bench.sh [ssd-bench ffn options...]
#   env: GPU_TESTS=0 skips the tests (GPU_TESTS_EXTRA="tests/train/test_step_graph.py ..." adds files);
#   BENCH=0 skips the benchmark; KERNELS=1 also times each kernel's tile variants
#   (tools/bench_kernels.py $KERNEL_ARGS -> kernels.json, e.g. KERNEL_ARGS="--launches fwd_pair,fwd_fused
#   --orders expert,token --shapes 8b"); STEP=1 also times the GPT-base training step,
#   dense and sparse, graphed: the defaults, the router fold off, the weights cast outside the backend,
#   the output's initialisation and bias inside the kernels, the forward unfused (ssd-bench step ->
#   step.json; STEP_ARGS replaces those options); OUT (default /tmp/ssd_gpu_bench).
#
# .whl/ (git-ignored) holds the prebuilt wheels for the device image (Python 3.12, torch 2.11+cu130):
#   mkdir -p .whl && cp ../shared/wheels/gpu-cp312-torch2.11-cu130/*.whl .whl/
# Other machines: build them with tools/build_megablocks.sh.
# .triton/ (git-ignored, tools/carry_triton.sh pack 3.9.0; carry [".whl", ".triton"]): everything then runs under
# that Triton instead of the image's 3.6, which the warp-specialised Gluon kernels need (`auto` takes them at base
# with Triton >= 3.9: docs/kernels.md v20-v23); CARRIED_TRITON=0 keeps the image's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ssd_gpu_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || echo "WARNING: wheel install failed; megablocks will be skipped"
fi

if [ "${CARRIED_TRITON:-1}" = "1" ] && [ -f .triton/rest.tar.xz ]; then
  if eval "$(bash tools/carry_triton.sh unpack 2>"$OUT/carry_triton.log")" && [ -n "${TRITON_ENV:-}" ]; then
    # (TRITON_ENV sets PYTHONPATH to the carried Triton and the repository: the wheels' /tmp/site goes after them)
    PY="$TRITON_ENV PYTHONPATH=/tmp/carried_triton:$PYTHONPATH $PY"
  else
    echo "WARNING: the carried Triton did not install (see $OUT/carry_triton.log); running the image's"
  fi
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0),
      "sm", torch.cuda.get_device_capability(0))
for mod in ("triton", "megablocks", "grouped_gemm", "stk"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "ok"))
    except Exception as exc:
        print(mod, "MISSING", type(exc).__name__, exc)
from ssd_megatron.ffn.backends import available_backends
print("available backends:", available_backends("cuda"))
PY
} 2>&1 | tee "$OUT/env.txt"

status=0
if [ "${GPU_TESTS:-1}" = "1" ]; then
  echo "== GPU correctness tests (tests/backends)"
  # shellcheck disable=SC2086
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -rs -n "${TEST_WORKERS:-8}" -p no:cacheprovider tests/backends/test_backends_gpu.py \
      tests/backends/test_reference_cpu.py tests/backends/test_column_sums.py tests/backends/test_score_grad.py \
      ${GPU_TESTS_EXTRA:-} 2>&1 | tee "$OUT/gpu_tests.log"
  status=${PIPESTATUS[0]}
  tail -n 3 "$OUT/gpu_tests.log" > "$OUT/gpu_tests_summary.txt"
fi

if [ "${KERNELS:-0}" = "1" ]; then
  echo "== tools/bench_kernels.py"
  # shellcheck disable=SC2086
  $PY tools/bench_kernels.py ${KERNEL_ARGS:-} --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
  [ "${PIPESTATUS[0]}" = "0" ] || status=1
fi

if [ "${BENCH:-1}" = "1" ]; then
  echo "== ssd-bench ffn $*"
  $PY -m ssd_megatron.bench ffn --out "$OUT/ffn.json" "$@" 2>&1 | tee "$OUT/bench.log"
  bstatus=${PIPESTATUS[0]}
  [ "$bstatus" = "0" ] || status=$bstatus
fi
if [ "${STEP:-0}" = "1" ]; then
  STEP_ARGS=${STEP_ARGS:---phase both --variant cuda-graph --variant cuda-graph+no-router-fold --variant cuda-graph+no-master-weights --variant cuda-graph+output-fold --variant cuda-graph+no-fused-forward --no-hf}
  echo "== ssd-bench step $STEP_ARGS"
  # shellcheck disable=SC2086
  $PY -m ssd_megatron.bench step $STEP_ARGS --out "$OUT/step.json" 2>&1 | tee "$OUT/step.log"
  [ "${PIPESTATUS[0]}" = "0" ] || status=1
fi
[ -f "$OUT/gpu_tests_summary.txt" ] && { echo "== tests:"; cat "$OUT/gpu_tests_summary.txt"; }
[ -f "$OUT/ffn.json" ] && $PY -c "
import json, sys
from ssd_megatron.bench.ffn import print_table
print_table(json.load(open('$OUT/ffn.json')))"
exit $status
