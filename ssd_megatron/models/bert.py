"""BERT: bidirectional encoder with a masked-LM head.

Embeddings = token + learned position + token type (segment 0 unless given; our MLM data has one
segment), then an embedding LayerNorm as in BERT. Blocks are pre-LN by default (paper appendix A,
with a final norm before the head); `model.norm_position=post` gives original BERT (what HF
checkpoints need). MLM head as in BERT: dense -> activation -> norm -> decoder (tied to the token
embedding when `tie_embeddings`) + per-token output bias.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ffn.activations import apply_activation, is_glu
from .blocks import ModelMixin, TransformerBlock, init_weights, make_norm, padding_mask

# The head transform is a plain d->d map: a GLU FFN activation contributes its gate function.
_GLU_GATE = {"swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu}


class HeadActivation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _GLU_GATE[self.name](h) if is_glu(self.name) else apply_activation(h, self.name)

    def extra_repr(self) -> str:
        return self.name


class BERT(ModelMixin, nn.Module):
    arch = "bert"

    def __init__(self, cfg, vocab_size: int, type_vocab_size: int = 2):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        d = cfg.d_model
        self.tok_emb = nn.Embedding(vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)
        self.type_emb = nn.Embedding(type_vocab_size, d)
        self.emb_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.head_dense = nn.Linear(d, d, bias=cfg.bias)
        self.head_act = HeadActivation(cfg.activation)
        self.head_norm = make_norm(cfg)
        self.lm_head = nn.Linear(d, vocab_size, bias=cfg.bias)
        self.init_weights()

    def init_weights(self) -> None:
        self.tie_weights()
        init_weights(self, self.cfg.init_std, [self.layers])

    def embed(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        L = input_ids.shape[1]
        if L > self.pos_emb.num_embeddings:
            raise ValueError(f"sequence length {L} exceeds model.max_seq_len ({self.pos_emb.num_embeddings})")
        if token_type_ids is None:
            types = self.type_emb.weight[0]  # segment 0 everywhere: one row, no gather
        else:
            types = self.type_emb(token_type_ids)
        x = self.tok_emb(input_ids) + types + self.pos_emb(torch.arange(L, device=input_ids.device))
        return self.drop(self.emb_norm(x))

    def block_kwargs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> dict:
        return {} if attention_mask is None else {"attn_mask": padding_mask(attention_mask)}

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
        x = self.residual_stream(self.embed(input_ids, token_type_ids))
        kw = self.block_kwargs(input_ids, attention_mask)
        for blk in self.layers:
            x = blk(x, **kw)
        h = self.head_norm(self.head_act(self.head_dense(self.final_norm(x))))
        return self.lm_head(h)
