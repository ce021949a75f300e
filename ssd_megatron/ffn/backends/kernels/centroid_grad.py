"""The router's centroid gradient for the folded backward: dc [N, D] = dSᵀ x / E, dS [T, N] holding each token's K
gate gradients at its experts' columns (the straight-through gate's backward; triton_backend's module docstring).

As torch ops this was a zero fill of dS, a scatter into it, a split-K GEMM and its reduction, a cast and a division:
≈ 31 µs of the base layer's fwd+bwd on an H100 (docs/kernels.md v25), for one read of x (25 MB). Here programs over
(token chunk, column block) build their tokens' rows of dS in registers from the top-K ids and gate gradients and
multiply them into x's tile on the tensor cores ([NP2, BT] @ [BT, BC]), accumulating in fp32 across the chunk; the
chunks' partial [N, D] sums are then added by kernels/column_sums.py's second pass, which also divides by E. The
order of the additions is fixed (deterministic). dS's entries are rounded to x's dtype, as the router's own backward
has them; the products are summed in fp32 without rounding the GEMM's output to x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .column_sums import _sums

PROGRAMS = 264  # about two per SM of an H100
BT, BC, WARPS, STAGES = 64, 128, 4, 3  # tokens and columns of one step's x tile; warps; software pipeline stages


@triton.jit
def _centroid_grad_kernel(X, stride_x, IDX, DG, PART, T, D, N, chunk_tokens, K: tl.constexpr, NP2: tl.constexpr,
                          PREC: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """PART[j, e, cols] = sum over the tokens t of chunk j and their k with IDX[t, k] == e of DG[t, k] * X[t, cols]
    (DG rounded to X's dtype), fp32; program (chunk j, column block)."""
    j = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < D
    experts = tl.arange(0, NP2)
    start = j * chunk_tokens
    end = tl.minimum(start + chunk_tokens, T)
    acc = tl.zeros((NP2, BC), dtype=tl.float32)
    for t0 in range(start, end, BT):
        tok = t0 + tl.arange(0, BT)
        tmask = tok < end
        tok64 = tok.to(tl.int64)
        x = tl.load(X + tok64[:, None] * stride_x + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        ds = tl.zeros((BT, NP2), dtype=tl.float32)  # this tile's rows of dS
        for k in tl.static_range(K):
            e = tl.load(IDX + tok64 * K + k, mask=tmask, other=NP2)
            g = tl.load(DG + tok64 * K + k, mask=tmask, other=0.0).to(X.dtype.element_ty).to(tl.float32)
            ds += tl.where(e[:, None] == experts[None, :], g[:, None], 0.0)
        acc = tl.dot(tl.trans(ds.to(X.dtype.element_ty)), x, acc, input_precision=PREC)
    out = PART + j.to(tl.int64) * N * D + experts[:, None] * D + cols[None, :]
    tl.store(out, acc, mask=(experts < N)[:, None] & cmask[None, :])


def centroid_grad(dgate: torch.Tensor, x: torch.Tensor, topk_idx: torch.Tensor, N: int, E: int) -> torch.Tensor:
    """[N, D] fp32: dSᵀ x / E (module docstring); dgate [T * K] by flat pair t * K + k, as topk_idx's entries."""
    T, D = x.shape
    K = topk_idx.shape[1]
    if T == 0:
        return x.new_zeros(N, D, dtype=torch.float32)
    col_blocks = triton.cdiv(D, BC)
    chunks = max(1, min(triton.cdiv(T, BT), PROGRAMS // col_blocks))
    tokens = triton.cdiv(triton.cdiv(T, chunks), BT) * BT
    chunks = triton.cdiv(T, tokens)  # every chunk holds tokens
    part = torch.empty(chunks, N, D, device=x.device, dtype=torch.float32)
    _centroid_grad_kernel[(chunks, col_blocks)](
        x, x.stride(0), topk_idx.contiguous(), dgate.contiguous(), part, T, D, N, tokens, K=K,
        NP2=max(16, triton.next_power_of_2(N)), PREC="ieee" if x.dtype == torch.float32 else "tf32", BT=BT, BC=BC,
        num_warps=WARPS, num_stages=STAGES)
    return _sums(part.view(chunks, N * D), 1, 0, chunks, torch.float32, float(E)).view(N, D)
