"""The up GEMM: out[r] = epilogue(X[token[r]] @ W[e]^T), the token gather fused into the A-operand loads.
Forward: X = x, W = w1, epilogue = bias, h (pre-activation) saved, a = act(h). Backward: X = dy, W = w2,
epilogue = dgate partials, dh = gate * da * act'(h), ga = gate * a, db1 column sums.
With HAS_FILL the programs also initialise the [T, Dout] output the next launch (down) adds into: y with
the output bias, or dx with zeros (common._fill_share).

The backward may also run as two launches (PASS 1, 2): the GEMM with nothing but a store of da, then the
epilogue alone reading da back. The epilogue (h reloaded, and for GLU h's up half too, dh's two halves,
gate * a, the dgate and bias sums) needs so many registers that the one-pass kernel runs on narrow tiles
(GLU: 64 x 64, 32 FLOP per byte of operand tiles); without it the GEMM takes the forward's wide tiles, for
a [M, E] write and read of da. The default on Hopper at 8B and for GLU (docs/kernels.md v14: 8B ReLU
1.49 -> 1.09 ms, 8B SwiGLU 2.28 -> 1.34)."""
import triton
import triton.language as tl

from .common import _act, _act_grad, _expert_tile, _fill_share, _grid_tile, _load_a, _load_w


@triton.jit
def _gather_gemm(X, stride_x, tok, W, stride_we, stride_wf, stride_wk, e, cols, cmask, cols2, cmask2, Din, E,
                 WD, WD2, f0, TWO: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                 WTMA: tl.constexpr, RC: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BN2: tl.constexpr, BK: tl.constexpr):
    """X[tok] @ W[e][cols]^T as [BM, BN] fp32, the token gather fused into the A-operand loads; with TWO the
    same for the GLU up half W[e][E + cols]; with SPLIT both also for a second column set cols2 ([BM, BN2],
    e.g. E = 192 as 128 + 64 columns instead of one 256-wide tile), from the same A tiles. Returns
    (acc, up acc, acc of cols2, up acc of cols2); the unused ones are never computed.
    WTMA: W's tiles by TMA (`common._expert_tile`; WD2: the second tile's boxes) instead of pointer loads, f0
    being the tile's first row of all experts' N * F weight rows (e * F + cols[0]). Rows past the tile's
    columns then belong to the next columns or expert: their products land in masked columns, which the caller
    must not reduce over (the fused forward's down GEMM does: it takes WTMA only where the tiles cover E)."""
    ks = tl.arange(0, BK)
    xp = X + tok[:, None] * stride_x + ks[None, :]
    we = W + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk
    wp = we + cols[None, :] * stride_wf
    wp2 = we + cols2[None, :] * stride_wf
    up_off = E * stride_wf
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    accb = tl.zeros((BM, BN2), dtype=tl.float32)
    accb2 = tl.zeros((BM, BN2), dtype=tl.float32)
    for k0 in range(0, Din, BK):
        a = _load_a(xp, k0, ks, Din, EVEN_K)
        acc = tl.dot(a, _w_tile(wp, k0, ks, Din, cmask, WD, f0, EVEN_K, EVEN_N, WTMA, RC), acc, input_precision=PREC)
        if TWO:
            acc2 = tl.dot(a, _w_tile(wp + up_off, k0, ks, Din, cmask, WD, f0 + E, EVEN_K, EVEN_N, WTMA, RC), acc2,
                          input_precision=PREC)
        if SPLIT:
            accb = tl.dot(a, _w_tile(wp2, k0, ks, Din, cmask2, WD2, f0 + BN, EVEN_K, False, WTMA, RC), accb,
                          input_precision=PREC)
            if TWO:
                accb2 = tl.dot(a, _w_tile(wp2 + up_off, k0, ks, Din, cmask2, WD2, f0 + BN + E, EVEN_K, False, WTMA,
                                          RC), accb2, input_precision=PREC)
        xp += BK
        wp += BK * stride_wk
        wp2 += BK * stride_wk
    return acc, acc2, accb, accb2


@triton.jit
def _w_tile(wp, k0, ks, Din, cmask, WD, f0, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, WTMA: tl.constexpr,
            RC: tl.constexpr):
    """The [BK, BN] weight tile at k0: by TMA (rows f0.. of all experts' weights) or from the pointers wp."""
    if WTMA:
        w = _expert_tile(WD, f0, k0, RC).T
    else:
        w = _load_w(wp, k0, ks, Din, cmask, EVEN_K, EVEN_N)
    return w


