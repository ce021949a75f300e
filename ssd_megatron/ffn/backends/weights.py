"""Expert views of the FFN weights through the clustering permutation, with a cheap backward.

`w.index_select(0, perm)` is the obvious gather, but its backward is an atomic `index_add` into a
zeroed tensor: in bf16 that measured 0.30 ms per layer at the base shape and 3.6 ms at 8b (H100, run 1
in docs/kernels.md), more than the expert GEMMs' savings. A permutation needs no accumulation: the
backward here is a plain gather by the inverse permutation. W_out is gathered by columns (coalesced:
each row of W_out is read once) and handed to the backends as a `[N, E, D]` view with unit stride
along E; the triton, grouped_mm and reference backends take it without a copy.
"""
from __future__ import annotations

import torch


def inverse_permutation(idx: torch.Tensor) -> torch.Tensor:
    """The inverse of the permutation `idx` (one scatter; traced into the graph under torch.compile)."""
    return torch.empty_like(idx).scatter_(0, idx, torch.arange(idx.numel(), device=idx.device, dtype=idx.dtype))


class _PermuteGather(torch.autograd.Function):
    """out = w.index_select(dim, idx) for idx a permutation of range(w.shape[dim]).

    The inverse is computed in the backward from the saved `idx`, not cached on the side: nothing here
    mutates state outside the function, so torch.compile traces both directions into the block's graph
    (no graph break), and a captured CUDA graph recomputes it from `idx` at every replay, so an in-place
    re-clustering (SwitchableFFN.set_clustering) is seen by the next step."""

    @staticmethod
    def forward(ctx, w, idx, dim):
        ctx.dim = dim
        ctx.save_for_backward(idx)
        return w.index_select(dim, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad.index_select(ctx.dim, inverse_permutation(idx)), None, None


def permute_gather(w: torch.Tensor, idx: torch.Tensor, dim: int = 0) -> torch.Tensor:
    if idx.numel() != w.shape[dim]:
        return w.index_select(dim, idx)  # not a permutation: keep index_select's accumulate semantics
    return _PermuteGather.apply(w, idx, dim)


def expert_rows(perm: torch.Tensor, num_experts: int, glu: bool) -> torch.Tensor:
    """Row indices of W_in in expert-major order ([gate rows, up rows] per expert for GLU)."""
    if not glu:
        return perm
    d_ff = perm.numel()
    blocks = perm.view(num_experts, -1)
    return torch.cat([blocks, blocks + d_ff], dim=1).reshape(-1)


def gather_expert_weights(w_in: torch.Tensor, b_in, w_out: torch.Tensor, perm: torch.Tensor, num_experts: int,
                          glu: bool, rows: torch.Tensor = None):
    """(w1 [N, F1, D], b1 [N, F1] or None, w2 [N, E, D]) of the calling convention (docs/interfaces.md).

    w_in, b_in, w_out: the dense nn.Linear parameters (w_in [F_in, D], w_out [D, d_ff]); perm: the
    expert permutation (expert n = perm[n*E:(n+1)*E]); rows: expert_rows(perm, N, glu), if cached.
    """
    D, d_ff = w_out.shape
    N = num_experts
    E = d_ff // N
    rows = expert_rows(perm, N, glu) if rows is None else rows
    w1 = permute_gather(w_in, rows, 0).view(N, -1, D)
    b1 = None if b_in is None else permute_gather(b_in, rows, 0).view(N, -1)
    w2 = permute_gather(w_out, perm, 1).view(D, N, E).permute(1, 2, 0)
    return w1, b1, w2


def expert_views(w_in: torch.Tensor, b_in, w_out: torch.Tensor, num_experts: int):
    """The same triple as gather_expert_weights for parameters already stored expert-major
    (ffn/expert_layout.py): plain views, no copy, and autograd's backward is free too."""
    D = w_out.shape[0]
    N = num_experts
    w1 = w_in.view(N, -1, D)
    b1 = None if b_in is None else b_in.view(N, -1)
    w2 = w_out.view(D, N, -1).permute(1, 2, 0)
    return w1, b1, w2
