"""Build every architecture from a ModelConfig and train-step it: shapes, FFN/block inventories,
finite gradients for every parameter, init scales, bf16 autocast, and the edge cases of masking."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssd_megatron.config import ModelConfig, load_config
from ssd_megatron.ffn import SwitchableFFN
from ssd_megatron.models import build_model

V = 61


def _cfg(arch, **kw):
    base = dict(arch=arch, n_layers=3, d_model=32, n_heads=4, d_ff=64, max_seq_len=32, dropout=0.1)
    if arch == "t5":
        base.update(n_decoder_layers=2, norm="rmsnorm", bias=False)
    if arch == "llama":
        base.update(norm="rmsnorm", bias=False, activation="swiglu", n_kv_heads=2)
    base.update(kw)
    return ModelConfig(**base)


def _batch(arch, B=3, L=16):
    ids = torch.randint(0, V, (B, L))
    labels = torch.randint(0, V, (B, L))
    labels[:, :2] = -100
    batch = {"input_ids": ids, "labels": labels}
    if arch == "bert":
        batch["attention_mask"] = torch.ones(B, L, dtype=torch.long)
        batch["attention_mask"][0, 10:] = 0
    if arch == "t5":
        batch["decoder_input_ids"] = torch.randint(0, V, (B, 9))
        batch["labels"] = torch.randint(0, V, (B, 9))
    return batch


def _loss(logits, labels):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


EXPECTED_FFNS = {"gpt": 3, "bert": 3, "t5": 5, "llama": 3}


@pytest.mark.parametrize("arch", ["gpt", "bert", "t5", "llama"])
def test_train_step_all_grads_finite(arch):
    torch.manual_seed(0)
    model = build_model(_cfg(arch), V).train()
    batch = _batch(arch)
    logits = model(**batch)
    assert logits.shape == (*batch["labels"].shape, V)
    _loss(logits, batch["labels"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arch}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{arch}: {name} has a non-finite gradient"
    ffns = model.ffn_layers()
    assert len(ffns) == EXPECTED_FFNS[arch] == len(model.transformer_layers())
    assert all(isinstance(f, SwitchableFFN) for f in ffns)
    assert [b.ffn for b in model.transformer_layers()] == ffns  # same order: encoder then decoder


def test_t5_layer_lists():
    model = build_model(_cfg("t5"), V)
    assert len(model.encoder.layers) == 3 and len(model.decoder.layers) == 2
    assert model.transformer_layers() == list(model.encoder.layers) + list(model.decoder.layers)
    assert model.ffn_layers()[0] is model.encoder.layers[0].ffn
    assert model.decoder.layers[0].cross_attn is not None and model.encoder.layers[0].cross_attn is None


@pytest.mark.parametrize("arch", ["gpt", "bert", "t5", "llama"])
def test_tied_head_is_one_parameter(arch):
    model = build_model(_cfg(arch, tie_embeddings=True), V)
    assert model.lm_head.weight is model.tok_emb.weight
    untied = build_model(_cfg(arch, tie_embeddings=False), V)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_parameters() - model.num_parameters() == V * 32


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = _cfg("gpt", n_layers=8, d_model=256, n_heads=4, d_ff=1024, init_std=0.02)
    model = build_model(cfg, 1000)
    blk = model.layers[0]
    scaled = 0.02 / math.sqrt(2 * 8)
    assert blk.ffn.w_in.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert blk.ffn.w_out.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert blk.attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert blk.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(blk.ffn.w_in.bias) == 0 and torch.all(blk.norm1.weight == 1)


@pytest.mark.parametrize("arch", ["gpt", "bert", "t5", "llama"])
def test_bf16_autocast_forward_backward(arch):
    torch.manual_seed(0)
    model = build_model(_cfg(arch, dropout=0.0), V)
    batch = _batch(arch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**batch)
    ref = model(**batch)
    assert logits.dtype == torch.bfloat16
    _loss(logits, batch["labels"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert (logits.float() - ref).abs().max().item() < 0.05


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_fully_padded_sample_stays_finite(arch):
    model = build_model(_cfg(arch, dropout=0.0), V)
    batch = _batch(arch)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][1] = 0
    logits = model(**batch)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_decoder_is_causal(arch):
    """Changing a later token must not change earlier logits (with and without a padding mask)."""
    model = build_model(_cfg(arch, dropout=0.0), V).eval()
    ids = torch.randint(0, V, (1, 12))
    ids2 = ids.clone()
    ids2[0, 8] = (ids[0, 8] + 1) % V
    for mask in (None, torch.ones_like(ids)):
        a, b = model(input_ids=ids, attention_mask=mask), model(input_ids=ids2, attention_mask=mask)
        assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6) and not torch.allclose(a[:, 8:], b[:, 8:])


def test_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(_cfg("gpt"), 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        build_model(_cfg("gpt"), V)(input_ids=torch.zeros(1, 40, dtype=torch.long))


@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny", "t5_tiny"])
def test_shipped_tiny_configs_build(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    model = build_model(cfg.model, 128)
    assert len(model.ffn_layers()) == cfg.model.n_layers + (cfg.model.n_decoder_layers if cfg.model.arch == "t5" else 0)


@pytest.mark.parametrize("arch", ["gpt", "t5"])
def test_meta_device_construction_then_init(arch):
    """FSDP2-style: build on meta, materialise with to_empty, re-init; ties and buffers must survive."""
    with torch.device("meta"):
        model = build_model(_cfg(arch, dropout=0.0), V)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.tok_emb.weight
    assert all(torch.equal(f.expert_perm, torch.arange(64)) for f in model.ffn_layers())
    batch = _batch(arch)
    assert torch.isfinite(model(**batch)).all()


@pytest.mark.parametrize("arch", ["gpt", "bert", "t5", "llama"])
@pytest.mark.parametrize("fp32_residual", [False, True])
def test_residual_stream_dtype_under_autocast(arch, fp32_residual):
    """Megatron's fp32_residual_connection: off (default) = the blocks see and return the autocast dtype;
    on = fp32; without autocast the flag changes nothing (bit-identical outputs)."""
    torch.manual_seed(0)
    model = build_model(_cfg(arch, dropout=0.0, norm_position="pre", fp32_residual_connection=fp32_residual), V)
    seen = []
    for blk in model.transformer_layers():
        blk.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    batch = _batch(arch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    want = torch.float32 if fp32_residual else torch.bfloat16
    assert seen and all(d == (want, want) for d in seen), seen
    assert torch.isfinite(out.float()).all()
    torch.manual_seed(0)
    other = build_model(_cfg(arch, dropout=0.0, norm_position="pre", fp32_residual_connection=not fp32_residual), V)
    assert torch.equal(model(**inputs), other(**inputs))
