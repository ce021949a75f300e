"""Building blocks shared by every architecture: norms, attention, the transformer block, init.

Attention always goes through `F.scaled_dot_product_attention` so that the fused (flash /
memory-efficient) kernels are used on GPU. Per-call extras (padding masks, T5's relative position
bias, RoPE tables) are computed once per forward by the model and handed to every block as keyword
arguments: a block's `forward(x, **kwargs)` returns only a tensor, so wrappers (layer dropping,
activation checkpointing) can wrap any block without knowing the architecture.

Mask convention: `attn_mask` is boolean, True = may attend, broadcastable to [B, H, Lq, Lk]; it is
turned into an additive float mask in the query's dtype only inside attention, so that under
autocast the fill value is that dtype's finite minimum (a fully masked row then attends uniformly
instead of producing NaN).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ffn import SwitchableFFN


class RMSNorm(nn.Module):
    """x / rms(x) * g, statistics in at least fp32 (as HF T5/llama do, so bf16 inputs stay stable)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # promote_types keeps float64 in float64 (exactness tests) while lifting bf16/fp16 to fp32.
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(cfg, dim: Optional[int] = None) -> nn.Module:
    dim = cfg.d_model if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


# --------------------------------------------------------------------------- rotary embeddings


def rope_tables(seq_len: int, rot_dim: int, theta: float, device=None, offset: int = 0):
    """cos/sin tables [L, rot_dim] in fp32, laid out as HF's rotate_half convention (two halves).

    Computed in fp32 whatever the model dtype (as HF does); `apply_rope` casts to the activations' dtype.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64, device=device).float() / rot_dim))
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, L, dh]. If the tables are narrower than dh only the leading dims rotate (partial rotary)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat([xr * cos + _rotate_half(xr) * sin, xp], dim=-1)


# --------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head (optionally grouped-query, cross-) attention.

    Separate q/k/v parameters rather than one fused matrix: tensor parallelism shards each one
    column-wise without re-interleaving, GQA's k/v widths differ from q's anyway, and checkpoint keys
    and the HF converter stay as they are. The forward still runs them as one GEMM (`fuse_qkv`):
    the three weights are concatenated per call (a few MB, fused by torch.compile with the bf16 cast
    autocast does anyway) so the activations are read once, for self-attention q|k|v and for
    cross-attention k|v.
    `scale=None` is SDPA's 1/sqrt(dh); T5 passes 1.0 (its init absorbs the scaling).
    """

    fuse_qkv = True

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int = 0, bias: bool = True,
                 scale: Optional[float] = None, dropout: float = 0.0, q_norm: Optional[nn.Module] = None,
                 k_norm: Optional[nn.Module] = None):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads or n_heads % self.n_kv_heads:
            raise ValueError(f"d_model={d_model}, n_heads={n_heads}, n_kv_heads={self.n_kv_heads}: "
                             "need n_heads | d_model and n_kv_heads | n_heads")
        self.head_dim = d_model // n_heads
        self.scale = scale
        self.dropout = dropout
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, kv_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, kv_dim, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        # Per-head q/k normalisation (Persimmon / Qwen3 style): one norm over head_dim shared by heads.
        self.q_norm = q_norm
        self.k_norm = k_norm

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, position_bias: Optional[torch.Tensor] = None,
                is_causal: bool = False, rope=None) -> torch.Tensor:
        B, Lq, _ = x.shape
        src = x if memory is None else memory
        Lk = src.shape[1]
        q, k, v = self._project(x, src)
        q = q.view(B, Lq, self.n_heads, self.head_dim)
        k = k.view(B, Lk, self.n_kv_heads, self.head_dim)
        v = v.view(B, Lk, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if attn_mask is not None or position_bias is not None:
            mask = _additive_mask(attn_mask, position_bias, q.dtype, q.device)
            is_causal = False  # the model folds causality into attn_mask whenever it builds one
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal,
            scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, Lq, -1))

    def _project(self, x: torch.Tensor, src: torch.Tensor):
        if not self.fuse_qkv:
            return self.q_proj(x), self.k_proj(src), self.v_proj(src)
        projs = (self.q_proj, self.k_proj, self.v_proj) if src is x else (self.k_proj, self.v_proj)
        w = torch.cat([p.weight for p in projs])
        b = None if projs[0].bias is None else torch.cat([p.bias for p in projs])
        out = F.linear(src, w, b).split([p.out_features for p in projs], dim=-1)
        if src is x:
            return out
        return (self.q_proj(x),) + tuple(out)


def _additive_mask(attn_mask, position_bias, dtype, device) -> torch.Tensor:
    if position_bias is None:
        base = torch.zeros((), dtype=dtype, device=device)
    else:
        base = position_bias.to(dtype)
    if attn_mask is None:
        return base
    # where() rather than bias + min: adding the minimum to a negative bias would overflow to -inf.
    return torch.where(attn_mask, base, torch.finfo(dtype).min)


