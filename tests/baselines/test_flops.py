"""Analytic training FLOPs per method (train/flops.py + the method hooks) vs FlopCounterMode.

FlopCounterMode counts matmuls (and SDPA kernels it knows). On CPU the fused flash kernel for SDPA is
not one of them, so attention runs on the math backend here, which is made of counted bmm's.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ssd_megatron.config import load_config
from ssd_megatron.models import build_model
from ssd_megatron.train.method import _REGISTRY, TrainingMethod

flops = pytest.importorskip("ssd_megatron.train.flops")
import ssd_megatron.baselines  # noqa: E402,F401  (registers the methods)

V = 128


def _setup(arch, method, step, **over):
    path = f"configs/{arch}_tiny.yaml" if method == "dense" else f"configs/{arch}_tiny_{method}.yaml"
    ov = [f"method={method}", "model.n_layers=3", "model.n_decoder_layers=2", "model.d_model=32",
          "model.n_heads=2", "model.d_ff=256", "train.max_steps=100", "pld.gamma=0.5",
          "moe_dropout.num_experts=8", "moe_dropout.k_start=2"] + [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(path, ov)
    torch.manual_seed(0)
    model = build_model(cfg.model, V)
    m = _REGISTRY[cfg.method](cfg, model) if cfg.method != "dense" else TrainingMethod(cfg, model)
    if method == "pld" and step > 0:
        # A step that drops some layers but leaves every stack at least one: with a whole T5 decoder
        # dropped the encoder gets no gradient and autograd skips its backward, which no analytic
        # count can know (probability ~1e-8 per step for a 12-layer decoder at θ̄=0.5).
        while not (0 < sum(m.draw(step)) < len(m.blocks) and all(any(m.draw(step)[i] for i in st) for st in m.stacks)):
            step += 1
    m.before_step(step)
    model.train()
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, V, (2, 16), generator=g)}
    if arch == "t5":
        batch["decoder_input_ids"] = torch.randint(0, V, (2, 6), generator=g)
    return cfg, model, m, batch


def _measured(model, m, batch):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        logits = model(**batch)
        loss = logits.float().square().mean()
        extra = m.extra_loss()
        if extra is not None:
            loss = loss + extra
        loss.backward()
    return fc.get_total_flops()


# moe_dropout at 50 is sparse (2 < k < 8), at 100 dense (k = N); pld at 0 keeps all, at 30 drops some.
CASES = [("dense", 0), ("smoe", 0), ("moe_dropout", 50), ("moe_dropout", 100), ("pld", 0), ("pld", 30)]


@pytest.mark.parametrize("arch", ["gpt", "bert", "t5"])
@pytest.mark.parametrize("method,step", CASES)
def test_step_flops_match_flop_counter(arch, method, step):
    cfg, model, m, batch = _setup(arch, method, step)
    got = _measured(model, m, batch)
    expected = flops.step_flops(cfg.model, flops.SampleShape.from_batch(batch), 2, V, model, m)
    assert expected == pytest.approx(got, rel=0.02), (arch, method, step, m.layers_kept())


def test_cases_exercise_sparse_and_dropped_steps():
    _, _, m, _ = _setup("gpt", "moe_dropout", 50)
    assert 2 < m.k < 8
    assert len(_setup("t5", "pld", 30)[2].layers_kept()) < 5
