"""SMoE baseline: the routed FFN, its auxiliary losses, and the method's conversion of a model."""
import copy
import math

import pytest
import torch

from ssd_megatron.baselines.smoe import SMoEFFN, SMoEMethod, load_balancing_loss, router_z_loss
from ssd_megatron.config import load_config
from ssd_megatron.ffn import SwitchableFFN
from ssd_megatron.ffn.expert_layout import to_neuron_order
from ssd_megatron.models import build_model


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("N", [1, 3, 4])
def test_k_equals_n_with_equal_router_is_dense_over_n(activation, N):
    torch.manual_seed(0)
    ffn = SwitchableFFN(16, 24, activation, bias=True).double()
    smoe = SMoEFFN(16, 24, activation, bias=True, num_experts=N, top_k=N).double()
    smoe.load_state_dict(ffn.state_dict(), strict=False)
    with torch.no_grad():
        smoe.router.weight.copy_(torch.randn(1, 16, dtype=torch.float64).expand(N, 16))
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    b = ffn.w_out.bias
    dense = ffn(x)
    y = smoe(x)
    torch.testing.assert_close(y - b, (dense - b) / N, rtol=1e-12, atol=1e-13)


def test_convert_keeps_weights_and_identity():
    torch.manual_seed(0)
    ffn = SwitchableFFN(8, 12, "relu")
    w_in, w_out = ffn.w_in.weight, ffn.w_out.weight
    before = {k: v.clone() for k, v in ffn.state_dict().items()}
    out = SMoEFFN.convert(ffn, num_experts=3, top_k=2)
    assert out is ffn and isinstance(ffn, SMoEFFN)
    assert ffn.w_in.weight is w_in and ffn.w_out.weight is w_out
    sd = ffn.state_dict()
    assert set(sd) == set(before) | {"router.weight"}
    for k, v in before.items():
        if k != "expert_major":
            assert torch.equal(sd[k], v)
    # Experts are contiguous neuron blocks of the same matrices: parameters equal the dense FFN's, and the
    # sparse path reads them as views (expert-major storage is the neuron order itself without GLU).
    assert ffn.is_expert_major and int(sd["expert_major"]) == 4
    w1, _, w2 = ffn.expert_weights()
    assert torch.equal(w1[1], w_in[4:8]) and torch.equal(w2[2], w_out[:, 8:12].t())
    assert w1._base is w_in and w2._base is w_out


def test_convert_glu_interleaves_each_experts_gate_and_up_rows():
    torch.manual_seed(0)
    ffn = SwitchableFFN(8, 12, "swiglu")
    x = torch.randn(5, 8)
    gate, up = ffn.w_in.weight.detach().clone().chunk(2)
    SMoEFFN.convert(ffn, num_experts=3, top_k=2)
    w1, _, _ = ffn.expert_weights()
    assert torch.equal(w1[1], torch.cat([gate[4:8], up[4:8]])) and w1._base is ffn.w_in.weight
    gathered = copy.deepcopy(ffn)
    to_neuron_order(gathered)  # the same SMoE FFN, its experts gathered from neuron-order storage
    torch.testing.assert_close(ffn(x), gathered(x), rtol=0, atol=0)


