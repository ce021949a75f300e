"""The fused dense ReLU FFN equals W_o relu(W_i x + b_i) + b_o in value and every gradient, traces whole
under torch.compile, and SwitchableFFN uses it only where it should (CUDA, biased ReLU, no hook on
`act`). Its masked GEMM's Triton kernel runs under TRITON_INTERPRET=1 here, compiled on the GPU."""
import json

import pytest
import torch
import torch.nn.functional as F

from ssd_megatron.ffn.fused_relu_ffn import _relu_ffn, relu_ffn
from ssd_megatron.ffn.relu_mask_matmul import relu_mask_matmul, relu_mask_matmul_colsum
from ssd_megatron.ffn.switchable_ffn import SwitchableFFN

from ..interpreted import run_interpreted


def _inputs(dtype, shape=(3, 7, 16), d_ff=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(*shape, generator=g, dtype=dtype)
    w_in = torch.randn(d_ff, d, generator=g, dtype=dtype) / d ** 0.5
    b_in = torch.randn(d_ff, generator=g, dtype=dtype)
    w_out = torch.randn(d, d_ff, generator=g, dtype=dtype) / d_ff ** 0.5
    b_out = torch.randn(d, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, w_in, b_in, w_out, b_out)]


def _reference(x, w_in, b_in, w_out, b_out):
    return F.linear(F.relu(F.linear(x, w_in, b_in)), w_out, b_out)


def _value_and_grads(fn, inputs, grad_out):
    y = fn(*inputs)
    wanted = [t for t in inputs if t.requires_grad]
    return (y, *torch.autograd.grad(y, wanted, grad_out))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_the_unfused_ffn(dtype):
    inputs = _inputs(dtype)
    grad_out = torch.randn(3, 7, 16, dtype=dtype)
    ours = _value_and_grads(relu_ffn, inputs, grad_out)
    ref = _value_and_grads(_reference, inputs, grad_out)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol)
    h = F.relu(F.linear(*inputs[:3]))
    assert (h == 0).any() and (h > 0).any()  # both sides of the ReLU are exercised


@pytest.mark.parametrize("d", [16, 13, 7])
@pytest.mark.parametrize("wanted", [(1, 1, 1, 1, 1), (0, 1, 0, 0, 0), (0, 0, 1, 0, 0), (1, 0, 0, 0, 0),
                                    (0, 0, 0, 1, 1), (1, 1, 1, 0, 0)])
