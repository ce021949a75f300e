"""The grouped weight gradients: dW[e] = sum over expert e's rows r of L[r]^T R[token[r]] (R gathered in the
kernel, or pre-gathered), optionally split into equal row chunks summed by fp32 atomics. FOLD adds the
router's weight gradient to the first fold_p rows of dW1 (the gate rows; ffn/backends/triton_backend.py):
1 = COEF[r] (dgate / E per sorted row) added to L's first fold_p columns as they are loaded; 2 = the
precomputed COEF[e] ([N, Q] fp32) added to those rows in the epilogue.

A program's dW block is BP rows of P by BQ columns of Q; with SPLIT_P it covers all of P (the expert's
width, <= 2 tiles: 192 = 128 + 64) with a second accumulator of BP2 rows, so each gathered R tile is read
once per column block instead of once per P block. Per BK-row step a 128 x 128 block moves 32 kB of
operand tiles for 2.1 MFLOP (64 FLOP/B), the base default's 64 x 128 block (BK 128) 48 kB for 2.1 MFLOP
(43 FLOP/B), and a whole-P 256 x 128 block 48 kB for 4.2 MFLOP (85 FLOP/B). The kernels run at ~380 TF/s
at 8B and ~224 at base. Whole-P programs were built to test whether that intensity bounds them; they
lost at 8B and tied at best at base (H100, docs/kernels.md v14), so it does not. Opt-in.

LTMA (a seventh config entry of 1, `wgrad_launch.wgrad`): L's tiles by TMA descriptors instead of the
transposing pointer loads, where L's rows are contiguous and 16-byte aligned and FOLD is not 1 (which adds to
L as it is loaded). A tile's rows past the expert's (or chunk's) end are then the next rows of L, not zeros;
R's rows there are masked to zero, so they add nothing."""
import triton
import triton.language as tl

from .common import _tile_of

FOLD_CODES = {None: 0, "rows": 1, "expert": 2, "pairs": 3}  # a launch's fold -> FOLD (3: kernels/wgrad_gluon.py's)


@triton.jit
def _lhs_t(L, stride_l, rows, rm, pc, pm, COEF, fold_p, FOLD: tl.constexpr):
    """The [BP, BK] tile L[rows, pc]^T, loaded transposed by address arithmetic (contiguous along P); with
    FOLD 1 the rows' COEF added to the columns before fold_p."""
    lt = tl.load(L + rows.to(tl.int64)[None, :] * stride_l + pc[:, None], mask=rm[None, :] & pm[:, None], other=0.0)
    if FOLD == 1:
        coef = tl.load(COEF + rows, mask=rm, other=0.0)
        lt = (lt.to(tl.float32) + tl.where(pc[:, None] < fold_p, coef[None, :], 0.0)).to(lt.dtype)
    return lt


@triton.jit
def _dw_store(acc, DW, stride_de, stride_dp, stride_dq, e, pc, pm, qc, qm, COEF, fold_p, Q, first,
              SPLIT: tl.constexpr, FOLD: tl.constexpr):
    """A program's dW[e, pc, qc] block: FOLD 2's COEF[e] added by the expert's first program (`first`),
    then a store, or with SPLIT an fp32 atomic add of the partial sum."""
    if FOLD == 2:
        if first:
            v = tl.load(COEF + e.to(tl.int64) * Q + qc, mask=qm, other=0.0)
            acc += tl.where(pc[:, None] < fold_p, v[None, :], 0.0)
    dwp = DW + e.to(tl.int64) * stride_de + pc[:, None] * stride_dp + qc[None, :] * stride_dq
    omask = pm[:, None] & qm[None, :]
    if SPLIT:
        tl.atomic_add(dwp, acc, mask=omask, sem="relaxed")
    else:
        tl.store(dwp, acc.to(DW.dtype.element_ty), mask=omask)


@triton.jit
def _wgrad_kernel(
    L, stride_l,                 # [M, P] grouped rows (ga or dh)
    R, stride_r,                 # GATHER: [T, Q] token-major (dy or x); else [M, Q] grouped rows
    TOK, OFFS,
    COEF, fold_p,                # FOLD 1: L[r, :fold_p] += COEF[r]; 2: dW[e, :fold_p] += COEF[e] (module doc)
    DW, stride_de, stride_dp, stride_dq,  # [N, P, Q], any strides (laid out like the weight it grads)
    N, P, Q, num_p, num_q,
    LD, LD2,                     # LTMA: TMA descriptors of L in [BK, BP] and [BK, BP2] boxes
    GATHER: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr, FOLD: tl.constexpr, SPLIT_P: tl.constexpr,
    LTMA: tl.constexpr,
    BP: tl.constexpr, BP2: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr, NP2: tl.constexpr,
):
    """A program owns dW[e, p-block, q-block] (SPLIT_P: all of P, module docstring) over all of expert e's
    rows; with SPLIT, over one chunk of at most CH of them (chunks never straddle two experts), adding its
    partial sum into a zeroed fp32 DW with atomics. Equal chunks keep every program the same length
    whatever the expert loads: without them, a heavy expert's programs run last and alone (the grid's tail)."""
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
    pm = pc < P
    pc2 = BP + tl.arange(0, BP2)
    pm2 = pc2 < P
    qc = qb * BQ + tl.arange(0, BQ)
    qm = qc < Q
    ks = tl.arange(0, BK)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    acc2 = tl.zeros((BP2, BQ), dtype=tl.float32)
    for r0 in range(start, end, BK):
        rows = r0 + ks
        rm = rows < end
        if GATHER:
            src = tl.load(TOK + rows, mask=rm, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        r = tl.load(R + src[:, None] * stride_r + qc[None, :], mask=rm[:, None] & qm[None, :], other=0.0)
        if LTMA:  # rows past `end` come in too (the next expert's): they meet R's zeroed rows
            acc = tl.dot(LD.load([r0, pb * BP]).T, r, acc, input_precision=PREC)
            if SPLIT_P:
                acc2 = tl.dot(LD2.load([r0, BP]).T, r, acc2, input_precision=PREC)
        else:
            acc = tl.dot(_lhs_t(L, stride_l, rows, rm, pc, pm, COEF, fold_p, FOLD), r, acc, input_precision=PREC)
            if SPLIT_P:
                acc2 = tl.dot(_lhs_t(L, stride_l, rows, rm, pc2, pm2, COEF, fold_p, FOLD), r, acc2,
                              input_precision=PREC)
    if (not SPLIT) or start < end:
        first = (not SPLIT) or start == tl.load(OFFS + e)  # FOLD 2's term: once per expert
        _dw_store(acc, DW, stride_de, stride_dp, stride_dq, e, pc, pm, qc, qm, COEF, fold_p, Q, first, SPLIT, FOLD)
        if SPLIT_P:
            _dw_store(acc2, DW, stride_de, stride_dp, stride_dq, e, pc2, pm2, qc, qm, COEF, fold_p, Q, first, SPLIT,
                      FOLD)
