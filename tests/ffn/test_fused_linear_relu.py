"""The fused bias + ReLU linear equals relu(linear(x)) in value and gradients, traces whole under
torch.compile, and SwitchableFFN uses it only where it should (CUDA, biased ReLU, no hook on `act`)."""
import pytest
import torch
import torch.nn.functional as F

from ssd_megatron.ffn.fused_linear_relu import _linear_relu, linear_relu
from ssd_megatron.ffn.switchable_ffn import SwitchableFFN


def _inputs(dtype, shape=(3, 7, 16), d_out=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(d_out, shape[-1], generator=g, dtype=dtype) / shape[-1] ** 0.5).requires_grad_()
    b = torch.randn(d_out, generator=g, dtype=dtype).requires_grad_()
    return x, w, b


def _value_and_grads(fn, x, w, b, grad_out):
    y = fn(x, w, b)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad_out)
    return y, gx, gw, gb


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_relu_linear(dtype):
    x, w, b = _inputs(dtype)
    grad_out = torch.randn(3, 7, 24, dtype=dtype)
    ours = _value_and_grads(linear_relu, x, w, b, grad_out)
    ref = _value_and_grads(lambda x, w, b: F.relu(F.linear(x, w, b)), x, w, b, grad_out)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol)
    assert (ours[0] == 0).any() and (ours[0] > 0).any()  # both sides of the ReLU are exercised


def test_zero_preactivation_has_zero_gradient():
    # relu'(0) = 0 in torch; the fused backward reads it from h > 0 and must agree.
    x = torch.zeros(4, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    b = torch.zeros(5, requires_grad=True)
    y = linear_relu(x, w, b)
    y.sum().backward()
    assert torch.count_nonzero(y) == 0
    assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0 and torch.count_nonzero(x.grad) == 0


def test_autocast_casts_like_a_linear():
    x, w, b = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_relu(x, w, b)
        ref = F.relu(F.linear(x, w, b))
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_opcheck():
    x, w, b = _inputs(torch.float32)
    torch.library.opcheck(_linear_relu, (x, w, b))


def test_traces_without_graph_break():
    x, w, b = _inputs(torch.float32)
    compiled = torch.compile(lambda x, w, b: linear_relu(x, w, b) * 2, backend="aot_eager", fullgraph=True)
    y = compiled(x, w, b)
    y.sum().backward()
    torch.testing.assert_close(y, 2 * F.relu(F.linear(x, w, b)))
    assert w.grad is not None and b.grad is not None


def test_switchable_ffn_path_selection(monkeypatch):
    calls = []
    import ssd_megatron.ffn.switchable_ffn as sf

    monkeypatch.setattr(sf, "linear_relu", lambda *a: calls.append(1) or linear_relu(*a))
    ffn = SwitchableFFN(16, 32, "relu")
    x = torch.randn(2, 5, 16)
    ref = ffn.w_out(F.relu(ffn.w_in(x)))
    torch.testing.assert_close(ffn(x), ref)
    assert not calls  # CPU keeps the unfused path (and its bit-exact resume behaviour)

    class FakeCuda(torch.Tensor):  # only `is_cuda` matters to the path choice
        @property
        def is_cuda(self):
            return True

    xc = x.as_subclass(FakeCuda)
    ffn(xc)
    assert len(calls) == 1
    handle = ffn.act.register_forward_hook(lambda m, i, o: None)
    ffn(xc)
    assert len(calls) == 1  # a hook on `act` (the sparsity probe) needs the separate activation
    handle.remove()
    for act in ("gelu", "swiglu"):
        f = SwitchableFFN(16, 32, act)
        f(xc)
    assert len(calls) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run via tools/gpu_bench.sh)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_matches_unfused(dtype):
    torch.manual_seed(0)
    ffn = SwitchableFFN(256, 1024, "relu").cuda()
    x = torch.randn(4, 333, 256, device="cuda", requires_grad=True)
    outs = []
    for fuse in (True, False):
        SwitchableFFN.fuse_relu = fuse
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                y = ffn(x)
            g = torch.autograd.grad(y.float().square().sum(), [x, *ffn.parameters()])
        finally:
            SwitchableFFN.fuse_relu = True
        outs.append([y.float(), *g])
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("d_in", [16, 13, 7])  # padding of the augmented operand: 7, 2 and 0 columns
@pytest.mark.parametrize("wanted", [(True, True, True), (False, True, False), (False, False, True), (True, False, False)])
def test_partial_gradients(d_in, wanted):
    x, w, b = _inputs(torch.float64, shape=(5, d_in), d_out=9)
    for t, want in zip((x, w, b), wanted):
        t.requires_grad_(want)
    grad_out = torch.randn(5, 9, dtype=torch.float64)
    targets = [t for t in (x, w, b) if t.requires_grad]
    ours = torch.autograd.grad(linear_relu(x, w, b), targets, grad_out)
    ref = torch.autograd.grad(F.relu(F.linear(x, w, b)), targets, grad_out)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
