"""GPT: decoder-only causal LM with learned absolute positions (GPT-2 layout, pre-LN, final norm).

Module names (used by the HF converter and by parallelism plans): tok_emb, pos_emb, layers[i]
(TransformerBlock: norm1, attn.{q,k,v,o}_proj, norm2, ffn.{w_in,w_out}), final_norm, lm_head.
With `tie_embeddings` the LM head shares the token embedding's Parameter (one tensor, one gradient).

`model(input_ids, loss_labels=labels)` returns `(loss_sum, n_valid)` instead of logits: the LM head and
the cross-entropy run fused in row chunks (`train.loss.fused_lm_loss`), so the [tokens, vocab] logits
are never materialised. The training loop uses it (`fused_loss = True` says the model offers it); the
loss goes through the model's own forward so that DDP/FSDP2 see the head's weight used in forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..train.loss import fused_lm_loss
from .blocks import ModelMixin, TransformerBlock, causal_mask, init_weights, make_norm, padding_mask


class GPT(ModelMixin, nn.Module):
    arch = "gpt"
    fused_loss = True

    def __init__(self, cfg, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        d = cfg.d_model
        self.tok_emb = nn.Embedding(vocab_size, d)
        self.pos_emb = self._position_embedding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([self._block(cfg) for _ in range(cfg.n_layers)])
        # Pre-LN leaves the residual stream un-normalised, so the head needs a final norm; post-LN
        # blocks already end in one.
        self.final_norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.init_weights()

    # -- hooks the llama subclass overrides
    def _position_embedding(self, cfg) -> Optional[nn.Module]:
        return nn.Embedding(cfg.max_seq_len, cfg.d_model)

    def _block(self, cfg) -> nn.Module:
        return TransformerBlock(cfg)

    def _extra_kwargs(self, L: int, device) -> dict:
        return {}

    def init_weights(self) -> None:
        self.tie_weights()
        init_weights(self, self.cfg.init_std, [self.layers])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            L = input_ids.shape[1]
            if L > self.pos_emb.num_embeddings:
                raise ValueError(f"sequence length {L} exceeds model.max_seq_len ({self.pos_emb.num_embeddings})")
            x = x + self.pos_emb(torch.arange(L, device=input_ids.device))
        return self.drop(x)

    def block_kwargs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> dict:
        """Per-forward extras every block receives: computed once here, not per layer."""
        L = input_ids.shape[1]
        kw = self._extra_kwargs(L, input_ids.device)
        if attention_mask is None:
            kw["is_causal"] = True  # lets SDPA pick its fused causal kernels, no mask tensor at all
        else:
            kw["attn_mask"] = causal_mask(L, L, input_ids.device) & padding_mask(attention_mask)
        return kw

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                loss_labels: Optional[torch.Tensor] = None, **_):
        x = self.residual_stream(self.embed(input_ids))
        kw = self.block_kwargs(input_ids, attention_mask)
        for blk in self.layers:
            x = blk(x, **kw)
        h = self.final_norm(x)
        if loss_labels is not None:
            return fused_lm_loss(h, self.lm_head.weight, loss_labels)
        return self.lm_head(h)
