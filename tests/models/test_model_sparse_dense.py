"""Whole-model contract (DESIGN §4.1): with K = N every SwitchableFFN's sparse path computes the dense
forward, so the whole model's logits are unchanged (float64, 1e-10); with the router's gradient path
off, every parameter's gradient is the dense one too.
"""
import pytest
import torch

from ssd_megatron.config import ModelConfig
from ssd_megatron.models import build_model

V, N, D_FF = 53, 4, 64
TOL = 1e-10


def _cfg(arch, act):
    kw = dict(norm="rmsnorm", bias=False) if arch in ("t5", "llama") else {}
    if arch == "llama":
        kw["n_kv_heads"] = 2
    return ModelConfig(arch=arch, n_layers=2, n_decoder_layers=3 if arch == "t5" else 0, d_model=32, n_heads=4,
                       d_ff=D_FF, activation=act, max_seq_len=24, relative_attention_num_buckets=8,
                       relative_attention_max_distance=16, **kw)


def _batch(arch, B=2, L=11):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (B, L), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    if arch == "bert":
        mask = torch.ones(B, L, dtype=torch.long)
        mask[1, 7:] = 0
        batch["attention_mask"] = mask
    if arch == "t5":
        batch["decoder_input_ids"] = torch.randint(0, V, (B, L - 3), generator=g)
        batch["attention_mask"] = torch.ones(B, L, dtype=torch.long)
        batch["attention_mask"][0, 9:] = 0
    return batch


def _model(arch, act, seed=0):
    torch.manual_seed(seed)
    model = build_model(_cfg(arch, act), V).double().eval()
    # Non-trivial norms and biases, so that a path that skipped one would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _go_sparse(model, router_grad=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    for ffn in model.ffn_layers():
        ffn.configure_experts(N, N)
        ffn.set_clustering(torch.randperm(D_FF, generator=g) % N)
        ffn.router_grad = router_grad
        ffn.set_mode("sparse")


def _dense(model):
    for ffn in model.ffn_layers():
        ffn.set_mode("dense")


ARCHS = ["gpt", "bert", "t5", "llama"]
ACTS = ["relu", "squared_relu", "swiglu"]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_k_equals_n_sparse_forward_equals_dense(arch, act):
    model = _model(arch, act)
    batch = _batch(arch)
    with torch.no_grad():
        dense = model(**batch)
        _go_sparse(model)
        assert all(f.mode == "sparse" for f in model.ffn_layers())
        sparse = model(**batch)
    assert dense.dtype == torch.float64 and dense.shape[-1] == V
    diff = (sparse - dense).abs().max().item()
    assert diff < TOL, f"{arch}/{act}: max|sparse - dense| = {diff:.3e}"


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_k_equals_n_gradients_equal_dense_without_router_grad(arch, act):
    model = _model(arch, act)
    batch = _batch(arch)
    w = torch.randn(model(**batch).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def grads():
        model.zero_grad(set_to_none=True)
        (model(**batch) * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    dense = grads()
    _go_sparse(model, router_grad=False)
    sparse = grads()
    assert dense.keys() == sparse.keys() and len(dense) == len(list(model.parameters()))
    worst = max((sparse[n] - dense[n]).abs().max().item() for n in dense)
    assert worst < TOL, f"{arch}/{act}: worst gradient diff {worst:.3e}"
    _dense(model)
    again = grads()
    assert all(torch.equal(again[n], dense[n]) for n in dense)  # switching back leaves nothing behind


def test_router_grad_on_changes_only_through_router():
    """With the router's gradient on, forward is still dense-exact but W_i (and upstream) gradients
    gain the router's term: make sure the switch actually reaches the FFNs inside a model."""
    model = _model("gpt", "relu")
    batch = _batch("gpt")
    model.zero_grad()
    model(**batch).sum().backward()
    dense = model.layers[-1].ffn.w_in.weight.grad.clone()
    _go_sparse(model, router_grad=True)
    model.zero_grad()
    model(**batch).sum().backward()
    assert (model.layers[-1].ffn.w_in.weight.grad - dense).abs().max() > 1e-8
