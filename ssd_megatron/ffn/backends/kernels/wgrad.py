"""The grouped weight gradients: dW[e] = sum over expert e's rows r of L[r]^T R[token[r]] (R gathered in the
kernel, or pre-gathered), optionally split into equal row chunks summed by fp32 atomics. FOLD adds the
router's weight gradient to the first fold_p rows of dW1 (the gate rows; ffn/backends/triton_backend.py):
1 = COEF[r] (dgate / E per sorted row) added to L's first fold_p columns as they are loaded; 2 = the
precomputed COEF[e] ([N, Q] fp32) added to those rows in the epilogue."""
import triton
import triton.language as tl

from .common import _tile_of


@triton.jit
def _wgrad_kernel(
    L, stride_l,                 # [M, P] grouped rows (ga or dh)
    R, stride_r,                 # GATHER: [T, Q] token-major (dy or x); else [M, Q] grouped rows
    TOK, OFFS,
    COEF, fold_p,                # FOLD 1: L[r, :fold_p] += COEF[r]; 2: dW[e, :fold_p] += COEF[e] (module doc)
    DW, stride_de, stride_dp, stride_dq,  # [N, P, Q], any strides (laid out like the weight it grads)
    N, P, Q, num_p, num_q,
    GATHER: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr, FOLD: tl.constexpr,
    BP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr, NP2: tl.constexpr,
):
    """A program owns dW[e, p-block, q-block] over all of expert e's rows; with SPLIT, over one chunk of
    at most CH of them (chunks never straddle two experts), adding its partial sum into a zeroed fp32
    DW with atomics. Equal chunks keep every program the same length whatever the expert loads: without
    them, a heavy expert's programs run last and alone (the grid's tail)."""
    pid = tl.program_id(0)
    per_t = num_p * num_q
    t = pid // per_t
    rem = pid % per_t
    pb = rem // num_q
    qb = rem % num_q
    if SPLIT:
        e, start, e_end = _tile_of(OFFS, t, N, CH, NP2)
        end = tl.minimum(start + CH, e_end)
    else:
        e = t
        start = tl.load(OFFS + e)
        end = tl.load(OFFS + e + 1)
    pc = pb * BP + tl.arange(0, BP)
    qc = qb * BQ + tl.arange(0, BQ)
    pm = pc < P
    qm = qc < Q
    ks = tl.arange(0, BK)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for r0 in range(start, end, BK):
        rows = r0 + ks
        rm = rows < end
        # L^T tile loaded transposed by address arithmetic ([BP, BK], contiguous along P)
        lt = tl.load(L + rows.to(tl.int64)[None, :] * stride_l + pc[:, None], mask=rm[None, :] & pm[:, None], other=0.0)
        if FOLD == 1:
            coef = tl.load(COEF + rows, mask=rm, other=0.0)
            lt = (lt.to(tl.float32) + tl.where(pc[:, None] < fold_p, coef[None, :], 0.0)).to(lt.dtype)
        if GATHER:
            src = tl.load(TOK + rows, mask=rm, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        r = tl.load(R + src[:, None] * stride_r + qc[None, :], mask=rm[:, None] & qm[None, :], other=0.0)
        acc = tl.dot(lt, r, acc, input_precision=PREC)
    if FOLD == 2:  # once per expert: by its first chunk when split
        if (not SPLIT) or start == tl.load(OFFS + e):
            v = tl.load(COEF + e.to(tl.int64) * Q + qc, mask=qm, other=0.0)
            acc += tl.where(pc[:, None] < fold_p, v[None, :], 0.0)
    dwp = DW + e.to(tl.int64) * stride_de + pc[:, None] * stride_dp + qc[None, :] * stride_dq
    omask = pm[:, None] & qm[None, :]
    if SPLIT:
        if start < end:
            tl.atomic_add(dwp, acc, mask=omask, sem="relaxed")
    else:
        tl.store(dwp, acc.to(DW.dtype.element_ty), mask=omask)
