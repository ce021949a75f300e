"""The router's score gradient in the folded backward (triton_backend's module docstring): from up_bwd's per-column-
block partials of the gate gradients, dgate [T * K] (their fp32 sum, by flat pair t * K + k) and dS [T, N] (each
token's K gate gradients at its experts' columns, rounded to x's dtype as the router's own backward has them, zeros
elsewhere), from which the centroid gradient dSᵀ x / E is one GEMM; and `row_matrix`, the same gradients per
sorted row, with which the Gluon dW1 kernel sums that product itself (kernels/wgrad_gluon.py's FOLD 3).

As torch ops that is the partials' sum, a zero fill of dS and a scatter into it: ≈ 17 µs of the base layer's fwd+bwd
on an H100 (5 + 4.5 + 7.6, the eager profile of docs/kernels.md v25). Here one launch: a program per BT tokens
sums its pairs' partials, stores dgate, and writes its rows of dS whole (1 MB at base). The default up to
MAX_AUTO_EXPERTS experts (SSD_TRITON_SCORE_GRAD: auto; 1 always, 0 never, for A/Bs): H100, base ReLU layer fwd+bwd
graphed, four alternating rounds 0.7141-0.7181 ms against torch's 0.7244-0.7344; at 8B (64 experts x 16 ids per
token unrolled: 254 registers) 8.390 / 8.416 against 8.382 / 8.396, no gain (docs/kernels.md v26).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BT = 64  # tokens per program
MAX_AUTO_EXPERTS = 32  # `auto` takes the kernel up to this many experts (module docstring)
ROW_WIDTH = 16  # `row_matrix`'s columns


@triton.jit
def _score_grad_kernel(DGP, IDX, DGATE, DS, T, N, M, P: tl.constexpr, K: tl.constexpr, NP2: tl.constexpr,
                       BT: tl.constexpr):
    """DGATE[t * K + k] = sum over j < P of DGP[j, t * K + k]; DS[t, IDX[t, k]] = that sum in DS's dtype, DS[t, e]
    = 0 for the other experts; program: BT tokens."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = tok < T
    tok64 = tok.to(tl.int64)
    experts = tl.arange(0, NP2)
    ds = tl.zeros((BT, NP2), dtype=tl.float32)
    for k in tl.static_range(K):
        pair = tok64 * K + k
        g = tl.zeros((BT,), dtype=tl.float32)
        for j in tl.static_range(P):
            g += tl.load(DGP + j * M + pair, mask=tmask, other=0.0)
        tl.store(DGATE + pair, g, mask=tmask)
        e = tl.load(IDX + pair, mask=tmask, other=NP2)
        ds += tl.where(e[:, None] == experts[None, :], g.to(DS.dtype.element_ty).to(tl.float32)[:, None], 0.0)
    tl.store(DS + tok64[:, None] * N + experts[None, :], ds.to(DS.dtype.element_ty),
             mask=tmask[:, None] & (experts < N)[None, :])


@triton.jit
def _row_matrix_kernel(DGATE, ORDER, OUT, M, BR: tl.constexpr, W: tl.constexpr):
    """OUT[r, 0] = DGATE[ORDER[r]] in OUT's dtype, OUT[r, 1:W] = 0; program: BR sorted rows."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = r < M
    g = tl.load(DGATE + tl.load(ORDER + r, mask=rmask, other=0), mask=rmask, other=0.0)
    cols = tl.arange(0, W)
    tl.store(OUT + r.to(tl.int64)[:, None] * W + cols[None, :],
             tl.where(cols[None, :] == 0, g[:, None], 0.0).to(OUT.dtype.element_ty), mask=rmask[:, None])


def row_matrix(dgate: torch.Tensor, order: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[M, ROW_WIDTH] in `dtype`: column 0 the gate gradient of each sorted row's pair (dgate [T * K] fp32 by flat
    pair, `order` [M] sorted row -> pair), rounded as dS's entries are, zeros beside it: the extra left operand
    with which the Gluon dW1 kernel sums the router's term itself (kernels/wgrad_gluon.py's FOLD 3; a box of
    ROW_WIDTH columns is one wgmma of the smallest width, 32-byte rows for TMA)."""
    M = order.shape[0]
    out = torch.empty(M, ROW_WIDTH, device=dgate.device, dtype=dtype)
    if M:
        _row_matrix_kernel[(triton.cdiv(M, 512),)](dgate, order, out, M, BR=512, W=ROW_WIDTH, num_warps=4)
    return out


def score_grad(dgp: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, dtype: torch.dtype):
    """(dgate [T * K] fp32, dS [T, N] in `dtype`) from up_bwd's partials dgp [P, T * K] (module docstring)."""
    T, K = topk_idx.shape
    dgate = torch.empty(T * K, device=dgp.device, dtype=torch.float32)
    ds = torch.empty(T, num_experts, device=dgp.device, dtype=dtype)
    if T:
        _score_grad_kernel[(triton.cdiv(T, BT),)](
            dgp, topk_idx.contiguous(), dgate, ds, T, num_experts, T * K, P=dgp.shape[0], K=K,
            NP2=max(16, triton.next_power_of_2(num_experts)), BT=BT, num_warps=4)
    return dgate, ds


def enabled(num_experts: int) -> bool:
    """Whether the folded backward's score gradient over `num_experts` experts is this kernel's (module docstring):
    SSD_TRITON_SCORE_GRAD=auto (the default) up to MAX_AUTO_EXPERTS, 1 always, 0 never (torch's ops)."""
    value = os.environ.get("SSD_TRITON_SCORE_GRAD", "auto")
    if value not in ("auto", "0", "1"):
        from ....errors import UserError
        raise UserError(f"SSD_TRITON_SCORE_GRAD={value!r}: accepted: auto (the kernel up to {MAX_AUTO_EXPERTS} "
                        "experts, the default), 1 (always), 0 (torch's ops)")
    return value == "1" or (value == "auto" and num_experts <= MAX_AUTO_EXPERTS)
