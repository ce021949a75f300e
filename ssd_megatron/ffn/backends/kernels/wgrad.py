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

LTMA (a seventh config entry of 1, `_triton_kernels.wgrad`): L's tiles by TMA descriptors instead of the
transposing pointer loads, where L's rows are contiguous and 16-byte aligned and FOLD is not 1 (which adds to
L as it is loaded). A tile's rows past the expert's (or chunk's) end are then the next rows of L, not zeros;
R's rows there are masked to zero, so they add nothing.

QG (SSD_TRITON_WGRAD_GROUP, `_triton_kernels._block_group`), the programs' order. At 8B (T 16384, D 4096, N 64, K 16)
R = x or dy is 134 MB, more than L2 holds, and every expert gathers a quarter of its rows. In t-major order the ~264
programs in flight are about 4 experts' 64 tiles: they share each expert's L rows (2 MB) in L2, but the gathered R
rows come from DRAM once per expert, T K D 2 bytes = 2.1 GB per launch. With QG q blocks per group, the programs in
flight are about 16 experts (QG 8, two p blocks) over QG * BQ columns; they walk their experts' rows in token order at
about the same pace, so an R row slice is read from DRAM about once per 16 experts (N / 16 * T D 2 = 0.54 GB) and each
expert's L rows once per group (N P 2 * num_q / QG = 0.54 GB): about half the bytes (a model, not measured)."""
import triton
import triton.language as tl

from .common import _tile_of


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
def _wgrad_tile(pid, num_p, num_q, QG: tl.constexpr):
    """(t, p block, q block) of program `pid`. QG = 0: t-major (an expert's, or chunk's, tiles side by side, so the
    programs in flight share its L rows in L2 but each gathers its own R rows). QG > 0: the q blocks in groups of
    QG, and within a group every t's QG x num_p tiles in turn (the last group may be narrower), so the programs in
    flight cover many experts over a few q blocks and each gathered R row slice is read from DRAM about once per
    wave of experts instead of once per expert (module docstring)."""
    if QG == 0:
        t = pid // (num_p * num_q)
        rem = pid % (num_p * num_q)
        pb = rem // num_q
        qb = rem % num_q
    else:
        group = tl.num_programs(0) // num_q * QG  # programs per full group: num_t x QG x num_p
        g = pid // group
        w = tl.minimum(QG, num_q - g * QG) * num_p
        rem = pid - g * group
        t = rem // w
        pb = rem % w % num_p
        qb = g * QG + rem % w // num_p
    return t, pb, qb


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
    LTMA: tl.constexpr, QG: tl.constexpr,
    BP: tl.constexpr, BP2: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr, NP2: tl.constexpr,
):
    """A program owns dW[e, p-block, q-block] (SPLIT_P: all of P, module docstring) over all of expert e's
    rows; with SPLIT, over one chunk of at most CH of them (chunks never straddle two experts), adding its
    partial sum into a zeroed fp32 DW with atomics. Equal chunks keep every program the same length
    whatever the expert loads: without them, a heavy expert's programs run last and alone (the grid's tail)."""
    t, pb, qb = _wgrad_tile(tl.program_id(0), num_p, num_q, QG)
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