@triton.jit
def _up_act(acc, acc2, e, cols, cmask, B, stride_be, E, dt, hp, hmask, ACT: tl.constexpr, GLU: tl.constexpr,
            HAS_BIAS: tl.constexpr, SAVE_H: tl.constexpr):
    """The forward epilogue: bias, h (and the GLU up half) stored at hp when SAVE_H, as soon as each is
    computed (fewer live registers); returns a = act(h) (* hu) in fp32, to be rounded to `dt`. Rounded to
    `dt` where a torch matmul + activation would."""
    if HAS_BIAS:
        bp = B + e.to(tl.int64) * stride_be + cols
        acc += tl.load(bp, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc2 += tl.load(bp + E, mask=cmask, other=0.0).to(tl.float32)[None, :]
    h = acc.to(dt)
    if SAVE_H:
        tl.store(hp, h, mask=hmask)
    act = _act(h.to(tl.float32), ACT)
    if GLU:
        hu = acc2.to(dt)
        if SAVE_H:
            tl.store(hp + E, hu, mask=hmask)
        act = act.to(dt).to(tl.float32) * hu.to(tl.float32)
    return act


@triton.jit
def _up_epilogue(acc, acc2, e, rows, rmask, cols, cmask, pid_n, B, stride_be, ORDER, GATE, H, stride_h, OUT, stride_o,
                 DGP, GA, stride_ga, DB, stride_db, M, E,
                 BWD: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SAVE_H: tl.constexpr, STORE_GA: tl.constexpr, HAS_DB: tl.constexpr):
    """The up GEMM's epilogue for one (M-tile, column block): forward bias, activation and stores of h
    and a; backward dgate partials, gate * a, dh (from the saved h) and the bias-grad column sums."""
    rows64 = rows.to(tl.int64)
    omask = rmask[:, None] & cmask[None, :]
    hp = H + rows64[:, None] * stride_h + cols[None, :]
    dt = OUT.dtype.element_ty
    if not BWD:
        act = _up_act(acc, acc2, e, cols, cmask, B, stride_be, E, dt, hp, omask, ACT, GLU, HAS_BIAS, SAVE_H)
        tl.store(OUT + rows64[:, None] * stride_o + cols[None, :], act.to(dt), mask=omask)
    else:
        # acc = da (gradient w.r.t. a, before the gate); recompute a from the saved h
        pair = tl.load(ORDER + rows, mask=rmask, other=0).to(tl.int64)
        g = tl.load(GATE + pair, mask=rmask, other=0.0).to(tl.float32)
        h = tl.load(hp, mask=omask, other=0.0).to(tl.float32)
        fa = _act(h, ACT)
        if GLU:
            hu = tl.load(hp + E, mask=omask, other=0.0).to(tl.float32)
            a = fa.to(dt).to(tl.float32) * hu
        else:
            a = fa
        a = a.to(dt).to(tl.float32)
        tl.store(DGP + pid_n * M + pair, tl.sum(acc * a, 1), mask=rmask)
        if STORE_GA:
            tl.store(GA + rows64[:, None] * stride_ga + cols[None, :], (a * g[:, None]).to(dt), mask=omask)
        dact = acc * g[:, None]
        dp = OUT + rows64[:, None] * stride_o + cols[None, :]
        dbp = DB + e.to(tl.int64) * stride_db + cols
        if GLU:
            dhg = (dact * hu * _act_grad(h, ACT)).to(dt)
            dhu = (dact * fa).to(dt)
            tl.store(dp, dhg, mask=omask)
            tl.store(dp + E, dhu, mask=omask)
            if HAS_DB:
                tl.atomic_add(dbp, tl.sum(tl.where(omask, dhg.to(tl.float32), 0.0), 0), mask=cmask, sem="relaxed")
                tl.atomic_add(dbp + E, tl.sum(tl.where(omask, dhu.to(tl.float32), 0.0), 0), mask=cmask,
                              sem="relaxed")
        else:
            dh = (dact * _act_grad(h, ACT)).to(dt)
            tl.store(dp, dh, mask=omask)
            if HAS_DB:
                tl.atomic_add(dbp, tl.sum(tl.where(omask, dh.to(tl.float32), 0.0), 0), mask=cmask, sem="relaxed")


@triton.jit
def _up_kernel(
    X, stride_x,                 # [T, Din] token-major (x fwd, dy bwd)
    W, stride_we, stride_wf, stride_wk,  # [N, F, Din] rows = output features (w1 fwd, w2 bwd)
    B, stride_be,                # [N, F1] bias (fwd only)
    TOK, ORDER, GATE, OFFS,      # plan; GATE [T*K] (bwd)
    TILES,                       # SCHED: the M-tile schedule (common._grid_tile)
    H, stride_h,                 # [M, F1] pre-activation: written fwd (SAVE_H), read bwd
    OUT, stride_o,               # fwd: a [M, E]; bwd: dh [M, F1]
    DGP,                         # bwd: [num_n, M] fp32 partial dgate (indexed by flat pair)
    GA, stride_ga,               # bwd: [M, E] gate * a (operand of dW2)
    DB, stride_db,               # bwd: [N, F1] fp32 bias grad (atomic column sums of dh)
    FILL, FILL_ROW, fill_numel, fill_width, fill_chunk,  # HAS_FILL: the down launch's output, initialised here
    WD, WD2,                     # WTMA: TMA descriptors of W (the first and the SPLIT column tile)
    N, M, Din, E, num_n,
    WTMA: tl.constexpr, W_RC: tl.constexpr,
    BWD: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAVE_H: tl.constexpr, STORE_GA: tl.constexpr, HAS_DB: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr, SCHED: tl.constexpr, SPLIT: tl.constexpr,
    PASS: tl.constexpr, HAS_FILL: tl.constexpr, HAS_FILL_ROW: tl.constexpr, FILL_BLOCK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BN2: tl.constexpr, BK: tl.constexpr, NP2: tl.constexpr,
):
    """A program per (M-tile, block of BN columns of E); with SPLIT all of E per M-tile, as BN + BN2 columns
    (e.g. 192 = 128 + 64) computed from the same gathered A tiles, the second block's dgate partials in
    DGP's row 1. PASS 0: the GEMM and its epilogue; the backward in two launches (module docstring): PASS 1
    the GEMM alone, its product (da) stored to OUT's sorted rows; PASS 2 the epilogue alone, on X = da."""
    if HAS_FILL:  # every program, live tile or not: the grid covers the whole output
        _fill_share(FILL, FILL_ROW, fill_numel, fill_width, fill_chunk, tl.program_id(0), HAS_FILL_ROW, FILL_BLOCK)
    e, pid_n, row0, rows, rmask, live = _grid_tile(OFFS, TILES, num_n, N, BM, NP2, SCHED)
    if live:
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < E
        cols2 = BN + tl.arange(0, BN2)
        cmask2 = cols2 < E
        if PASS == 2:
            acc = _row_tile(X, stride_x, rows, rmask, cols, cmask)
            acc2 = acc  # (unused in the backward)
            accb = acc
            if SPLIT:
                accb = _row_tile(X, stride_x, rows, rmask, cols2, cmask2)
            accb2 = accb
        else:
            tok = tl.load(TOK + rows, mask=rmask, other=0).to(tl.int64)
            acc, acc2, accb, accb2 = _gather_gemm(X, stride_x, tok, W, stride_we, stride_wf, stride_wk, e, cols,
                                                  cmask, cols2, cmask2, Din, E, WD, WD2,
                                                  e * (stride_we // stride_wf) + pid_n * BN, GLU and not BWD, SPLIT,
                                                  EVEN_K, EVEN_N, WTMA, W_RC, PREC, BM, BN, BN2, BK)
        if PASS == 1:
            op = OUT + rows.to(tl.int64)[:, None] * stride_o
            tl.store(op + cols[None, :], acc.to(OUT.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
            if SPLIT:
                tl.store(op + cols2[None, :], accb.to(OUT.dtype.element_ty), mask=rmask[:, None] & cmask2[None, :])
        else:
            _up_epilogue(acc, acc2, e, rows, rmask, cols, cmask, pid_n, B, stride_be, ORDER, GATE, H, stride_h, OUT,
                         stride_o, DGP, GA, stride_ga, DB, stride_db, M, E,
                         BWD, ACT, GLU, HAS_BIAS, SAVE_H, STORE_GA, HAS_DB)
            if SPLIT:
                _up_epilogue(accb, accb2, e, rows, rmask, cols2, cmask2, 1, B, stride_be, ORDER, GATE, H, stride_h,
                             OUT, stride_o, DGP, GA, stride_ga, DB, stride_db, M, E,
                             BWD, ACT, GLU, HAS_BIAS, SAVE_H, STORE_GA, HAS_DB)


@triton.jit
def _row_tile(X, stride_x, rows, rmask, cols, cmask):
    """X[rows, cols] of a row-major matrix, in fp32 (PASS 2's da)."""
    p = X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :]
    return tl.load(p, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