def test_partial_gradients(d, wanted):
    inputs = _inputs(torch.float64, shape=(5, d), d_ff=9)
    for t, want in zip(inputs, wanted):
        t.requires_grad_(bool(want))
    grad_out = torch.randn(5, d, dtype=torch.float64)
    for a, r in zip(_value_and_grads(relu_ffn, inputs, grad_out), _value_and_grads(_reference, inputs, grad_out)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_zero_preactivation_has_zero_gradient():
    # relu'(0) = 0 in torch; the fused backward reads it from h > 0 and must agree.
    x, w_in, b_in, w_out, b_out = _inputs(torch.float32, shape=(4, 8), d_ff=5)
    with torch.no_grad():
        x.zero_()
        b_in.zero_()
    relu_ffn(x, w_in, b_in, w_out, b_out).sum().backward()
    for t in (x, w_in, b_in, w_out):
        assert torch.count_nonzero(t.grad) == 0
    assert torch.equal(b_out.grad, torch.full_like(b_out, 4.0))


def test_backward_zero_fills_no_gradient_for_h():
    """h is the op's second output for the backward only; autograd would zero-fill a [tokens, d_ff]
    gradient for it in every backward unless told not to (set_materialize_grads)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    y = relu_ffn(*_inputs(torch.float32, shape=(4, 8), d_ff=5))
    with Ops() as ops:
        y.sum().backward()
    assert "aten.mm.default" in ops.names and not [n for n in ops.names if n.startswith("aten.zeros.")], ops.names


def test_autocast_casts_like_linears():
    inputs = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = relu_ffn(*inputs)
        ref = _reference(*inputs)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=3e-2, atol=3e-2)
    grad_out = torch.randn_like(y)
    ours = torch.autograd.grad(y, inputs, grad_out)
    refs = torch.autograd.grad(ref, inputs, grad_out)
    assert all(g.dtype == torch.float32 for g in ours)  # the fp32 parameters' own gradients, via the masters
    for a, r in zip(ours, refs):
        torch.testing.assert_close(a, r, rtol=3e-2, atol=3e-2 * max(1.0, r.abs().max().item()))


def test_masters_receive_the_parameter_gradients():
    """Under autocast the op gets the bf16 copies and the fp32 parameters; the gradients go to the latter
    only (nothing flows back through the casts), each equal to the gradient of the copy it stands for."""
    x, *params = _inputs(torch.float32)
    copies = [p.detach().bfloat16().requires_grad_() for p in params]
    xb = x.detach().bfloat16()
    y, _ = _relu_ffn(xb, *copies, *params)
    y_ref, _ = _relu_ffn(xb, *copies)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, copies + params, g, allow_unused=True)
    assert grads[:4] == (None,) * 4
    to_masters, to_copies = grads[4:], torch.autograd.grad(y_ref, copies, g)
    for m, c in zip(to_masters, to_copies):
        assert m.dtype == torch.float32 and c.dtype == torch.bfloat16
        torch.testing.assert_close(m.bfloat16(), c, rtol=2e-2, atol=2e-2)


def test_masked_matmul_column_sums():
    a, b, h = torch.randn(37, 8, dtype=torch.float64), torch.randn(8, 11, dtype=torch.float64), torch.randn(37, 11)
    c, s = relu_mask_matmul_colsum(a, b, h.double())
    assert s.dtype == torch.float64
    torch.testing.assert_close(c, torch.where(h > 0, a @ b, 0.0).double())
    torch.testing.assert_close(s, c.sum(0))
    cb, sb = relu_mask_matmul_colsum(a.bfloat16(), b.bfloat16(), h.bfloat16())
    assert cb.dtype == torch.bfloat16 and sb.dtype == torch.float32


def test_opcheck():
    torch.library.opcheck(_relu_ffn, tuple(_inputs(torch.float32)))
    a, b, h = torch.randn(6, 4), torch.randn(4, 5), torch.randn(6, 5)
    torch.library.opcheck(relu_mask_matmul, (a, b, h))
    torch.library.opcheck(relu_mask_matmul_colsum, (a, b, h))
    x, *params = _inputs(torch.float32)
    copies = [p.detach().bfloat16().requires_grad_() for p in params]
    torch.library.opcheck(_relu_ffn, (x.detach().bfloat16(), *copies, *params))


def test_traces_without_graph_break():
    inputs = _inputs(torch.float32)
    compiled = torch.compile(lambda *t: relu_ffn(*t) * 2, backend="aot_eager", fullgraph=True)
    y = compiled(*inputs)
    y.sum().backward()
    torch.testing.assert_close(y, 2 * _reference(*inputs))
    assert all(t.grad is not None for t in inputs)


def test_switchable_ffn_path_selection(monkeypatch):
    calls = []
    import ssd_megatron.ffn.switchable_ffn as sf

    monkeypatch.setattr(sf, "relu_ffn", lambda *a: calls.append(1) or relu_ffn(*a))
    ffn = SwitchableFFN(16, 32, "relu")
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(ffn(x), ffn.w_out(F.relu(ffn.w_in(x))))
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
    for f in (SwitchableFFN(16, 32, "gelu"), SwitchableFFN(16, 32, "swiglu"), SwitchableFFN(16, 32, "relu", bias=False)):
        f(xc)
    ffn.set_mode("sparse")
    ffn.configure_experts(4, 2)
    ffn(x)
    assert len(calls) == 1


def _interpreted_kernel_main():  # runs in a subprocess with TRITON_INTERPRET=1 set before triton loads
    from ssd_megatron.ffn.relu_mask_matmul import launch, relu_mask_matmul_torch

    g = torch.Generator().manual_seed(0)
    out = []
    for (M, K, N), tiles in [((37, 40, 50), (16, 16, 16, 2)), ((16, 16, 16), (16, 16, 16, 8)),
                             ((5, 33, 70), (16, 32, 16, 3))]:
        a, h = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
        for b in (torch.randn(K, N, generator=g), torch.randn(N, K, generator=g).t()):  # row-major, strided
            c, r = launch(a, b, h, tiles), relu_mask_matmul_torch(a, b, h)
            c2, partial = launch(a, b, h, tiles, col_sum=True)
            out.append([float(max((c - r).abs().max(), (c2 - r).abs().max(), (partial.sum(0) - r.sum(0)).abs().max())),
                        bool(((c == 0) == (r == 0)).all()) and partial.shape == (-(-M // tiles[0]), N)])
    print(json.dumps(out))


def test_gluon_masked_gemm_declines_what_it_cannot_serve():
    """The Gluon kernel (Hopper only, no interpreter) never claims CPU tensors; relu_mask_matmul then takes
    its other paths, which the tests around this one check."""
    from ssd_megatron.ffn import relu_mask_gemm_gluon as g

    a, b, h = torch.randn(64, 32).bfloat16(), torch.randn(32, 48).bfloat16(), torch.randn(64, 48).bfloat16()
    assert not g.available(torch.device("cpu"))
    assert not g.serves(a, b, h, torch.empty_like(h))
    torch.testing.assert_close(relu_mask_matmul(a, b, h).float(), torch.where(h > 0, a.float() @ b.float(), 0.0),
                               rtol=2e-2, atol=2e-2)


def test_masked_gemm_kernel_interpreted():
    """Partial tiles in M, N and K, a K not a multiple of the tile, a strided b, several row groups."""
    triton = pytest.importorskip("triton")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip("Triton < 3.7 interpreter cannot run a loop with a runtime bound")
    results = run_interpreted(__file__, "_interpreted_kernel_main")
    assert len(results) == 6
    for err, same_zeros in results:
        assert err < 1e-4 and same_zeros


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run via tools/gpu_bench.sh)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_matches_unfused(dtype, monkeypatch):
    # fp32 means fp32 here: a training run in the same worker may have switched matmuls to TF32.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run via tools/gpu_bench.sh)")
@pytest.mark.parametrize("shape", [(1000, 256, 1000), (16384, 768, 6144), (77, 64, 130)])
def test_cuda_masked_gemm_kernel(shape):
    M, K, N = shape
    torch.manual_seed(0)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16).t()  # W_out as stored: a strided [K, N] view
    h = torch.relu(torch.randn(M, N, device="cuda", dtype=torch.bfloat16))
    c = relu_mask_matmul(a, b, h)
    ref = torch.where(h > 0, (a.float() @ b.float()), 0.0)
    # the mask exactly: zeros wherever h is. Where h > 0 a product may still round to an exact zero in one
    # summation order and not the other (a sum of 768 products cancelling to ~1e-6: H100, session 26), so
    # there only closeness is asked.
    assert not c[h == 0].any()
    torch.testing.assert_close(c.float(), ref, rtol=2e-2, atol=2e-2 * K ** 0.5)
