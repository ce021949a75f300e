"""T5: encoder-decoder with relative position bias, no absolute positions.

As in T5: attention logits are not scaled by 1/sqrt(d_head) (SDPA gets scale=1.0); one learned
relative-position bias per stack (bidirectional buckets in the encoder, causal in the decoder) is
computed once per forward and added in every self-attention of that stack (HF stores it in block 0;
we hold it on the stack so a dropped/wrapped first block doesn't lose it); cross-attention has no
position bias. The shared token embedding feeds both stacks; with `tie_embeddings` the LM head is
that embedding and the decoder output is scaled by d_model^-0.5 first (T5's rescale for a tied head).
Use `bias: false`, `norm: rmsnorm` for T5 proper (configs/t5_*.yaml do); the model honours the config.
Init is the shared Megatron-style one (blocks.init_weights), not HF T5's per-matrix d^-0.5 scales: with
unscaled attention, N(0, 0.02) q/k keep initial logits small (std ~ 0.02^2 * d * sqrt(d_head)).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .blocks import ModelMixin, TransformerBlock, causal_mask, init_weights, make_norm, padding_mask


def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """Mesh-TF bucketing of (key - query) offsets: exact for small |offset|, log-spaced up to
    max_distance, clipped beyond. Causal stacks only see offsets <= 0."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # clamp(min=1) only avoids log(0) in lanes that `is_small` discards anyway.
    large = max_exact + (torch.log(rel.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, rel, large)


class RelativePositionBias(nn.Module):
    def __init__(self, n_heads: int, num_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, n_heads)

    def forward(self, Lq: int, Lk: int, device=None) -> torch.Tensor:
        """[1, H, Lq, Lk] additive attention bias."""
        q = torch.arange(Lq, device=device)[:, None]
        k = torch.arange(Lk, device=device)[None, :]
        b = relative_position_bucket(k - q, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embedding(b).permute(2, 0, 1).unsqueeze(0)


class T5Stack(nn.Module):
    def __init__(self, cfg, n_layers: int, decoder: bool):
        super().__init__()
        self.decoder = decoder
        self.relative_bias = RelativePositionBias(cfg.n_heads, cfg.relative_attention_num_buckets,
                                                  cfg.relative_attention_max_distance, bidirectional=not decoder)
        self.layers = nn.ModuleList([TransformerBlock(cfg, cross_attention=decoder, attn_scale=1.0)
                                     for _ in range(n_layers)])
        self.final_norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask=None, memory=None, memory_mask=None) -> torch.Tensor:
        L = x.shape[1]
        kw = {"position_bias": self.relative_bias(L, L, x.device), "attn_mask": attn_mask}
        if self.decoder:
            kw.update(memory=memory, memory_mask=memory_mask)
        x = self.drop(x)
        for blk in self.layers:
            x = blk(x, **kw)
        return self.drop(self.final_norm(x))


class T5(ModelMixin, nn.Module):
    arch = "t5"

    def __init__(self, cfg, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, cfg.n_layers, decoder=False)
        self.decoder = T5Stack(cfg, cfg.n_decoder_layers or cfg.n_layers, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        self.tie_weights()
        init_weights(self, self.cfg.init_std, [self.encoder.layers, self.decoder.layers])

    def transformer_layers(self) -> list:
        return list(self.encoder.layers) + list(self.decoder.layers)

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.encoder(self.residual_stream(self.tok_emb(input_ids)), attn_mask=padding_mask(attention_mask))

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
               attention_mask: Optional[torch.Tensor] = None,
               decoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        Ld = decoder_input_ids.shape[1]
        self_mask = causal_mask(Ld, Ld, decoder_input_ids.device)
        if decoder_attention_mask is not None:
            self_mask = self_mask & padding_mask(decoder_attention_mask)
        h = self.decoder(self.residual_stream(self.tok_emb(decoder_input_ids)), attn_mask=self_mask, memory=memory,
                         memory_mask=padding_mask(attention_mask))
        if self.cfg.tie_embeddings:
            h = h * (self.cfg.d_model ** -0.5)
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                decoder_attention_mask: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)
