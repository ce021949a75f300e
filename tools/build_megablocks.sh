#!/usr/bin/env bash
# Build MegaBlocks 0.10.0 + grouped_gemm 0.3.0 (+ stanford-stk) wheels from their sdists for the local
# torch/CUDA, for the optional `megablocks` expert backend. Run on a machine with nvcc matching
# torch.version.cuda (e.g. the device tool's image: torch 2.11 + CUDA 13). ~1.5 min each on 16 cores.
#
#   tools/build_megablocks.sh [SDIST_DIR] [WHEEL_DIR]
#     SDIST_DIR  holds megablocks-0.10.0.tar.gz, grouped_gemm-0.3.0.tar.gz, stanford_stk-0.7.1 (sdist or
#                wheel); fetched with `pip download` when missing (needs network: the device machines have
#                none, so download here and carry the folder).
#     WHEEL_DIR  where the wheels go (default .whl/, git-ignored); install them with
#                pip install --no-deps --no-index WHEEL_DIR/*.whl
#   env: TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default: nproc), GROUPED_GEMM_CUTLASS=1 for the
#        CUTLASS (sm80) grouped kernel instead of the default cuBLAS loop.
#
# Fixes applied (see ../shared/research/moe_kernels.md §2):
#   * CUDA 13 (CCCL 3) removed CUB's `debug_synchronous` argument: drop it from the two
#     cub::DeviceScan calls in megablocks' csrc/cumsum.h (databricks/megablocks#180).
#   * Both packages pin torch 2.7 at build time: build with --no-build-isolation against the installed
#     torch and --no-deps so pip never replaces it.
set -euo pipefail
SDIST_DIR=$(realpath -m "${1:-/tmp/megablocks_sdists}")
WHEEL_DIR=$(realpath -m "${2:-.whl}")
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$SDIST_DIR" "$WHEEL_DIR"

$PY -c "import torch; assert torch.version.cuda, 'needs a CUDA build of torch'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
command -v nvcc >/dev/null || { echo "nvcc not found (set CUDA_HOME / PATH)"; exit 1; }
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
$PY -m pip --version >/dev/null

fetch() {  # name==version -> sdist in SDIST_DIR
  local spec=$1 pat=$2
  if ! compgen -G "$SDIST_DIR/$pat" >/dev/null; then
    $PY -m pip download --no-deps --no-binary :all: -d "$SDIST_DIR" "$spec"
  fi
}
fetch megablocks==0.10.0 'megablocks-0.10.0.tar.gz'
fetch grouped_gemm==0.3.0 'grouped_gemm-0.3.0.tar.gz'
if ! compgen -G "$SDIST_DIR/stanford_stk-0.7.1*" >/dev/null && ! compgen -G "$SDIST_DIR/stanford-stk-0.7.1*" >/dev/null; then
  $PY -m pip download --no-deps -d "$SDIST_DIR" stanford-stk==0.7.1
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
tar -xzf "$SDIST_DIR/megablocks-0.10.0.tar.gz" -C "$WORK"
CUMSUM="$WORK/megablocks-0.10.0/csrc/cumsum.h"
# `..., stream,\n   debug_synchronous));` -> `..., stream));` (both CUB calls)
$PY - "$CUMSUM" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
s2, n = re.subn(r"stream,\s*debug_synchronous\)\)", "stream))", s)
if n == 0 and "debug_synchronous))" in s:
    sys.exit("cumsum.h: could not patch the debug_synchronous calls")
open(p, "w").write(s2)
print(f"patched {n} CUB call(s) in {p}")
PY

$PY -m pip wheel --no-deps --no-build-isolation -w "$WHEEL_DIR" "$SDIST_DIR/grouped_gemm-0.3.0.tar.gz"
$PY -m pip wheel --no-deps --no-build-isolation -w "$WHEEL_DIR" "$WORK/megablocks-0.10.0"
for f in "$SDIST_DIR"/stanford_stk-0.7.1* "$SDIST_DIR"/stanford-stk-0.7.1*; do
  [ -e "$f" ] || continue
  case "$f" in *.whl) cp "$f" "$WHEEL_DIR/" ;; *) $PY -m pip wheel --no-deps --no-build-isolation -w "$WHEEL_DIR" "$f" ;; esac
  break
done
ls -l "$WHEEL_DIR"
echo "install: $PY -m pip install --no-deps --no-index $WHEEL_DIR/*.whl"
