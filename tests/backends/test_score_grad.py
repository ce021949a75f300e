"""kernels/score_grad.py (the folded backward's dgate and dS in one launch; SSD_TRITON_SCORE_GRAD=0: torch's) against
torch's sum and scatter, its gradient matrix for the Gluon dW1 kernel against a gather, and the triton backend with
it against autograd through SSD's router on the float64 reference: interpreted on CPU (TRITON_INTERPRET=1 in a
subprocess), compiled on the GPU."""
import pytest
import torch

from ..interpreted import run_interpreted

# (T, N, K, P): tokens past one 64-token program, K = N, N not a power of two, one to three partial rows, T = 0
CASES = [(37, 8, 2, 3), (130, 5, 5, 1), (64, 64, 16, 2), (0, 4, 2, 1)]
# the backend with the router folded: (make_inputs arguments, up_bwd's BN): three column blocks of 16 (P = 3), all
# of E = 48 as 32 + 16 (P = 2), GLU with one block (P = 1), empty experts
BACKEND_CASES = [(dict(activation="relu", T=37, E=48), 16), (dict(activation="relu", T=37, E=48), 64),
                 (dict(activation="swiglu", T=29, E=16, N=4, K=4), 16), (dict(activation="gelu", routing="empty"), 16)]


def _kernel_errors(device, dtype, generator):
    """Max abs errors of dgate and dS against torch's sum and scatter, and of the gradient matrix (`row_matrix`,
    sorted rows in a random order) against a gather, per case."""
    from ssd_megatron.ffn.backends.kernels.score_grad import ROW_WIDTH, row_matrix, score_grad
    out = []
    for T, N, K, P in CASES:
        idx = torch.rand(T, N, generator=generator).topk(K, dim=1).indices.to(device)
        dgp = torch.randn(P, T * K, generator=generator).to(device)
        dgate, ds = score_grad(dgp, idx, N, dtype)
        want = dgp.sum(0)
        ds_want = torch.zeros(T, N, device=device, dtype=dtype).scatter_(1, idx, want.view(T, K).to(dtype))
        order = torch.randperm(T * K, generator=generator).to(device=device, dtype=torch.int32)
        rows = row_matrix(want, order, dtype)
        rows_want = torch.zeros(T * K, ROW_WIDTH, device=device, dtype=dtype)
        rows_want[:, 0] = want[order.long()].to(dtype)
        out.append(max(float((dgate - want).abs().max()) if T else 0.0,
                       float((ds.float() - ds_want.float()).abs().max()) if T else 0.0,
                       float((rows.float() - rows_want.float()).abs().max()) if T else 0.0))
    return out


def _backend_errors():
    """Max norm-relative error of the output and every gradient, per BACKEND_CASES entry, with the score gradient
    by the kernel."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from backend_cases import compare, make_inputs, run_router, upcast
    from ssd_megatron.ffn.backends import ReferenceBackend
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    os.environ["SSD_TRITON_SCORE_GRAD"] = "1"
    tiny = (16, 16, 16, 1, 1)
    out = []
    for case, bn in BACKEND_CASES:
        up = (16, bn, 16, 1, 1)
        tc.force_config(up=up, up_glu=up, up_bwd=up, up_bwd_glu=up, down=tiny, wgrad=tiny + (32,), mlp=tiny,
                        mlp_glu=tiny)
        inp = make_inputs(dtype=torch.float32, **case)
        errs = compare(run_router(TritonBackend(), inp, fold=True),
                       run_router(ReferenceBackend(), upcast(inp), fold=False), tol=float("inf"))
        out.append(max(errs.values()))
    return out


def _interpreted_main():  # runs in a subprocess with TRITON_INTERPRET=1 set before triton loads
    import json
    print(json.dumps([_kernel_errors("cpu", torch.float32, torch.Generator().manual_seed(0)), _backend_errors()]))


def test_interpreted_kernel_and_backend_match_torch():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the kernel is checked compiled")
    kernel, backend = run_interpreted(__file__, "_interpreted_main")
    assert len(kernel) == len(CASES) and max(kernel) < 1e-6, kernel  # the sum of P fp32 partials, in order
    assert len(backend) == len(BACKEND_CASES) and max(backend) < 1e-5, backend


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run via tools/gpu_bench.sh)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_torch(dtype):
    errors = _kernel_errors("cuda", dtype, torch.Generator().manual_seed(1))
    assert max(errors) < 1e-6, errors


def test_switch_is_checked(monkeypatch):
    pytest.importorskip("triton")
    from ssd_megatron.errors import UserError
    from ssd_megatron.ffn.backends.kernels.score_grad import enabled
    monkeypatch.delenv("SSD_TRITON_SCORE_GRAD", raising=False)
    assert enabled(32) is True and enabled(64) is False  # auto: up to 32 experts (8B's 64: no gain measured)
    monkeypatch.setenv("SSD_TRITON_SCORE_GRAD", "1")
    assert enabled(64) is True
    monkeypatch.setenv("SSD_TRITON_SCORE_GRAD", "0")
    assert enabled(8) is False
    monkeypatch.setenv("SSD_TRITON_SCORE_GRAD", "yes")
    with pytest.raises(UserError, match="SSD_TRITON_SCORE_GRAD='yes': accepted: auto"):
        enabled(8)
