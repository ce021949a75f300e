"""clip_and_step: the no-sync path (fused AdamW's grad_scale / found_inf) equals clip_grad_norm_ + step,
and both skip a step whose gradient norm is not finite without touching parameters or optimizer state.
Fused AdamW runs on CPU too, so the device path is exercised here without a GPU."""
import math

import pytest
import torch

from ssd_megatron.train.clipping import clip_and_step


def _model_and_grads(scale: float, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    return model


def _run(fused: bool, scale: float, max_norm: float, steps: int = 3):
    model = _model_and_grads(scale)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1,
                            **({"fused": True} if fused else {"foreach": True}))
    norms = []
    for i in range(steps):
        torch.manual_seed(100 + i)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * scale
        out = clip_and_step(model.parameters(), opt, max_norm)
        norms.append(float(out.grad_norm))
        assert not bool(out.skipped)
    return model, opt, norms


@pytest.mark.parametrize("scale,max_norm", [(10.0, 1.0), (0.01, 1.0), (10.0, 0.0), (10.0, math.inf)])
def test_device_path_equals_host_path(scale, max_norm):
    fused_model, fused_opt, fused_norms = _run(True, scale, max_norm)
    host_model, host_opt, host_norms = _run(False, scale, max_norm)
    assert fused_norms == pytest.approx(host_norms, rel=1e-6)
    if max_norm == 1.0 and scale == 10.0:
        assert min(host_norms) > 1.0  # clipping was active
    for a, b in zip(fused_model.parameters(), host_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        sa, sb = fused_opt.state[a], host_opt.state[b]
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-5, atol=1e-7)
        assert float(sa["step"]) == float(sb["step"]) == 3
    assert not hasattr(fused_opt, "grad_scale") and not hasattr(fused_opt, "found_inf")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_gradient_skips_the_step(fused, bad):
    model, opt, _ = _run(fused, 1.0, 1.0, steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[0].weight.grad[0, 0] = bad
    out = clip_and_step(model.parameters(), opt, 1.0)
    assert bool(out.skipped) and not math.isfinite(float(out.grad_norm))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[n][k]), (n, k)
