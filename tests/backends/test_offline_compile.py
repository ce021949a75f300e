"""Every kernel of the `triton` expert backend, and one config of each kernel variant, compiles for
sm_90 (H100/H200), and every default launch for sm_80 (A100), on this machine without a GPU:
tools/compile_report.py runs the real launchers on CPU tensors with a stand-in driver, so CI catches what
the interpreter cannot (layouts, register allocation, Hopper's wgmma/TMA lowering, A100's mma.sync and
which atomics it has). The device image's own Triton version is used for the numbers
in benchmarks/results; here it is whatever CI installed, so only compilation and the Hopper instructions
are checked, never register or spill counts.
"""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "compile_report.py")


def _report(*args, env_extra=None):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernels are compiled and run by test_backends_gpu.py")
    ptxas = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton build has no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    shapes = () if "--shapes" in args else ("--shapes", "tiny")
    out = subprocess.run([sys.executable, TOOL, *shapes, "--tokens", "512", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    header = [i for i, ln in enumerate(out.stdout.splitlines()) if ln.startswith("shape")][0]
    return [ln.split() for ln in out.stdout.splitlines()[header + 1:] if ln.strip()]


LAUNCHES = ["up", "down", "up_bwd", "wgrad_dw2", "wgrad_dw1", "down_dx", "wgrad_dw1_fold", "wgrad_dw1_foldrows",
            "wgrad_dw2_f32", "wgrad_dw1_f32", "down_dx_fold", "fwd_pair", "fwd_pair_fold", "bwd_pair", "bwd_pair_fold", "fwd_fused"]  # (bench_kernels' `fill` is a torch op)


def _check(rows, expect_launches, mma="64x"):
    """rows: shape act launch config... kernel regs stack smem warps ctas LDGSTS UTMALDG atom cas mma.
    mma: Hopper's wgmma (HGMMA 64xNx16), or A100's mma.sync (HMMA 16816)."""
    assert rows, "no launch was compiled"
    assert {r[2] for r in rows} == set(expect_launches)
    gemms = {}  # (launch, config) -> whether one of its kernels multiplies (a two-pass up_bwd's second does not)
    for r in rows:
        key = (r[2], " ".join(r[3:-11]))
        gemms[key] = gemms.get(key, False) or r[-1].startswith(mma)
        assert int(r[-2]) == 0, f"a compare-and-swap loop (an atomic add the GPU lacks) in {r}"
        if r[-11] == "_down_tma_kernel":
            assert int(r[-4]) > 0 and int(r[-5]) == 0, f"the TMA variant does not load through TMA: {r}"
    assert all(gemms.values()), f"no {mma} matrix instructions in {[k for k, v in gemms.items() if not v]}"
    return {r[-11] for r in rows}


def test_relu_launches_and_variants_compile_for_sm90():
    kernels = _check(_report("--activations", "relu", "--variants", "one"), LAUNCHES)
    assert kernels == {"_up_kernel", "_down_kernel", "_down_tma_kernel", "_wgrad_kernel", "_mlp_kernel"}


def test_wide_programs_compile_for_sm90():
    """Session 19's wider programs where E = 192 is not a power of two (base shape): whole-E up and up_bwd
    (128 + 64 columns), the two-pass up_bwd, whole-P wgrad (two accumulators) and STAGED down over a
    192-deep (128 + 64) reduction."""
    rows = _report("--shapes", "base", "--launches", "up,up_bwd,down_dx,wgrad_dw1", "--configs",
                   "up_bwd=64,256,64,8,3|128,256,64,8,3,1;wgrad=256,128,64,8,3;down=64,64,64,4,2,4")
    kernels = _check(rows, ["up", "up_bwd", "down_dx", "wgrad_dw1"])
    assert kernels == {"_up_kernel", "_down_kernel", "_down_tma_kernel", "_wgrad_kernel"}
    two_tile = [r for r in rows if r[-1] == "64x128x16,64x64x16" or r[-1] == "64x32x16,64x64x16"]
    assert {r[2] for r in two_tile} >= {"up", "wgrad_dw1"}, rows  # two accumulators, 128 + 64 wide


def test_glu_gather_gemm_compiles_for_sm90():
    kernels = _check(_report("--activations", "swiglu", "--launches", "up,up_bwd,fwd_fused", "--variants", "one"),
                     ["up", "up_bwd", "fwd_fused"])
    assert kernels == {"_up_kernel", "_mlp_kernel"}


def test_token_window_tile_order_compiles_for_sm90():
    """The M-tiles of up, up_bwd, both down launches and the fused forward from a schedule (SSD_TRITON_TILE_ORDER=token; `auto`
    takes grouped windows for the fused forward at the 8B shape)."""
    kernels = _check(_report("--activations", "relu", "--launches", "up,down,up_bwd,down_dx,fwd_fused",
                             env_extra={"SSD_TRITON_TILE_ORDER": "token"}),
                     ["up", "down", "up_bwd", "down_dx", "fwd_fused"])
    assert kernels == {"_up_kernel", "_down_tma_kernel", "_mlp_kernel"}


@pytest.mark.parametrize("act", ["relu", "swiglu"])
def test_default_launches_compile_for_sm80(act):
    """A100 (what `auto` now runs the triton backend on): mma.sync, pointer loads instead of TMA, and the
    default combine's atomics native (bf16 adds before Hopper would be compare-and-swap loops, hence fp32
    ones: `default_combine`)."""
    kernels = _check(_report("--arch", "80", "--activations", act), LAUNCHES, mma="16816")
    assert kernels == {"_up_kernel", "_down_kernel", "_wgrad_kernel", "_mlp_kernel"}
