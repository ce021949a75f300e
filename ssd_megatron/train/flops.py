"""Analytic training FLOPs of a step, general enough for every method (dense, SSD, SMoE, MoE-Dropout, PLD).

Conventions (Megatron-LM / PaLM appendix B / torchtitan):
- a multiply-add is 2 FLOPs; only matrix products are counted (norms, softmax, activations, the
  loss and the optimizer are < 1-2% of a transformer step and are left out, as everyone does);
- fwd + bwd = 3 x forward (the backward computes a gradient for the input and one for the weight of
  every product);
- attention: per layer and query token, 2*Lk*d for Q K^T plus 2*Lk*d for (softmax) V, with Lk the
  *full* key length. Causal masking is ignored, as PaLM and Megatron do: the reported number is the
  work of a dense attention matrix, the same as `torch.utils.flop_counter.FlopCounterMode` counts for
  SDPA, and a flash kernel that skips the masked half does less. This keeps MFU comparable with the
  published numbers (which use the same rule);
- FFN: per token 2*d*F_in + 2*F*d (F_in = 2F for GLU activations), times the method's active
  fraction (K/N for a top-K-of-N sparse step: only the selected experts are computed), plus the
  method's router FLOPs per token (forward; its backward as `router_backward_flops_per_token` says:
  2x for a trained router, 0 for a frozen one with a constant gate);
- dropped layers (progressive layer dropping) contribute nothing;
- the output head: every Linear outside the transformer blocks (GPT's LM head; BERT's MLM transform
  and decoder; T5's LM head) on every output position. Embedding lookups cost nothing.

`sample_flops(model_cfg, shape, ...)` counts one *sample* (its shape: encoder length, and for T5 the
decoder length); `step_flops` is its training count times the samples in the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn


@dataclass
class SampleShape:
    seq_len: int  # input_ids length (encoder for T5)
    dec_len: int = 0  # T5 decoder length (decoder_input_ids)

    @classmethod
    def from_batch(cls, batch: dict) -> "SampleShape":
        dec = batch.get("decoder_input_ids")
        return cls(int(batch["input_ids"].shape[-1]), int(dec.shape[-1]) if dec is not None else 0)


def _kv_dim(cfg) -> int:
    heads_kv = cfg.n_kv_heads or cfg.n_heads
    return heads_kv * (cfg.d_model // cfg.n_heads)


def ffn_flops_per_token(cfg, active_fraction: float = 1.0) -> float:
    glu = cfg.activation in ("swiglu", "geglu", "reglu")
    f_in = cfg.d_ff * (2 if glu else 1)
    return (2.0 * cfg.d_model * f_in + 2.0 * cfg.d_ff * cfg.d_model) * active_fraction


def self_attention_flops_per_token(cfg, key_len: int) -> float:
    d, kv = cfg.d_model, _kv_dim(cfg)
    proj = 2.0 * d * d * 2 + 2.0 * d * kv * 2  # q, o ; k, v
    core = 4.0 * key_len * d
    return proj + core


def head_flops_per_token(model: Optional[nn.Module], cfg, vocab_size: int) -> float:
    """Linear layers outside the transformer blocks (the LM / MLM head), per output position."""
    if model is None:
        return 2.0 * cfg.d_model * vocab_size
    from ..parallel.data_parallel import transformer_blocks, unwrap

    model = unwrap(model)
    inside = {id(m) for blk in transformer_blocks(model) for m in blk.modules()}
    total = 0.0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m) not in inside:
            total += 2.0 * m.in_features * m.out_features
    return total


@dataclass
class FlopsCount:
    """FLOPs of one sample: the forward without routing, and the routing's forward and backward."""

    forward: float
    router_forward: float = 0.0
    router_backward: float = 0.0

    @property
    def training(self) -> float:
        """fwd + bwd: 3 x the matmul forward; the router's backward as its method says."""
        return 3.0 * self.forward + self.router_forward + self.router_backward

    @property
    def inference(self) -> float:
        return self.forward + self.router_forward


def sample_flops(cfg, shape: SampleShape, vocab_size: int, model: Optional[nn.Module] = None,
                 ffn_fraction: float = 1.0, router_fwd: float = 0.0, router_bwd: float = 0.0,
                 layers_kept: Optional[Sequence[int]] = None) -> FlopsCount:
    """FLOPs of one sample. Layer indices run over encoder blocks then decoder blocks
    (`model.transformer_layers()` order); router_* are per token per FFN layer."""
    ffn = ffn_flops_per_token(cfg, ffn_fraction)
    head = head_flops_per_token(model, cfg, vocab_size)
    if cfg.arch == "t5":
        n_enc, n_dec = cfg.n_layers, cfg.n_decoder_layers or cfg.n_layers
        Le, Ld = shape.seq_len, shape.dec_len or shape.seq_len
        d, kv = cfg.d_model, _kv_dim(cfg)
        enc_layer = Le * (self_attention_flops_per_token(cfg, Le) + ffn)
        cross = Ld * (2.0 * d * d * 2 + 4.0 * Le * d) + Le * (2.0 * d * kv * 2)
        dec_layer = Ld * (self_attention_flops_per_token(cfg, Ld) + ffn) + cross
        layers = [(enc_layer, Le)] * n_enc + [(dec_layer, Ld)] * n_dec
        out_tokens = Ld
    else:
        L = shape.seq_len
        layers = [(L * (self_attention_flops_per_token(cfg, L) + ffn), L)] * cfg.n_layers
        out_tokens = L
    kept = range(len(layers)) if layers_kept is None else layers_kept
    fwd = sum(layers[i][0] for i in kept) + out_tokens * head
    routed_tokens = sum(layers[i][1] for i in kept)
    return FlopsCount(fwd, router_fwd * routed_tokens, router_bwd * routed_tokens)


def method_sample_flops(cfg, shape: SampleShape, vocab_size: int, model=None, method=None) -> FlopsCount:
    """sample_flops with the method's view of the last step (active fraction, router, kept layers)."""
    if method is None:
        return sample_flops(cfg, shape, vocab_size, model)
    rf = float(method.router_flops_per_token())
    rb = getattr(method, "router_backward_flops_per_token", None)
    rb = float(rb()) if callable(rb) else 2.0 * rf
    return sample_flops(cfg, shape, vocab_size, model, ffn_fraction=float(method.ffn_active_fraction()),
                        router_fwd=rf, router_bwd=rb, layers_kept=method.layers_kept())


def step_flops(cfg, shape: SampleShape, samples: int, vocab_size: int, model=None, method=None) -> float:
    """Training FLOPs (fwd + bwd) of a step over `samples` samples of `shape`."""
    return samples * method_sample_flops(cfg, shape, vocab_size, model, method).training


def dense_params_flops_per_token(n_params_no_emb: int) -> float:
    """The 6N rule's share (for comparison with other tools' MFU)."""
    return 6.0 * n_params_no_emb


# Dense bf16 tensor-core peaks (no structured sparsity), FLOP/s. Matched by substring of the CUDA
# device name, longest key first.
PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "H800": 989e12, "H20": 148e12,
    "B200": 2250e12, "B100": 1750e12, "GB200": 2500e12,
    "A100": 312e12, "A800": 312e12, "A30": 165e12, "A10G": 70e12, "A10": 125e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "A6000": 155e12, "RTX 6000 Ada": 364e12,
    "V100": 125e12, "MI300X": 1307e12, "MI250X": 383e12,
}


def peak_flops(device) -> Optional[float]:
    """bf16 peak of the device (per GPU), None on CPU or an unknown GPU (then no MFU is reported)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16[key]
    return None
