"""Llama-style decoder: no absolute positions, rotary embeddings (RoPE), optional grouped-query
attention (`n_kv_heads`), and whatever norm / FFN / bias the config names — for llama proper
`norm: rmsnorm`, `activation: swiglu`, `bias: false`.

The same class is the Persimmon-style variant: `activation: squared_relu`, `norm: layernorm`,
`bias: true`, `qk_norm: true` (per-head norm of q and k). Persimmon's partial rotary (rotating only
part of each head) is not expressed by the config: RoPE covers the whole head here.
"""
from __future__ import annotations

from .blocks import TransformerBlock, rope_tables
from .gpt import GPT


class Llama(GPT):
    arch = "llama"

    def _position_embedding(self, cfg):
        return None  # positions enter through RoPE inside attention

    def _block(self, cfg):
        return TransformerBlock(cfg, n_kv_heads=cfg.n_kv_heads, qk_norm=cfg.qk_norm)

    def _extra_kwargs(self, L: int, device) -> dict:
        # Recomputed per forward (L x d_head, negligible) rather than cached as a buffer: a buffer would
        # be cast by .to(dtype)/.double() and lose HF's fp32 tables, and breaks meta-device init.
        return {"rope": rope_tables(L, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta, device)}
