"""MoE-Dropout baseline: K schedule, frozen random router, gate 1 (K = N is the dense FFN)."""
import pytest
import torch

from ssd_megatron.baselines.moe_dropout import MoEDropoutFFN, MoEDropoutMethod, k_schedule
from ssd_megatron.config import load_config
from ssd_megatron.ffn import SwitchableFFN
from ssd_megatron.models import build_model


@pytest.mark.parametrize("step,expected", [
    (0, 6), (1, 6), (3846, 6), (3847, 7), (100_000, 19), (150_000, 26), (199_999, 32), (200_000, 32),
    (250_000, 32),
])
def test_k_schedule_paper_base(step, expected):
    # k(t) = clip(round((32 - 6) * t / 200000) + 6, 6, 32)
    assert k_schedule(step, 6, 32, 200_000) == expected
    assert expected == min(max(round(26 * step / 200_000) + 6, 6), 32)


def test_k_schedule_tiny_and_rounding():
    ks = [k_schedule(t, 4, 16, 400) for t in range(0, 401)]
    assert ks[0] == 4 and ks[-1] == 16 and all(b - a in (0, 1) for a, b in zip(ks, ks[1:]))
    # Python round is half-to-even, as the public code: 12 * 50 / 400 = 1.5 -> 2, 12 * 150 / 400 = 4.5 -> 4.
    assert k_schedule(50, 4, 16, 400) == 6 and k_schedule(150, 4, 16, 400) == 8


def test_k_equals_n_is_dense_exactly():
    torch.manual_seed(0)
    dense = SwitchableFFN(16, 64, "relu").double()
    x = torch.randn(4, 5, 16, dtype=torch.float64)
    ref = dense(x)
    MoEDropoutFFN.convert(dense, num_experts=8, top_k=8)
    assert torch.equal(dense(x), ref)
    # The sparse path with all experts and gate 1 gives the same function.
    dense.mode = "sparse"
    torch.testing.assert_close(dense(x), ref, rtol=1e-12, atol=1e-13)


def test_sparse_is_dense_restricted_to_selected_experts():
    torch.manual_seed(1)
    ffn = MoEDropoutFFN(16, 64, "relu", num_experts=8, top_k=3, seed=5).double()
    x = torch.randn(11, 16, dtype=torch.float64)
    scores = x @ ffn.router_weight.t()
    sel = scores.topk(3, dim=-1).indices
    mask = torch.zeros(11, 8, dtype=torch.float64).scatter_(1, sel, 1.0).repeat_interleave(8, dim=1)
    h = torch.relu(ffn.w_in(x)) * mask
    torch.testing.assert_close(ffn(x), ffn.w_out(h), rtol=1e-12, atol=1e-12)


def test_router_frozen_and_deterministic():
    a = MoEDropoutFFN(16, 64, num_experts=8, top_k=2, seed=3)
    b = MoEDropoutFFN(16, 64, num_experts=8, top_k=2, seed=3)
    assert torch.equal(a.router_weight, b.router_weight)
    assert "router_weight" in a.state_dict()
    assert all("router" not in n for n, _ in a.named_parameters())
    x = torch.randn(6, 16, requires_grad=True)
    a(x).sum().backward()
    # The input gets gradient only through the selected experts, not through the router scores.
    a.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    idx, gate = a.route(x2, None, 2)
    assert not gate.requires_grad and torch.equal(gate, torch.ones_like(gate))


def test_method_schedule_eval_dense_and_resume():
    cfg = load_config("configs/bert_tiny_moe_dropout.yaml",
                      ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
                       "train.max_steps=100"])
    model = build_model(cfg.model, 64)
    m = MoEDropoutMethod(cfg, model)
    assert all(isinstance(f, MoEDropoutFFN) for f in model.ffn_layers())
    m.before_step(0)
    assert m.k == 4 and m.phase() == "sparse" and m.ffn_active_fraction() == 4 / 16
    assert m.router_flops_per_token() == 2 * 32 * 16 and m.router_backward_flops_per_token() == 0
    assert all(f.mode == "sparse" and f.top_k == 4 for f in model.ffn_layers())
    m.eval_mode()
    assert all(f.mode == "dense" for f in model.ffn_layers())
    m.train_mode()
    assert all(f.mode == "sparse" and f.top_k == 4 for f in model.ffn_layers())
    m.before_step(60)
    assert m.k == k_schedule(60, 4, 16, 100) == 11
    assert m.after_step(60) == {"k": 11}
    state = m.state_dict()
    m.before_step(100)
    assert m.k == 16 and m.phase() == "dense" and m.router_flops_per_token() == 0
    m.load_state_dict(state)
    assert m.k == 11 and model.ffn_layers()[0].top_k == 11
    # Layers get different random routers.
    r = [f.router_weight for f in model.ffn_layers()]
    assert not torch.equal(r[0], r[1])


def test_inference_k_uses_training_structure():
    cfg = load_config("configs/gpt_tiny_moe_dropout.yaml",
                      ["model.n_layers=1", "model.d_model=16", "model.n_heads=2", "model.d_ff=64"])
    model = build_model(cfg.model, 64).double()
    m = MoEDropoutMethod(cfg, model)
    m.before_step(0)
    assert m.ffn_active_fraction() == 4 / 16
    m.set_inference_k(2)
    ffn = model.ffn_layers()[0]
    assert ffn.mode == "sparse" and ffn.top_k == 2 and torch.equal(ffn.expert_perm, torch.arange(64))
    assert m.ffn_active_fraction() == 2 / 16 and m.router_flops_per_token() == 2 * 16 * 16
    m.set_inference_k(16)
    assert ffn.mode == "dense" and m.router_flops_per_token() == 0
    m.train_mode()
    assert ffn.top_k == 4 and m.ffn_active_fraction() == 4 / 16
