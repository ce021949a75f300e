"""Contract 1 at the layer level: the sparse path with K=N is the dense FFN, and the router's
gradient is exactly the extra term the straight-through gate adds."""
import pytest
import torch

from ssd_megatron.ffn import SwitchableFFN, straight_through_gate
from ssd_megatron.ffn.activations import apply_activation

ACTS = ["relu", "squared_relu", "gelu", "swiglu", "geglu"]


def _ffn(act, d=12, f=48, n=6, k=None, dtype=torch.float64, seed=0, bias=True):
    torch.manual_seed(seed)
    ffn = SwitchableFFN(d, f, act, bias=bias, num_experts=n, top_k=k or n).to(dtype)
    ffn.set_clustering(torch.randperm(f) % n)
    return ffn


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_k_equals_n_forward_is_dense_float64(act, bias):
    ffn = _ffn(act, bias=bias)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    dense = ffn(x)
    ffn.set_mode("sparse")
    torch.testing.assert_close(ffn(x), dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_k_equals_n_forward_low_precision(dtype, tol):
    ffn = _ffn("relu", dtype=dtype)
    x = torch.randn(64, 12, dtype=dtype)
    dense = ffn(x).float()
    ffn.set_mode("sparse")
    sparse = ffn(x).float()
    assert (sparse - dense).norm() / dense.norm() < tol


def test_straight_through_gate_is_exactly_one():
    """Value exactly 1 with and without a gradient to carry; with one, d gate / d s = 1."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        s = torch.randn(10000, dtype=dtype) * 100
        for needs_grad in (True, False):
            s.requires_grad_(needs_grad)
            gate = straight_through_gate(s)
            assert gate.dtype == dtype and bool((gate == 1).all()) and gate.requires_grad == needs_grad
        (grad,) = torch.autograd.grad(straight_through_gate(s.requires_grad_()).sum(), s)
        assert bool((grad == 1).all())


@pytest.mark.parametrize("act", ["relu", "swiglu"])
def test_gradients_equal_dense_with_router_grad_off(act):
    ffn = _ffn(act)
    ffn.router_grad = False
    x = torch.randn(20, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 12, dtype=torch.float64)
    dense = torch.autograd.grad((ffn(x) * w).sum(), [x, *ffn.parameters()])
    ffn.set_mode("sparse")
    sparse = torch.autograd.grad((ffn(x) * w).sum(), [x, *ffn.parameters()])
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_router_gradient_is_exactly_the_extra_term():
    """With the router's gradient on, W_i gets grad_dense + (1/E) Σ_t g[t,n] x_t per expert-n row,
    where g[t,n] = <dL/dy_t, expert n's output for token t>; x gets Σ_n g[t,n] c_n."""
    ffn = _ffn("relu", k=6)
    x = torch.randn(20, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 12, dtype=torch.float64)
    gx_dense, gwi_dense = torch.autograd.grad((ffn(x) * w).sum(), [x, ffn.w_in.weight])
    ffn.set_mode("sparse")
    gx, gwi = torch.autograd.grad((ffn(x) * w).sum(), [x, ffn.w_in.weight])

    # Expected router term, computed by hand.
    n, e = ffn.num_experts, ffn.expert_size
    w1, b1, w2 = ffn.expert_weights()
    with torch.no_grad():
        h = apply_activation(torch.einsum("td,nfd->tnf", x, w1) + b1, "relu")
        out = torch.einsum("tnf,nfd->tnd", h, w2)           # every expert's output for every token
        g = torch.einsum("tnd,td->tn", out, w)               # dL/d gate
        centroids = w1.mean(1)
        exp_gx = g @ centroids
        exp_gc = g.t() @ x                                    # [n, d]
        exp_gwi = torch.zeros_like(gwi)
        exp_gwi[ffn.expert_perm] = exp_gc.repeat_interleave(e, 0) / e
    torch.testing.assert_close(gx - gx_dense, exp_gx, rtol=0, atol=1e-10)
    torch.testing.assert_close(gwi - gwi_dense, exp_gwi, rtol=0, atol=1e-10)


def test_topk_selects_by_centroid_scores_and_skips_other_experts():
    ffn = _ffn("relu", k=2)
    ffn.set_mode("sparse")
    x = torch.randn(5, 12, dtype=torch.float64)
    w1, b1, w2 = ffn.expert_weights()
    scores = x @ w1.mean(1).t()
    top = scores.topk(2, dim=-1).indices
    h = apply_activation(torch.einsum("td,nfd->tnf", x, w1) + b1, "relu")
    out = torch.einsum("tnf,nfd->tnd", h, w2)
    expected = out.gather(1, top[..., None].expand(-1, -1, 12)).sum(1) + ffn.w_out.bias
    torch.testing.assert_close(ffn(x), expected, rtol=0, atol=1e-12)


def test_clustering_round_trip_and_validation():
    ffn = _ffn("relu")
    labels = torch.randperm(48) % 6
    ffn.set_clustering(labels)
    assert torch.equal(ffn.expert_labels(), labels)
    with pytest.raises(ValueError, match="exactly 8"):
        ffn.set_clustering(torch.zeros(48, dtype=torch.long))


def test_reclustering_changes_the_next_steps_gradients():
    """After an in-place re-clustering the weight gradients are those of the new layout (the gather's
    backward derives the inverse permutation from the saved expert_perm, no cache to go stale)."""
    ffn = _ffn("relu", k=2)
    ffn.set_mode("sparse")
    x = torch.randn(10, 12, dtype=torch.float64)
    ffn(x).sum().backward()
    ffn.set_clustering(torch.randperm(48, generator=torch.Generator().manual_seed(3)) % 6)
    ffn.zero_grad()
    ffn(x).sum().backward()
    fresh = _ffn("relu", k=2)
    fresh.load_state_dict(ffn.state_dict())
    fresh.set_mode("sparse")
    fresh(x).sum().backward()
    for a, b in zip(ffn.parameters(), fresh.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_switching_creates_no_parameters():
    ffn = _ffn("swiglu")
    before = [(n, p.data_ptr(), p.shape) for n, p in ffn.named_parameters()]
    ffn.set_mode("sparse")
    ffn(torch.randn(4, 12, dtype=torch.float64)).sum().backward()
    ffn.set_mode("dense")
    assert [(n, p.data_ptr(), p.shape) for n, p in ffn.named_parameters()] == before


def test_dynamic_topk_drops_lowest_candidates_at_inference():
    ffn = _ffn("relu", k=4)
    ffn.set_mode("sparse")
    ffn.eval()
    x = torch.randn(50, 12, dtype=torch.float64)
    full = ffn(x)
    ffn.dynamic_drop_ratio = 0.5
    dropped = ffn(x)
    assert not torch.allclose(full, dropped)
    ffn.dynamic_drop_ratio = 0.0
    torch.testing.assert_close(ffn(x), full)


@pytest.mark.parametrize("act", ["relu", "swiglu"])
def test_sparse_layer_under_torch_compile_equals_eager(act):
    """The sparse path as the training loop compiles it (weight gather through the permutation, router,
    expert backend): output and every gradient equal eager. fp32 with aot_eager runs the same ATen ops,
    so the top-K choices cannot flip and the comparison is tight."""
    ffn = _ffn(act, d=32, f=96, n=6, k=2, dtype=torch.float32)
    ffn.set_mode("sparse")
    x = torch.randn(40, 32, requires_grad=True)
    w = torch.randn(40, 32)
    eager = torch.autograd.grad((ffn(x) * w).sum(), [x, *ffn.parameters()])
    torch._dynamo.reset()
    compiled_ffn = torch.compile(ffn, backend="aot_eager")
    compiled = torch.autograd.grad((compiled_ffn(x) * w).sum(), [x, *ffn.parameters()])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
