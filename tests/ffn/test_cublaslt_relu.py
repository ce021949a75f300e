"""cuBLASLt's ReLU epilogues (ffn/cublaslt_relu.py) against plain torch, on the GPU, and the CPU-side
contract: where it does not apply, `usable` says no and the fused FFN keeps its other path."""
import pytest
import torch

from ssd_megatron.ffn import cublaslt_relu
from ssd_megatron.ffn.fused_relu_ffn import _relu_ffn

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run via tools/gpu_bench.sh)")


def test_not_usable_on_cpu_or_fp32_or_odd_widths():
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    assert not cublaslt_relu.usable(x, torch.randn(256, 64, dtype=torch.bfloat16))  # CPU
    out = _relu_ffn(x, torch.randn(256, 64, dtype=torch.bfloat16), torch.randn(256, dtype=torch.bfloat16),
                    torch.randn(64, 256, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16))
    assert out[2].numel() == 0  # no bit-mask: the backward reads h > 0


def _unpack(mask: torch.Tensor) -> torch.Tensor:
    bits = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return ((mask.unsqueeze(-1) >> bits) & 1).flatten(-2).bool()


@needs_cuda
@pytest.mark.parametrize("tokens,d,f", [(16384, 768, 6144), (1331, 256, 1024), (7, 64, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_epilogues_equal_torch(tokens, d, f, dtype):
    torch.manual_seed(0)
    x = torch.randn(tokens, d, device="cuda", dtype=dtype)
    w_in = torch.randn(f, d, device="cuda", dtype=dtype) / d ** 0.5
    b_in = torch.randn(f, device="cuda", dtype=dtype)
    w_out = torch.randn(d, f, device="cuda", dtype=dtype) / f ** 0.5
    dy = torch.randn(tokens, d, device="cuda", dtype=dtype)
    assert cublaslt_relu.usable(x, w_in)
    h, mask = cublaslt_relu.relu_aux_bias(x, w_in, b_in)
    pre = x.float() @ w_in.float().t() + b_in.float()
    torch.testing.assert_close(h.float(), pre.clamp_min(0), rtol=2e-2, atol=2e-2)
    on = _unpack(mask)
    # The bit is the pre-activation's sign: h > 0 implies it; a tiny positive value that rounds to 0 in
    # fp16 keeps its bit (relu' = 1 there is the exact derivative).
    assert torch.equal(on | (h > 0), on)
    assert int((on & (h == 0)).sum()) <= 1e-6 * h.numel() + 2
    for bias_grad in (True, False):
        g, gb = cublaslt_relu.drelu_bgrad(dy, w_out, mask, bias_grad=bias_grad)
        ref = torch.where(on, dy.float() @ w_out.float(), 0.0)
        assert not bool(g[~on].any())
        torch.testing.assert_close(g.float(), ref, rtol=2e-2, atol=2e-2 * d ** 0.5 / 8)
        if bias_grad:
            torch.testing.assert_close(gb.float(), ref.sum(0), rtol=2e-2, atol=2e-2 * tokens ** 0.5)
        else:
            assert gb is None


@needs_cuda
def test_fused_ffn_with_and_without_cublaslt_agree():
    from ssd_megatron.ffn.fused_relu_ffn import relu_ffn

    torch.manual_seed(0)
    shape, d, f = (4, 333, 256), 256, 1024
    params = [torch.randn(f, d, device="cuda") / d ** 0.5, torch.randn(f, device="cuda"),
              torch.randn(d, f, device="cuda") / f ** 0.5, torch.randn(d, device="cuda")]
    x = torch.randn(*shape, device="cuda")
    results = []
    for use in (True, False):
        cublaslt_relu.USE_CUBLASLT = use
        try:
            inputs = [t.clone().requires_grad_() for t in (x, *params)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = relu_ffn(*inputs)
            grads = torch.autograd.grad(y.float().square().sum(), inputs)
        finally:
            cublaslt_relu.USE_CUBLASLT = True
        results.append([y.float(), *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@needs_cuda
def test_opcheck_on_cuda():
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, w_in, b_in = torch.randn(40, 64, **bf), torch.randn(256, 64, **bf), torch.randn(256, **bf)
    w_out, b_out, dy = torch.randn(64, 256, **bf), torch.randn(64, **bf), torch.randn(40, 64, **bf)
    torch.library.opcheck(_relu_ffn, (x, w_in, b_in, w_out, b_out))
    mask = cublaslt_relu.relu_aux_bias(x, w_in, b_in)[1]
    for bias_grad in (True, False):
        torch.library.opcheck(cublaslt_relu._drelu_bgrad, (dy, w_out, mask, bias_grad))