def test_load_balancing_loss_hand_computed():
    # 4 tokens, N=2, K=1. Tokens 0-2 pick expert 0, token 3 expert 1: f = (3/4, 1/4).
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]], dtype=torch.float64)
    idx = probs.topk(1, dim=-1).indices
    lb, f = load_balancing_loss(probs, idx, 2)
    P = (0.6, 0.4)  # column means
    assert torch.allclose(f, torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert lb.item() == pytest.approx(2 * (0.75 * P[0] + 0.25 * P[1]))  # = 1.1
    # K=2 of N=2: every token uses both experts, f = (1/2, 1/2) and lb = N * sum(P)/2 = 1.
    lb2, f2 = load_balancing_loss(probs, probs.topk(2, dim=-1).indices, 2)
    assert torch.allclose(f2, torch.full((2,), 0.5, dtype=torch.float64))
    assert lb2.item() == pytest.approx(1.0)


def test_z_loss_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    # logsumexp: log 2 and log 4.
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_uniform_router_gives_unit_balance_loss():
    smoe = SMoEFFN(8, 12, num_experts=3, top_k=2)
    with torch.no_grad():
        smoe.router.weight.zero_()
    smoe.train()
    smoe(torch.randn(5, 8))
    lb, z = smoe.pop_aux()
    # P_i = 1/3 for all i whatever f is, so N * sum f_i P_i = sum f_i = 1.
    assert lb.item() == pytest.approx(1.0)
    assert z.item() == pytest.approx(math.log(3) ** 2)
    assert smoe.pop_aux() is None


def test_gates_renormalised_and_router_gets_gradient():
    torch.manual_seed(1)
    smoe = SMoEFFN(8, 12, num_experts=3, top_k=2)
    x = torch.randn(10, 8)
    idx, gate = smoe.route(x, None, 2)
    assert idx.shape == (10, 2) and torch.allclose(gate.sum(-1), torch.ones(10))
    smoe.train()
    y = smoe(x)
    lb, _ = smoe.pop_aux()
    (y.square().sum() + lb).backward()
    assert smoe.router.weight.grad is not None and smoe.router.weight.grad.abs().sum() > 0


def test_all_experts_is_softmax_mixture_of_all():
    torch.manual_seed(2)
    smoe = SMoEFFN(8, 12, num_experts=3, top_k=1).double()
    smoe.all_experts = True
    x = torch.randn(6, 8, dtype=torch.float64)
    p = torch.softmax(x @ smoe.router.weight.t(), dim=-1)
    w1, b1, w2 = smoe.expert_weights()
    ref = sum(p[:, n:n + 1] * (torch.relu(x @ w1[n].t() + b1[n]) @ w2[n]) for n in range(3)) + smoe.w_out.bias
    torch.testing.assert_close(smoe(x), ref)


def _tiny(arch, **over):
    ov = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=96", "smoe.num_experts=3",
          "smoe.top_k=2", "smoe.z_loss_coef=0.001"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(f"configs/{arch}_tiny_smoe.yaml", ov)


def test_method_converts_every_ffn_and_collects_losses():
    cfg = _tiny("t5")
    model = build_model(cfg.model, 64)
    n_before = sum(p.numel() for p in model.parameters())
    m = SMoEMethod(cfg, model)
    ffns = model.ffn_layers()
    assert len(ffns) == len(m.ffns) > 0 and all(isinstance(f, SMoEFFN) for f in ffns)
    n_after = sum(p.numel() for p in model.parameters())
    assert n_after - n_before == len(ffns) * 3 * 32  # only the routers are new
    assert m.ffn_active_fraction() == pytest.approx(2 / 3) and m.router_flops_per_token() == 2 * 32 * 3
    model.train()
    logits = model(input_ids=torch.randint(0, 64, (2, 8)), decoder_input_ids=torch.randint(0, 64, (2, 5)))
    aux = m.extra_loss()
    assert aux is not None and aux.requires_grad and torch.isfinite(aux)
    (logits.sum() + aux).backward()
    metrics = m.after_step(0)
    assert {"smoe_lb_loss", "smoe_z_loss", "smoe_max_load"} <= set(metrics)
    assert metrics["smoe_lb_loss"] >= 1.0 - 1e-6  # its minimum
    assert m.extra_loss() is None  # consumed
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (2, 8)), decoder_input_ids=torch.randint(0, 64, (2, 5)))
    assert m.extra_loss() is None  # nothing collected at eval
    m.set_all_experts(True)
    assert m.ffn_active_fraction() == 1.0 and m.phase() == "dense"
