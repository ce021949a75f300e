"""Progressive Layer Dropping: θ schedule, keep probabilities, seeded draws, scaling, eval behaviour."""
import math

import pytest
import torch

from ssd_megatron.baselines.pld import PLDBlock, PLDMethod, keep_probabilities, pld_theta
from ssd_megatron.config import load_config
from ssd_megatron.models import build_model


@pytest.mark.parametrize("step", [0, 1, 10, 693, 1000, 5000, 200_000])
def test_theta_schedule(step):
    assert pld_theta(step) == pytest.approx(0.5 * math.exp(-0.001 * step) + 0.5, rel=1e-15)
    assert pld_theta(step, 0.3, 0.01) == pytest.approx(0.7 * math.exp(-0.01 * step) + 0.3, rel=1e-15)
    assert pld_theta(0) == 1.0 and pld_theta(693) == pytest.approx(0.75, abs=1e-4)


def test_keep_probabilities():
    assert keep_probabilities(1.0, 4) == [1.0] * 4
    assert keep_probabilities(0.5, 4) == pytest.approx([0.875, 0.75, 0.625, 0.5])
    L = 12
    p = keep_probabilities(0.5, L)
    assert p == pytest.approx([1 - i * 0.5 / L for i in range(1, L + 1)])
    # The paper's "overall dropout rate 0.25": mean drop = (1 - θ)(L + 1) / (2L) -> 0.25.
    assert 1 - sum(p) / L == pytest.approx(0.5 * (L + 1) / (2 * L))


def _model(arch="gpt", layers=4, **over):
    ov = [f"model.n_layers={layers}", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
          "model.n_decoder_layers=3"] + [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(f"configs/{arch}_tiny_pld.yaml", ov)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, 64)


def _batch(arch):
    g = torch.Generator().manual_seed(1)
    b = {"input_ids": torch.randint(0, 64, (2, 8), generator=g)}
    if arch == "t5":
        b["decoder_input_ids"] = torch.randint(0, 64, (2, 5), generator=g)
    return b


def test_state_dict_keys_unchanged_and_stacks():
    cfg, model = _model("t5")
    keys = set(model.state_dict())
    m = PLDMethod(cfg, model)
    assert set(model.state_dict()) == keys  # a PLD checkpoint loads into a plain model
    assert all(isinstance(b, PLDBlock) for b in model.transformer_layers())
    assert m.stacks == [[0, 1, 2, 3], [4, 5, 6]]  # encoder (L=4) and decoder (L=3) separately
    probs = m.keep_probs(10**6)
    assert probs == pytest.approx(keep_probabilities(0.5, 4) + keep_probabilities(0.5, 3), abs=1e-12)


def test_draws_seeded_reproducible_and_follow_p():
    cfg, model = _model(layers=4, **{"pld.gamma": 1.0})
    m = PLDMethod(cfg, model)
    m2 = PLDMethod(cfg, build_model(cfg.model, 64))
    steps = range(100, 3100)
    draws = [m.draw(s) for s in steps]
    assert draws == [m2.draw(s) for s in reversed(steps)][::-1]  # order-independent, fresh object
    freq = [sum(d[i] for d in draws) / len(draws) for i in range(4)]
    assert freq == pytest.approx([0.875, 0.75, 0.625, 0.5], abs=0.035)
    cfg_other, _ = _model(layers=4, **{"pld.gamma": 1.0, "train.seed": 99})
    other = PLDMethod(cfg_other, build_model(cfg.model, 64))
    assert [other.draw(s) for s in steps] != draws


def test_kept_layers_scaled_dropped_layers_identity():
    cfg, model = _model(layers=4, **{"pld.gamma": 1.0})
    model = model.double()
    blocks = model.transformer_layers()
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    plain = [b(x, is_causal=True) for b in blocks]  # before conversion
    m = PLDMethod(cfg, model)
    model.train()
    step = next(s for s in range(100, 200) if not all(m.draw(s)) and any(m.draw(s)))
    m.before_step(step)
    kept = m.layers_kept()
    assert kept == [i for i, k in enumerate(m.draw(step)) if k]
    for i, blk in enumerate(blocks):
        out = blk(x, is_causal=True)
        if i in kept:
            p = m.keep_probs(step)[i]
            torch.testing.assert_close(out, x + (plain[i] - x) / p)
        else:
            assert torch.equal(out, x)
    # Dropped blocks get no gradient (DDP needs find_unused_parameters).
    assert PLDMethod.needs_find_unused_parameters


@pytest.mark.parametrize("arch", ["gpt", "bert", "t5"])
def test_eval_runs_all_layers_and_is_deterministic(arch):
    cfg, model = _model(arch, **{"pld.gamma": 1.0})
    batch = _batch(arch)
    model.eval()
    with torch.no_grad():
        ref = model(**batch)
    m = PLDMethod(cfg, model)
    m.before_step(5000)  # θ ≈ θ̄: some layers are drawn as dropped
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(**batch), ref) or m.layers_kept() == list(range(len(m.blocks)))
    m.eval_mode()
    model.eval()
    with torch.no_grad():
        a, b = model(**batch), model(**batch)
    assert torch.equal(a, ref) and torch.equal(b, ref)
    # model.eval() alone also disables dropping (no reliance on the loop calling eval_mode()).
    m.train_mode()
    with torch.no_grad():
        assert torch.equal(model(**batch), ref)


def test_step_zero_drops_nothing():
    cfg, model = _model()
    m = PLDMethod(cfg, model)
    m.before_step(0)
    assert m.theta == 1.0 and m.layers_kept() == [0, 1, 2, 3]
    assert m.after_step(0) == {"pld_theta": 1.0, "layers_kept": 4}


def test_whole_model_compile_does_not_recompile_per_pattern():
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg, model = _model(layers=4, **{"pld.gamma": 0.5})
    m = PLDMethod(cfg, model)
    torch._dynamo.reset()
    counters.clear()
    model.compile(backend="eager")
    x = torch.randint(0, 64, (2, 8))
    patterns = set()
    try:
        for s in range(25):
            m.before_step(s)
            patterns.add(tuple(m.layers_kept()))
            model(input_ids=x).sum().backward()
    finally:
        torch._dynamo.reset()
    assert len(patterns) > 4
    assert counters["stats"]["unique_graphs"] <= 3  # embed, one block graph, head; not one per pattern