def causal_mask(Lq: int, Lk: int, device=None) -> torch.Tensor:
    """Boolean [Lq, Lk], True on and below the diagonal (query i sees keys 0..i)."""
    return torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril()


def padding_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """HF-style [B, Lk] (1 = real token) -> boolean [B, 1, 1, Lk]; None stays None."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


# --------------------------------------------------------------------------- transformer block


class TransformerBlock(nn.Module):
    """Self-attention (+ cross-attention for a decoder) + switchable FFN, each a residual branch.

    Pre-LN (paper appendix A): x + f(norm(x)). Post-LN (original BERT): norm(x + f(x)). The FFN is
    always a `SwitchableFFN` at attribute `ffn`, which is what SSD and the baselines act on.
    """

    def __init__(self, cfg, cross_attention: bool = False, attn_scale: Optional[float] = None,
                 n_kv_heads: int = 0, qk_norm: bool = False):
        super().__init__()
        d, H = cfg.d_model, cfg.n_heads
        self.post_norm = cfg.norm_position == "post"

        def qk():
            return (make_norm(cfg, d // H), make_norm(cfg, d // H)) if qk_norm else (None, None)

        self.norm1 = make_norm(cfg)
        self.attn = Attention(d, H, n_kv_heads, cfg.bias, attn_scale, cfg.dropout, *qk())
        self.cross_attn = None
        if cross_attention:
            self.norm_cross = make_norm(cfg)
            self.cross_attn = Attention(d, H, n_kv_heads, cfg.bias, attn_scale, cfg.dropout, *qk())
        self.norm2 = make_norm(cfg)
        self.ffn = SwitchableFFN(d, cfg.d_ff, cfg.activation, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def _branch(self, x, norm, fn):
        if self.post_norm:
            return norm(x + self.dropout(fn(x)))
        return x + self.dropout(fn(norm(x)))

    def forward(self, x: torch.Tensor, attn_mask=None, position_bias=None, is_causal: bool = False,
                rope=None, memory=None, memory_mask=None) -> torch.Tensor:
        x = self._branch(x, self.norm1, lambda h: self.attn(
            h, attn_mask=attn_mask, position_bias=position_bias, is_causal=is_causal, rope=rope))
        if self.cross_attn is not None:
            x = self._branch(x, self.norm_cross, lambda h: self.cross_attn(h, memory=memory, attn_mask=memory_mask))
        return self._branch(x, self.norm2, self.ffn)

    def residual_out_projections(self):
        """The weights whose outputs are added to the residual stream (scaled init)."""
        out = [self.attn.o_proj.weight, self.ffn.w_out.weight]
        if self.cross_attn is not None:
            out.append(self.cross_attn.o_proj.weight)
        return out


# --------------------------------------------------------------------------- initialisation


@torch.no_grad()
def init_weights(module: nn.Module, std: float, stacks) -> None:
    """Megatron-style init: N(0, std) for every matrix and embedding, zero biases, unit norms, and
    the residual output projections (attention out, FFN W_o) at std / sqrt(2 * depth).

    The scaled projections keep the residual stream's variance from growing with depth (GPT-2 /
    Megatron `scaled_init_method_normal`). `stacks` is a list of ModuleLists of blocks; each stack's
    own depth sets its scale (a T5 decoder deeper than its encoder gets the smaller std).
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            m.reset_parameters()
        elif isinstance(m, SwitchableFFN):
            # A fresh model's experts are the identity layout in neuron order; after meta-device
            # construction and to_empty() the buffers are garbage, so a full (re-)init resets them too.
            m.reset_layout()
    for layers in stacks:
        out_std = std / math.sqrt(2.0 * max(1, len(layers)))
        for blk in layers:
            for w in blk.residual_out_projections():
                nn.init.normal_(w, 0.0, out_std)


class ModelMixin:
    """What every model exposes to the training methods (FFN list, blocks in order)."""

    def transformer_layers(self) -> list:
        return list(self.layers)

    def residual_stream(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding output as the residual stream starts: in the autocast dtype unless
        `model.fp32_residual_connection` (then, and without autocast, unchanged)."""
        if not getattr(self.cfg, "fp32_residual_connection", True) and torch.is_autocast_enabled(x.device.type):
            return x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def tie_weights(self) -> None:
        """Share the token embedding's Parameter with the LM head (when configured). Called by
        init_weights too: to_empty() after meta-device construction un-ties them."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def ffn_layers(self) -> list:
        # Found by type, not as blk.ffn, so that wrappers around blocks (layer dropping, activation
        # checkpointing) don't hide them; module order = encoder blocks then decoder blocks.
        return [m for m in self.modules() if isinstance(m, SwitchableFFN)]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without embedding tables."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)
