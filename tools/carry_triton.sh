#!/usr/bin/env bash
# Time the expert kernels under another Triton than the GPU image's (3.6, pinned by its torch 2.11) without a
# new image: a Triton wheel (~290 MB) is over the device tool's 64 MiB carry, so `pack` trims one to what an
# NVIDIA sm_90 run needs and compresses it (3.9: ~56 MB), and `unpack` installs it beside the image's torch.
#
#   here:   bash tools/carry_triton.sh pack 3.9.0        -> .triton/{rest.tar.xz,libtriton.so.xz} (git-ignored)
#   there:  eval "$(bash tools/carry_triton.sh unpack)"  -> $TRITON_ENV, an `env ...` prefix for commands
#           $TRITON_ENV python -m ssd_megatron.bench ffn ...   (carry [".triton"] in the device call)
#
# Trimmed: the AMD backend, CUPTI and the profiler (proton), the pre-Hopper ptxas (3.9 compiles sm_90 with its
# ptxas-blackwell), the instrumentation library; libtriton.so is stripped of its debug sections (500 -> 192 MB).
# The image's own Triton stays installed: TRITON_BACKENDS_IN_TREE=1 makes the carried one find its backend by
# directory instead of the installed one's entry points. If the carried ptxas cannot build for the machine's
# driver, `unpack` falls back to the image's CUDA ptxas (checked by compiling and running one kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.triton
case "${1:-}" in
pack)
  ver=${2:?usage: carry_triton.sh pack VERSION}
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$tmp" "triton==$ver"
  (cd "$tmp" && unzip -q triton-*.whl && rm -rf triton/backends/amd triton/backends/nvidia/lib/cupti* \
     triton/backends/nvidia/bin/ptxas triton/instrumentation triton/_C/libproton.so \
   && strip --strip-unneeded triton/_C/libtriton.so)
  mkdir -p "$DIR"
  xz -9 -T0 -c "$tmp/triton/_C/libtriton.so" > "$DIR/libtriton.so.xz"
  rm "$tmp/triton/_C/libtriton.so"
  tar cf - -C "$tmp" triton | xz -9 -T0 > "$DIR/rest.tar.xz"
  rm -rf "$tmp"
  grep -qx "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >> .git/info/exclude
  du -sh "$DIR" >&2
  ;;
unpack)
  dest=/tmp/carried_triton
  mkdir -p "$dest"
  xz -dc "$DIR/rest.tar.xz" | tar xf - -C "$dest"
  xz -dc "$DIR/libtriton.so.xz" > "$dest/triton/_C/libtriton.so"
  chmod +x "$dest/triton/_C/libtriton.so"
  envs="env PYTHONPATH=$dest:$PWD TRITON_BACKENDS_IN_TREE=1 TRITON_DEFAULT_FP_FUSION=1 TRITON_CACHE_DIR=$dest.cache"
  check='import torch, triton, triton.language as tl
@triton.jit
def twice(X, B: tl.constexpr):
    i = tl.arange(0, B)
    tl.store(X + i, tl.load(X + i) * 2)
x = torch.ones(64, device="cuda")
twice[(1,)](x, B=64)
assert triton.__file__.startswith("'"$dest"'") and bool((x == 2).all()), triton.__file__'
  tmpf=$(mktemp --suffix=.py); echo "$check" > "$tmpf"  # (@triton.jit needs its source in a file)
  if ! $envs python3 "$tmpf" >&2; then
    envs="$envs TRITON_PTXAS_BLACKWELL_PATH=$(command -v ptxas)"
    $envs python3 "$tmpf" >&2
  fi
  rm -f "$tmpf"
  echo "export TRITON_ENV='$envs'"
  ;;
*)
  echo "usage: carry_triton.sh pack VERSION | unpack" >&2; exit 2 ;;
esac
