"""Analytic training FLOPs (train/flops.py) vs torch's FlopCounterMode on small models.

SDPA runs on its MATH backend here: on CPU FlopCounterMode does not see the fused attention kernel,
while the math path is plain bmm's (full L x L, the convention flops.py documents).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ssd_megatron.config import ModelConfig
from ssd_megatron.models import build_model
from ssd_megatron.train.flops import SampleShape, sample_flops, step_flops
from ssd_megatron.train.loss import lm_loss
from ssd_megatron.train.method import TrainingMethod

VOCAB = 320
B, L, LD = 2, 32, 12


def _cfg(arch, activation="relu"):
    return ModelConfig(arch=arch, n_layers=2, d_model=64, n_heads=4, d_ff=256, activation=activation,
                       max_seq_len=64, vocab_size=VOCAB, n_decoder_layers=2 if arch == "t5" else 0)


def _batch(arch):
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, VOCAB, (B, L), generator=g)}
    if arch == "t5":
        batch["decoder_input_ids"] = torch.randint(0, VOCAB, (B, LD), generator=g)
        batch["labels"] = torch.randint(0, VOCAB, (B, LD), generator=g)
    else:
        batch["labels"] = torch.randint(0, VOCAB, (B, L), generator=g)
    return batch


def _measure(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        loss_sum, n = lm_loss(model(**inputs), batch["labels"])
        (loss_sum / n).backward()
    return fc.get_total_flops()


class _Sparse(TrainingMethod):
    def __init__(self, cfg_k, n, d):
        super().__init__(None, None)
        self.k, self.n, self.d = cfg_k, n, d

    def ffn_active_fraction(self):
        return self.k / self.n

    def router_flops_per_token(self):
        return 2.0 * self.d * self.n


@pytest.mark.parametrize("arch", ["gpt", "bert", "t5"])
@pytest.mark.parametrize("sparse", [False, True])
def test_flops_match_flop_counter(arch, sparse):
    torch.manual_seed(0)
    cfg = _cfg(arch)
    model = build_model(cfg, VOCAB)
    method = None
    if sparse:
        n, k = 8, 2
        g = torch.Generator().manual_seed(1)
        for ffn in model.ffn_layers():
            ffn.configure_experts(n, k)
            ffn.set_clustering(torch.randperm(ffn.d_ff, generator=g) % n)
            ffn.set_backend("reference")
            ffn.set_mode("sparse")
        method = _Sparse(k, n, cfg.d_model)
    batch = _batch(arch)
    measured = _measure(model, batch)
    analytic = step_flops(cfg, SampleShape.from_batch(batch), B, VOCAB, model, method)
    assert analytic == pytest.approx(measured, rel=0.02), (analytic, measured)


def test_flops_glu_and_dropped_layers():
    cfg = _cfg("gpt", activation="swiglu")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    batch = _batch("gpt")
    measured = _measure(model, batch)
    analytic = step_flops(cfg, SampleShape.from_batch(batch), B, VOCAB, model)
    assert analytic == pytest.approx(measured, rel=0.02)
    full = sample_flops(cfg, SampleShape(L), VOCAB, model)
    one = sample_flops(cfg, SampleShape(L), VOCAB, model, layers_kept=[0])
    none = sample_flops(cfg, SampleShape(L), VOCAB, model, layers_kept=[])
    assert none.forward == pytest.approx(L * 2 * cfg.d_model * VOCAB)  # only the head
    assert full.forward - one.forward == pytest.approx(one.forward - none.forward)


def test_router_backward_hook():
    cfg = _cfg("gpt")
    m = _Sparse(2, 8, cfg.d_model)
    fc = sample_flops(cfg, SampleShape(L), VOCAB, None, 0.25, m.router_flops_per_token(),
                      m.router_backward_flops_per_token())
    assert fc.router_forward == pytest.approx(cfg.n_layers * L * 2 * cfg.d_model * 8)
    assert fc.training == pytest.approx(3 * fc.forward + 3 * fc.router_forward)
