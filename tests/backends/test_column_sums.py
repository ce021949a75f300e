"""kernels/column_sums.py (the output bias's gradient, the router's centroids) against float64 torch: interpreted on
CPU (TRITON_INTERPRET=1 in a subprocess), compiled on the GPU (bf16 included)."""
import pytest
import torch

from ..interpreted import run_interpreted

# (T, D): rows within one 256-row tile and past it, columns not a multiple of the 128-wide blocks, one row, and the
# partial rows summed once (2049) and twice (70000) more
SUM_CASES = [(37, 40), (1, 5), (300, 300), (2049, 64), (70000, 8)]
# (N, F, E, D): the centroids' segments (E of F rows per expert: GLU's gate half), D past one column block
MEAN_CASES = [(4, 40, 16, 24), (3, 96, 48, 300), (1, 8, 8, 8)]


def _errors(dtype, device, generator):
    """Max relative errors of each case against float64 (relative to the reference's largest entry)."""
    from ssd_megatron.ffn.backends.kernels.column_sums import column_sums, segment_means

    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0

    out = []
    for T, D in SUM_CASES:
        x = torch.randn(T, D + 3, generator=generator).to(device, dtype)[:, 3:]  # rows strided, columns unit
        out.append(rel(column_sums(x, torch.float32), x.double().sum(0)))
    for N, F, E, D in MEAN_CASES:
        w = torch.randn(N, F, D, generator=generator).to(device, dtype)
        out.append(rel(segment_means(w, E, torch.float32), w[:, :E].double().mean(1)))
    return out


def _interpreted_main():  # runs in a subprocess with TRITON_INTERPRET=1 set before triton loads
    import json
    print(json.dumps(_errors(torch.float32, "cpu", torch.Generator().manual_seed(0))))


def test_interpreted_kernels_match_float64():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the kernels are checked compiled")
    errors = run_interpreted(__file__, "_interpreted_main")
    assert len(errors) == len(SUM_CASES) + len(MEAN_CASES)
    assert max(errors) < 1e-6, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run via tools/gpu_bench.sh)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_float64(dtype):
    errors = _errors(dtype, "cuda", torch.Generator().manual_seed(1))
    # bf16 inputs are exact in float64; the kernel sums in fp32, and the means are rounded to fp32 here
    assert max(errors) < 1e-5, errors
