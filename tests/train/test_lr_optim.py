"""LR schedules (noam formula, cosine endpoints, warm-up) and AdamW decay groups."""
import math

import pytest
import torch

from ssd_megatron.config import ModelConfig
from ssd_megatron.models import build_model
from ssd_megatron.train.lr_schedule import LRSchedule
from ssd_megatron.train.optimizer import build_optimizer, param_groups


@pytest.mark.parametrize("step", [0, 1, 99, 1999, 2000, 5000, 199999])
def test_noam_formula(step):
    s = LRSchedule("noam", lr=0.5, warmup_steps=2000, max_steps=200000, d_model=768)
    n = step + 1
    assert s(step) == pytest.approx(0.5 * 768 ** -0.5 * min(n ** -0.5, n * 2000 ** -1.5), rel=1e-12)


def test_noam_peak_at_warmup():
    s = LRSchedule("noam", lr=0.5, warmup_steps=2000, max_steps=200000, d_model=768)
    peak = 0.5 / math.sqrt(768 * 2000)
    assert s(1999) == pytest.approx(peak)
    assert s(1998) < peak and s(2000) < peak


def test_cosine_endpoints():
    s = LRSchedule("cosine", lr=1e-3, warmup_steps=10, max_steps=100, min_lr=1e-5)
    assert s(0) == pytest.approx(1e-4)  # first warm-up step is not zero
    assert s(9) == pytest.approx(1e-3)  # peak at the end of warm-up
    assert s(99) == pytest.approx(1e-5)  # min_lr exactly at the last step
    assert s(500) == pytest.approx(1e-5)
    mid = s(54)  # halfway through the decay
    assert mid == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5), rel=1e-9)
    vals = [s(i) for i in range(9, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_cosine_no_warmup_and_constant():
    s = LRSchedule("cosine", lr=2.0, warmup_steps=0, max_steps=11)
    assert s(0) == pytest.approx(2.0) and s(10) == pytest.approx(0.0)
    c = LRSchedule("constant", lr=3.0, warmup_steps=4, max_steps=100)
    assert [c(i) for i in range(6)] == pytest.approx([0.75, 1.5, 2.25, 3.0, 3.0, 3.0])


def test_decay_groups():
    cfg = ModelConfig(arch="bert", n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=16, vocab_size=64)
    model = build_model(cfg, 64)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    decay, no_decay = ids(groups["decay"]), ids(groups["no_decay"])
    assert not decay & no_decay
    assert decay | no_decay == {id(p) for p in model.parameters()}
    named = dict(model.named_parameters())
    for name, p in named.items():
        is_matrix = p.ndim == 2 and "emb" not in name and "norm" not in name
        if id(p) == id(model.tok_emb.weight):
            is_matrix = False  # tied LM head = token embedding: not decayed
        assert (id(p) in decay) == is_matrix, name
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    opt = build_optimizer(model, type("O", (), dict(lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1))(),
                          torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2
