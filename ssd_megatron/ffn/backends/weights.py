"""Expert views of the FFN weights through the clustering permutation, with a cheap backward.

`w.index_select(0, perm)` is the obvious gather, but its backward is an atomic `index_add` into a
zeroed tensor: in bf16 that measured 0.30 ms per layer at the base shape and 3.6 ms at 8b (H100, run 1
in docs/kernels.md), more than the expert GEMMs' savings. A permutation needs no accumulation: the
backward here is a plain gather by the inverse permutation. W_out is gathered by columns (coalesced:
each row of W_out is read once) and handed to the backends as a `[N, E, D]` view with unit stride
along E; the triton, grouped_mm and reference backends take it without a copy.
"""
from __future__ import annotations

import weakref

import torch

# id(idx) -> (weakref to idx, its _version when inverted, inverse). The permutation changes only when
# the clustering does (an in-place copy_, which bumps _version): the inverse is computed once per clustering.
_INVERSES: dict = {}


def inverse_permutation(idx: torch.Tensor) -> torch.Tensor:
    """The inverse of the permutation `idx`, cached per tensor. When `idx` has changed in place since,
    the cached inverse is rewritten in place too: a captured CUDA graph (train.cuda_graph) holds that
    tensor and reads it at every replay, so `SwitchableFFN.set_clustering` calls this right away."""
    hit = _INVERSES.get(id(idx))
    if hit is not None and hit[0]() is idx:
        inv = hit[2]
        if hit[1] != idx._version:
            _invert_into(inv, idx)
            _INVERSES[id(idx)] = (hit[0], idx._version, inv)
        return inv
    inv = _invert_into(torch.empty_like(idx), idx)
    key = id(idx)
    _INVERSES[key] = (weakref.ref(idx, lambda _r, key=key: _INVERSES.pop(key, None)), idx._version, inv)
    return inv


def _invert_into(inv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    inv[idx] = torch.arange(idx.numel(), device=idx.device, dtype=idx.dtype)
    return inv


class _PermuteGather(torch.autograd.Function):
    """out = w.index_select(dim, idx) for idx a permutation of range(w.shape[dim])."""

    @staticmethod
    def forward(ctx, w, idx, dim):
        ctx.idx = idx  # not saved_tensors: the inverse cache is keyed by this very tensor
        ctx.dim = dim
        return w.index_select(dim, idx)

    @staticmethod
    def backward(ctx, grad):
        return grad.index_select(ctx.dim, inverse_permutation(ctx.idx)), None, None


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
