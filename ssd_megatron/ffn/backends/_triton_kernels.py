"""Triton kernels of the `triton` expert backend (imported lazily: needs triton).

Three grouped GEMMs cover the whole forward and backward, each reading tokens *through* the routing
plan instead of from materialised copies (ScatterMoE's idea; the code here is our own):

  up      out[r] = epilogue(X[token[r]] @ W[e]^T)        gather fused into the A-operand loads
          fwd: X = x,  W = w1 [N, F1, D]; epilogue = +b1, save h (pre-activation), a = act(h)
          bwd: X = dy, W = w2 [N, E, D];  epilogue = da -> dgate partials (da . a),
               dh = gate * da * act'(h) (GLU: the gate and up halves), ga = gate * a (the dW2 operand),
               db1 += column sums of dh (fp32 atomics, one per column per tile)
  down    buf[order[r]] = scale[r] * (A[r] @ W[e])       scatter fused into the store
          fwd: A = a,  W = w2 (scale = gate) -> y  = buf.view(T, K, D).sum(1)
          bwd: A = dh, W = w1 (no scale)     -> dx = buf.view(T, K, D).sum(1)
  wgrad   dW[e] = sum_{r in e} L[r]^T R[token[r]]       (grouped weight gradients; R gathered in-kernel
          dW2: L = ga, R = dy;  dW1: L = dh, R = x     or pre-gathered, see TritonBackend(wgrad=...))

The routing plan itself (the pairs sorted by expert) is a counting sort in three small kernels
(`routing_plan`). Expert e owns sorted rows offsets[e]:offsets[e+1]. The M-tiles of `up`/`down` never straddle two
experts: every program finds its (expert, first row) from the offsets with a vectorised cumsum over
the per-expert tile counts, so the grid is a host-side upper bound (cdiv(M, BM) + N tiles) and no
count ever travels to the host.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ACT_CODES = {  # name -> (elementwise function code, GLU)
    "relu": (0, False), "gelu": (1, False), "squared_relu": (2, False), "gelu_tanh": (4, False),
    "swiglu": (3, True), "geglu": (1, True), "reglu": (0, True),
}


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 0:
        out = tl.maximum(h, 0.0)
    elif ACT == 1:
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        r = tl.maximum(h, 0.0)
        out = r * r
    elif ACT == 4:  # tanh-approximate GELU; tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        out = 0.5 * h * (2.0 * tl.sigmoid(2.0 * u))
    else:
        out = h * tl.sigmoid(h)
    return out


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    if ACT == 0:
        out = tl.where(h > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        out = cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    elif ACT == 2:
        out = 2.0 * tl.maximum(h, 0.0)
    elif ACT == 4:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        out = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    else:
        s = tl.sigmoid(h)
        out = s * (1.0 + h * (1.0 - s))
    return out


@triton.jit
def _tile_of(OFFS, pid_m, N, BM: tl.constexpr, NP2: tl.constexpr):
    """M-tile `pid_m` -> (expert, first sorted row, end of that expert's rows)."""
    ids = tl.arange(0, NP2)
    valid = ids < N
    start = tl.load(OFFS + ids, mask=valid, other=0)
    end = tl.load(OFFS + ids + 1, mask=valid, other=0)
    ntiles = (end - start + BM - 1) // BM
    cum = tl.cumsum(ntiles, 0)
    e = tl.sum((cum <= pid_m).to(tl.int32), 0)
    sel = ids == e
    first_tile = tl.sum(tl.where(sel, cum - ntiles, 0), 0)
    row0 = tl.sum(tl.where(sel, start, 0), 0) + (pid_m - first_tile) * BM
    row_end = tl.sum(tl.where(sel, end, 0), 0)
    return e, row0, row_end


@triton.jit
def _grid_tile(OFFS, num_n, N, BM: tl.constexpr, NP2: tl.constexpr):
    """This program's place in a grid of (expert-aligned M-tile, column block) pairs: (expert, column
    block, first row, rows, row mask, whether the tile holds any row)."""
    pid = tl.program_id(0)
    e, row0, row_end = _tile_of(OFFS, pid // num_n, N, BM, NP2)
    rows = row0 + tl.arange(0, BM)
    return e, pid % num_n, row0, rows, rows < row_end, row0 < row_end


# ----------------------------------------------------------------------------- up (gather GEMM)

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
        if HAS_BIAS:
            bp = B + e.to(tl.int64) * stride_be + cols
            acc += tl.load(bp, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if GLU:
                acc2 += tl.load(bp + E, mask=cmask, other=0.0).to(tl.float32)[None, :]
        # round to the storage dtype first, as a torch matmul + activation would
        h = acc.to(dt)
        if SAVE_H:
            tl.store(hp, h, mask=omask)
        act = _act(h.to(tl.float32), ACT)
        if GLU:
            hu = acc2.to(dt)
            if SAVE_H:
                tl.store(hp + E, hu, mask=omask)
            act = act.to(dt).to(tl.float32) * hu.to(tl.float32)
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
    H, stride_h,                 # [M, F1] pre-activation: written fwd (SAVE_H), read bwd
    OUT, stride_o,               # fwd: a [M, E]; bwd: dh [M, F1]
    DGP,                         # bwd: [num_n, M] fp32 partial dgate (indexed by flat pair)
    GA, stride_ga,               # bwd: [M, E] gate * a (operand of dW2)
    DB, stride_db,               # bwd: [N, F1] fp32 bias grad (atomic column sums of dh)
    N, M, Din, E, num_n,
    BWD: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAVE_H: tl.constexpr, STORE_GA: tl.constexpr, HAS_DB: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NP2: tl.constexpr,
):
    e, pid_n, row0, rows, rmask, live = _grid_tile(OFFS, num_n, N, BM, NP2)
    if live:
        tok = tl.load(TOK + rows, mask=rmask, other=0).to(tl.int64)
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < E
        ks = tl.arange(0, BK)
        xp = X + tok[:, None] * stride_x + ks[None, :]
        wp = W + e.to(tl.int64) * stride_we + cols[None, :] * stride_wf + ks[:, None] * stride_wk
        up_off = E * stride_wf
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc2 = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, Din, BK):
            if EVEN_K:
                a = tl.load(xp)
                if EVEN_N:
                    b = tl.load(wp)
                else:
                    b = tl.load(wp, mask=cmask[None, :], other=0.0)
            else:
                km = (k0 + ks) < Din
                a = tl.load(xp, mask=km[None, :], other=0.0)
                b = tl.load(wp, mask=km[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            if GLU and not BWD:
                if EVEN_K:
                    if EVEN_N:
                        b2 = tl.load(wp + up_off)
                    else:
                        b2 = tl.load(wp + up_off, mask=cmask[None, :], other=0.0)
                else:
                    b2 = tl.load(wp + up_off, mask=km[:, None] & cmask[None, :], other=0.0)
                acc2 = tl.dot(a, b2, acc2, input_precision=PREC)
            xp += BK
            wp += BK * stride_wk
        _up_epilogue(acc, acc2, e, rows, rmask, cols, cmask, pid_n, B, stride_be, ORDER, GATE, H, stride_h, OUT,
                     stride_o, DGP, GA, stride_ga, DB, stride_db, M, E,
                     BWD, ACT, GLU, HAS_BIAS, SAVE_H, STORE_GA, HAS_DB)


@triton.jit
def _up_persistent_kernel(
    X, stride_x, W, stride_we, stride_wf, stride_wk, B, stride_be, TOK, ORDER, GATE, OFFS, H, stride_h,
    OUT, stride_o, DGP, GA, stride_ga, DB, stride_db, N, M, Din, E, num_n,
    BWD: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAVE_H: tl.constexpr, STORE_GA: tl.constexpr, HAS_DB: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NP2: tl.constexpr,
):
    """`_up_kernel` over a persistent grid: program p takes the (M-tile, column block) pairs p, p + G, ...
    in one flattened loop over their k steps, with the epilogue inside it, so that the next pair's first
    operands are fetched while this pair's epilogue runs (one CTA per SM at the base shape's tiles: no
    other CTA would hide it)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    ids = tl.arange(0, NP2)
    valid = ids < N
    counts = tl.load(OFFS + ids + 1, mask=valid, other=0) - tl.load(OFFS + ids, mask=valid, other=0)
    total = tl.sum((counts + BM - 1) // BM, 0) * num_n
    KT = tl.cdiv(Din, BK)
    n_iter = ((total - pid + G - 1) // G) * KT
    ks = tl.arange(0, BK)
    up_off = E * stride_wf
    t = pid - G
    ki = KT - 1
    e = pid * 0
    pid_n = pid * 0
    rows = tl.arange(0, BM)
    rmask = rows < 0
    tok = rows.to(tl.int64)
    cols = tl.arange(0, BN)
    cmask = cols < 0
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, n_iter):
        ki = tl.where(ki == KT - 1, 0, ki + 1)
        if ki == 0:
            t += G
            pid_n = t % num_n
            e, row0, row_end = _tile_of(OFFS, t // num_n, N, BM, NP2)
            rows = row0 + tl.arange(0, BM)
            rmask = rows < row_end
            tok = tl.load(TOK + rows, mask=rmask, other=0).to(tl.int64)
            cols = pid_n * BN + tl.arange(0, BN)
            cmask = cols < E
        kk = ki * BK + ks
        km = kk < Din
        a = tl.load(X + tok[:, None] * stride_x + kk[None, :], mask=km[None, :], other=0.0)
        wp = W + e.to(tl.int64) * stride_we + cols[None, :] * stride_wf + kk[:, None] * stride_wk
        b = tl.load(wp, mask=km[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        if GLU and not BWD:
            b2 = tl.load(wp + up_off, mask=km[:, None] & cmask[None, :], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=PREC)
        if ki == KT - 1:
            _up_epilogue(acc, acc2, e, rows, rmask, cols, cmask, pid_n, B, stride_be, ORDER, GATE, H, stride_h, OUT,
                         stride_o, DGP, GA, stride_ga, DB, stride_db, M, E,
                         BWD, ACT, GLU, HAS_BIAS, SAVE_H, STORE_GA, HAS_DB)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            acc2 = tl.zeros((BM, BN), dtype=tl.float32)


# ----------------------------------------------------------------------------- down (scatter GEMM)

@triton.jit
def _down_cols(A, stride_a, W, stride_wk, stride_wn, OUT, stride_o, e, rows64, rmask, tok, pair, g, n0, Ein, Dout,
               SCALE: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
               PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Output columns n0:n0+BN of one M-tile: the GEMM over Ein, then the scaled scatter (or atomic add)."""
    cols = n0 + tl.arange(0, BN)
    cmask = cols < Dout
    ks = tl.arange(0, BK)
    ap = A + rows64[:, None] * stride_a + ks[None, :]
    wp = W + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, Ein, BK):
        if EVEN_K:
            a = tl.load(ap, mask=rmask[:, None], other=0.0)
            if EVEN_N:
                b = tl.load(wp)
            else:
                b = tl.load(wp, mask=cmask[None, :], other=0.0)
        else:
            km = (k0 + ks) < Ein
            a = tl.load(ap, mask=rmask[:, None] & km[None, :], other=0.0)
            b = tl.load(wp, mask=km[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        ap += BK
        wp += BK * stride_wk
    _down_store(acc, OUT, stride_o, rmask, tok, pair, g, cols, cmask, SCALE, ATOMIC)


@triton.jit
def _down_store(acc, OUT, stride_o, rmask, tok, pair, g, cols, cmask, SCALE: tl.constexpr, ATOMIC: tl.constexpr):
    """The down GEMM's epilogue: gate scale, then the scatter to (t, k) rows or the atomic add into y."""
    if SCALE:
        acc = acc * g[:, None]
    omask = rmask[:, None] & cmask[None, :]
    if ATOMIC:
        # the K contributions of a token come from different programs: add them in place
        tl.atomic_add(OUT + tok[:, None] * stride_o + cols[None, :], acc.to(OUT.dtype.element_ty),
                      mask=omask, sem="relaxed")
    else:
        tl.store(OUT + pair[:, None] * stride_o + cols[None, :], acc.to(OUT.dtype.element_ty), mask=omask)


@triton.jit
def _down_rows(ORDER, TOK, GATE, rows, rmask, SCALE: tl.constexpr):
    """Routing metadata of an M-tile's rows: (flat pair, token, gate) as int64, int64, fp32."""
    pair = tl.load(ORDER + rows, mask=rmask, other=0).to(tl.int64)
    tok = tl.load(TOK + rows, mask=rmask, other=0).to(tl.int64)
    if SCALE:
        g = tl.load(GATE + pair, mask=rmask, other=0.0).to(tl.float32)
    else:
        g = rmask.to(tl.float32)  # unused
    return pair, tok, g


@triton.jit
def _down_persistent_kernel(
    A, stride_a, W, stride_we, stride_wk, stride_wn, ORDER, TOK, GATE, OFFS, OUT, stride_o, N, Ein, Dout,
    SCALE: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NP2: tl.constexpr,
):
    """The down GEMM as a persistent grid: program p takes M-tiles p, p + G, ... and, for each, every
    output column block. The (tile, column block, k step) loops are flattened into one loop with the
    epilogue inside it, so the software pipeliner prefetches the next block's operands while the
    current block's atomics drain (Ein is short, 192-256: three or four k steps per block, which leaves
    a per-tile pipeline no steady state)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    ids = tl.arange(0, NP2)
    valid = ids < N
    counts = tl.load(OFFS + ids + 1, mask=valid, other=0) - tl.load(OFFS + ids, mask=valid, other=0)
    total = tl.sum((counts + BM - 1) // BM, 0)
    NT = tl.cdiv(Dout, BN)
    KT = tl.cdiv(Ein, BK)
    n_iter = ((total - pid + G - 1) // G) * NT * KT
    ks = tl.arange(0, BK)
    tile = pid - G
    ni = NT - 1
    ki = KT - 1
    e = pid * 0
    rows = tl.arange(0, BM)
    rmask = rows < 0
    pair, tok, g = _down_rows(ORDER, TOK, GATE, rows, rmask, SCALE)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, n_iter):
        ki = tl.where(ki == KT - 1, 0, ki + 1)
        if ki == 0:
            ni = tl.where(ni == NT - 1, 0, ni + 1)
            if ni == 0:
                tile += G
                e, row0, row_end = _tile_of(OFFS, tile, N, BM, NP2)
                rows = row0 + tl.arange(0, BM)
                rmask = rows < row_end
                pair, tok, g = _down_rows(ORDER, TOK, GATE, rows, rmask, SCALE)
        cols = ni * BN + tl.arange(0, BN)
        cmask = cols < Dout
        kk = ki * BK + ks
        km = kk < Ein
        a = tl.load(A + rows.to(tl.int64)[:, None] * stride_a + kk[None, :], mask=rmask[:, None] & km[None, :],
                    other=0.0)
        b = tl.load(W + e.to(tl.int64) * stride_we + kk[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=km[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        if ki == KT - 1:
            _down_store(acc, OUT, stride_o, rmask, tok, pair, g, cols, cmask, SCALE, ATOMIC)
            acc = tl.zeros((BM, BN), dtype=tl.float32)


@triton.jit
def _down_tma_kernel(
    A_desc, W_desc, ORDER, TOK, GATE, OFFS, OUT, stride_o, N, Ein, Dout, num_n,
    SCALE: tl.constexpr, ATOMIC: tl.constexpr, W_KROWS: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NP2: tl.constexpr,
):
    """`_down_kernel` with both operands fetched by the bulk-copy engine (TMA): A's tile is the contiguous
    sorted rows row0:row0 + BM (rows past the expert's end are fetched too and masked at the store), and
    W[e] comes from a 2-D view of all experts' weights ([N*Ein, Dout] when W_KROWS, else [Dout, N*Ein]).
    No per-thread addresses in the main loop; the launcher uses it only when Ein is a multiple of BK."""
    e, pid_n, row0, rows, rmask, live = _grid_tile(OFFS, num_n, N, BM, NP2)
    if live:
        pair, tok, g = _down_rows(ORDER, TOK, GATE, rows, rmask, SCALE)
        n0 = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, Ein, BK):
            a = A_desc.load([row0, k0])
            if W_KROWS:
                b = W_desc.load([e * Ein + k0, n0])
            else:
                b = W_desc.load([n0, e * Ein + k0]).T
            acc = tl.dot(a, b, acc, input_precision=PREC)
        cols = n0 + tl.arange(0, BN)
        _down_store(acc, OUT, stride_o, rmask, tok, pair, g, cols, cols < Dout, SCALE, ATOMIC)


@triton.jit
def _down_kernel(
    A, stride_a,                 # [M, Ein] grouped rows (a fwd, dh bwd)
    W, stride_we, stride_wk, stride_wn,  # [N, Ein, Dout] (w2 fwd, w1 bwd)
    ORDER, TOK, GATE, OFFS,
    OUT, stride_o,               # ATOMIC: [T, Dout] (zeroed), else [T*K, Dout] indexed by flat pair
    N, Ein, Dout, num_n,
    SCALE: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr,
    ROWLOOP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NP2: tl.constexpr,
):
    """A program owns an M-tile and BN output columns, or with ROWLOOP all Dout columns in BN steps
    (the A tile is then fetched from L2 once and re-read from L1, and the routing metadata once)."""
    e, pid_n, row0, rows, rmask, live = _grid_tile(OFFS, num_n, N, BM, NP2)
    if live:
        rows64 = rows.to(tl.int64)
        pair, tok, g = _down_rows(ORDER, TOK, GATE, rows, rmask, SCALE)
        we = W + e.to(tl.int64) * stride_we
        if ROWLOOP:
            for n0 in range(0, Dout, BN):
                _down_cols(A, stride_a, we, stride_wk, stride_wn, OUT, stride_o, e, rows64, rmask, tok, pair, g, n0,
                           Ein, Dout, SCALE, ATOMIC, EVEN_K, EVEN_N, PREC, BM, BN, BK)
        else:
            _down_cols(A, stride_a, we, stride_wk, stride_wn, OUT, stride_o, e, rows64, rmask, tok, pair, g,
                       pid_n * BN, Ein, Dout, SCALE, ATOMIC, EVEN_K, EVEN_N, PREC, BM, BN, BK)


# ----------------------------------------------------------------------------- wgrad (grouped weight grads)

@triton.jit
def _wgrad_kernel(
    L, stride_l,                 # [M, P] grouped rows (ga or dh)
    R, stride_r,                 # GATHER: [T, Q] token-major (dy or x); else [M, Q] grouped rows
    TOK, OFFS,
    DW, stride_de, stride_dp, stride_dq,  # [N, P, Q], any strides (laid out like the weight it grads)
    N, P, Q, num_p, num_q,
    GATHER: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
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
        if GATHER:
            src = tl.load(TOK + rows, mask=rm, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        r = tl.load(R + src[:, None] * stride_r + qc[None, :], mask=rm[:, None] & qm[None, :], other=0.0)
        acc = tl.dot(lt, r, acc, input_precision=PREC)
    dwp = DW + e.to(tl.int64) * stride_de + pc[:, None] * stride_dp + qc[None, :] * stride_dq
    omask = pm[:, None] & qm[None, :]
    if SPLIT:
        if start < end:
            tl.atomic_add(dwp, acc, mask=omask, sem="relaxed")
    else:
        tl.store(dwp, acc.to(DW.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------- routing plan (counting sort)

@triton.jit
def _block_onehot(IDX, b, M, BLK: tl.constexpr, NP2: tl.constexpr):
    """Pairs b*BLK.. of the flat expert ids: (pair ids, mask, expert ids, one-hot [BLK, NP2] int32)."""
    p = b * BLK + tl.arange(0, BLK)
    pm = p < M
    e = tl.load(IDX + p, mask=pm, other=0).to(tl.int32)
    onehot = ((e[:, None] == tl.arange(0, NP2)[None, :]) & pm[:, None]).to(tl.int32)
    return p, pm, e, onehot


@triton.jit
def _plan_count_kernel(IDX, COUNTS, M, BLK: tl.constexpr, NP2: tl.constexpr):
    """COUNTS[b, e] = pairs of block b routed to expert e."""
    b = tl.program_id(0)
    _, _, _, onehot = _block_onehot(IDX, b, M, BLK, NP2)
    tl.store(COUNTS + b * NP2 + tl.arange(0, NP2), tl.sum(onehot, 0))


@triton.jit
def _plan_scan_kernel(COUNTS, BASE, OFFS, NB, N, CH: tl.constexpr, NP2: tl.constexpr):
    """One program: OFFS [N+1] = exclusive sums of the expert totals; BASE[b, e] = OFFS[e] + pairs of
    expert e in blocks before b (where block b's rows of expert e start in the sorted order)."""
    cols = tl.arange(0, NP2)
    chunk = tl.arange(0, CH)
    total = tl.zeros((NP2,), dtype=tl.int32)
    for b0 in range(0, NB, CH):
        m = (b0 + chunk) < NB
        c = tl.load(COUNTS + (b0 + chunk)[:, None] * NP2 + cols[None, :], mask=m[:, None], other=0)
        total += tl.sum(c, 0)
    start = tl.cumsum(total, 0) - total
    tl.store(OFFS + cols, start, mask=cols < N)
    tl.store(OFFS + N, tl.sum(total, 0))
    run = start
    for b0 in range(0, NB, CH):
        m = (b0 + chunk) < NB
        c = tl.load(COUNTS + (b0 + chunk)[:, None] * NP2 + cols[None, :], mask=m[:, None], other=0)
        tl.store(BASE + (b0 + chunk)[:, None] * NP2 + cols[None, :], run[None, :] + tl.cumsum(c, 0) - c,
                 mask=m[:, None])
        run += tl.sum(c, 0)


@triton.jit
def _plan_scatter_kernel(IDX, BASE, ORDER, TOK, SEXP, M, K, BLK: tl.constexpr, NP2: tl.constexpr):
    """Each pair's sorted row = its block's start for its expert + its rank among the block's pairs of
    that expert (a stable counting sort: within an expert, pairs keep increasing order)."""
    b = tl.program_id(0)
    p, pm, e, onehot = _block_onehot(IDX, b, M, BLK, NP2)
    rank = tl.sum(onehot * (tl.cumsum(onehot, 0) - 1), 1)
    row = tl.load(BASE + b * NP2 + e, mask=pm, other=0) + rank
    tl.store(ORDER + row, p, mask=pm)
    tl.store(TOK + row, p // K, mask=pm)
    tl.store(SEXP + row, e, mask=pm)


def routing_plan(flat_idx: torch.Tensor, num_experts: int, top_k: int):
    """(order, token, sorted expert, offsets), all int32: the stable sort of the flat pairs by expert
    as three small kernels (counts per block, one scan, scatter) instead of a radix sort + searchsorted."""
    M, N = flat_idx.numel(), num_experts
    dev = flat_idx.device
    np2 = max(16, triton.next_power_of_2(N))
    blk = max(64, 8192 // np2)  # one-hot tile of 8192 entries per program
    nb = triton.cdiv(M, blk)
    counts = torch.empty(nb, np2, device=dev, dtype=torch.int32)
    base = torch.empty_like(counts)
    offsets = torch.empty(N + 1, device=dev, dtype=torch.int32)
    order, token, sexp = (torch.empty(M, device=dev, dtype=torch.int32) for _ in range(3))
    if M:
        _plan_count_kernel[(nb,)](flat_idx, counts, M, BLK=blk, NP2=np2, num_warps=4)
        _plan_scan_kernel[(1,)](counts, base, offsets, nb, N, CH=max(1, 4096 // np2), NP2=np2, num_warps=4)
        _plan_scatter_kernel[(nb,)](flat_idx, base, order, token, sexp, M, top_k, BLK=blk, NP2=np2, num_warps=4)
    else:
        offsets.zero_()
    return order, token, sexp, offsets


# ----------------------------------------------------------------------------- configs and launchers

# (BM|BP, BN|BQ, BK, num_warps, num_stages[, variant]). variant: down 1 = ROWLOOP (a program covers all
# output columns), 2 = PERSISTENT (one flattened tile/column/k loop per program of a persistent grid);
# wgrad n = split each expert's reduction into chunks of n rows (0 = none). Defaults are chosen per
# kernel from the sweeps recorded in docs/kernels.md; `SSD_TRITON_TUNE=1` times the candidates once per
# shape key instead.
DEFAULTS = {
    "up": (128, 256, 64, 8, 3),
    "up_glu": (128, 64, 64, 8, 3),
    "up_bwd": (128, 64, 64, 4, 4),
    "down": (128, 128, 64, 8, 3),
    "wgrad": (128, 128, 64, 8, 3),
    "wgrad_mat": (128, 128, 64, 8, 3),
}
CANDIDATES = {  # (BM|BP, BN|BQ, BK, warps, stages); swept with SSD_TRITON_TUNE=1 (see docs/kernels.md)
    "up": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4)],
    "up_glu": [(128, 64, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (256, 64, 64, 8, 3)],
    "up_bwd": [(128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 64, 64, 8, 4), (64, 64, 64, 4, 4)],
    "down": [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 256, 64, 8, 3),
             (128, 128, 64, 4, 3, 1), (128, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 2), (128, 128, 64, 4, 3, 2)],
    "wgrad": [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 128, 128, 4, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
              (64, 128, 128, 4, 3, 1024), (128, 128, 64, 8, 3, 2048)],
    "wgrad_mat": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4)],
}
_FORCED: dict = {}
_TUNED: dict = {}
TUNE_LOG: list = []


def force_config(**cfgs):
    """Override the tile config of kernels by name (tests use tiny tiles under TRITON_INTERPRET)."""
    _FORCED.clear()
    _FORCED.update(cfgs)


def _tuning() -> bool:
    return os.environ.get("SSD_TRITON_TUNE", "0") == "1"


def _default(base: str, key: tuple):
    """Untuned choice: the winners of the sweeps (docs/kernels.md: H100 run 4, H200 session 13) by problem size."""
    if base in ("up_bwd", "up_glu") and key[0] >= 2048:   # long reduction (D): wider tiles
        return (128, 128, 64, 8, 3)
    if base == "down" and key[1] >= 2048:                  # wide output (8B's D = 4096): ROWLOOP, H200 2026-12-04
        return (128, 128, 64, 4, 3, 1)
    if base == "wgrad" and key[1] <= 1024:                # few (expert, tile) programs: smaller P tiles
        return (64, 128, 128, 4, 3) if key[0] <= 256 else (64, 128, 64, 4, 4)
    return DEFAULTS[base]


def _pick(kind: str, key: tuple, launch):
    """The config for `kind` at `key`; when tuning, time each candidate once with `launch(cfg)`."""
    base = kind.split(":")[0]
    if kind in _FORCED or base in _FORCED:
        return _FORCED.get(kind, _FORCED.get(base))
    if not _tuning() or os.environ.get("TRITON_INTERPRET") == "1":
        return _default(base, key)
    k = (kind,) + key
    if k not in _TUNED:
        from triton.testing import do_bench
        times = []
        for cfg in CANDIDATES[base]:
            try:
                t = do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
            except Exception as exc:  # a config that does not fit (shared memory) is skipped
                t = float("inf")
                TUNE_LOG.append({"kernel": kind, "key": list(key), "cfg": list(cfg), "error": str(exc)[:200]})
            times.append(t)
            TUNE_LOG.append({"kernel": kind, "key": list(key), "cfg": list(cfg), "ms": t})
        _TUNED[k] = CANDIDATES[base][min(range(len(times)), key=times.__getitem__)]
    return _TUNED[k]


def _prec(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _np2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


ROWLOOP, PERSISTENT, TMA = 1, 2, 3  # config variants (6th entry): ROWLOOP, TMA (down), PERSISTENT (up, up_bwd, down)


_PROGRAMS: dict = {}


def _persistent_programs(kernel, args, meta, device, upper: int, key) -> int:
    """Programs of a persistent grid (at most `upper`): as many CTAs as fit on all SMs at once, by the
    compiled kernel's registers and shared memory. The interpreter gets 3, so that each program loops."""
    if device.type != "cuda":
        return min(3, upper)
    if key not in _PROGRAMS:
        props = torch.cuda.get_device_properties(device)
        try:
            compiled = kernel.warmup(*args, grid=(1,), **meta)
            compiled._init_handles()
            threads = 32 * meta["num_warps"]
            by_regs = getattr(props, "regs_per_multiprocessor", 65536) // max(1, compiled.n_regs * threads)
            smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
            by_smem = smem // (compiled.metadata.shared + 1024)  # + the driver's 1 KB per CTA
            ctas = max(1, min(by_regs, by_smem))
        except Exception:  # no compiled-kernel metadata (e.g. tools/compile_report.py): one CTA per SM
            ctas = 1
        _PROGRAMS[key] = ctas * props.multi_processor_count
    return min(upper, _PROGRAMS[key])


def _launch_up(args, meta, cfg, M, N, Din, E, device, key):
    """One `_up_kernel` launch (a program per (M-tile, column block)) or, with the PERSISTENT variant,
    `_up_persistent_kernel` over as many programs as fit on the GPU at once."""
    BM, BN, BK, nw, ns = cfg[:5]
    num_n = triton.cdiv(E, BN)
    args = args + (N, M, Din, E, num_n)
    meta = dict(meta, BM=BM, BN=BN, BK=BK, NP2=_np2(N), num_warps=nw, num_stages=ns)
    tiles = (triton.cdiv(M, BM) + N) * num_n
    if len(cfg) > 5 and cfg[5] == PERSISTENT:
        grid = (_persistent_programs(_up_persistent_kernel, args, meta, device, tiles, key + (tuple(cfg),)),)
        _up_persistent_kernel[grid](*args, **meta)
    else:
        _up_kernel[(tiles,)](*args, EVEN_K=Din % BK == 0, EVEN_N=E % BN == 0, **meta)


def up_forward(x, w1, b1, plan, activation, save_h: bool):
    """a [M, E] (and h [M, F1] when save_h) for the sorted rows."""
    act, glu = ACT_CODES[activation]
    M, N = plan.num_rows, plan.num_experts
    F1, D = w1.shape[1], w1.shape[2]
    E = F1 // 2 if glu else F1
    a = torch.empty(M, E, device=x.device, dtype=x.dtype)
    h = torch.empty(M, F1, device=x.device, dtype=x.dtype) if save_h else a
    bias = b1 if b1 is not None else a
    args = (x, x.stride(0), w1, w1.stride(0), w1.stride(1), w1.stride(2), bias, bias.stride(0),
            plan.token, plan.order, a, plan.offsets, h, h.stride(0), a, a.stride(0), a, a, 0, a, 0)
    meta = dict(BWD=False, ACT=act, GLU=glu, HAS_BIAS=b1 is not None, SAVE_H=save_h, STORE_GA=False, HAS_DB=False,
                PREC=_prec(x))
    key = ("up", act, glu, b1 is not None, save_h, x.dtype, N, x.device)

    def launch(cfg):
        _launch_up(args, meta, cfg, M, N, D, E, x.device, key)

    launch(_pick("up_glu" if glu else "up", (D, E, str(x.dtype)), launch))
    return a, (h if save_h else None)


def up_backward(dy, w2, h, gate_flat, plan, activation, need_ga: bool, need_db: bool):
    """dh [M, F1], the per-pair gate gradient [T*K] (fp32), ga = gate*a [M, E], db1 [N, F1] (fp32)."""
    act, glu = ACT_CODES[activation]
    M, N = plan.num_rows, plan.num_experts
    E, D = w2.shape[1], w2.shape[2]
    F1 = h.shape[1]
    dh = torch.empty(M, F1, device=dy.device, dtype=dy.dtype)
    ga = torch.empty(M, E, device=dy.device, dtype=dy.dtype) if need_ga else dh
    db = torch.empty(N, F1, device=dy.device, dtype=torch.float32) if need_db else dh
    meta = dict(BWD=True, ACT=act, GLU=glu, HAS_BIAS=False, SAVE_H=False, STORE_GA=need_ga, HAS_DB=need_db,
                PREC=_prec(dy))
    key = ("up_bwd", act, glu, need_ga, need_db, dy.dtype, N, dy.device)
    state = {}

    def launch(cfg):
        dgp = torch.empty(triton.cdiv(E, cfg[1]), M, device=dy.device, dtype=torch.float32)
        if need_db:
            db.zero_()
        args = (dy, dy.stride(0), w2, w2.stride(0), w2.stride(1), w2.stride(2), dh, 0,
                plan.token, plan.order, gate_flat, plan.offsets, h, h.stride(0), dh, dh.stride(0), dgp,
                ga, ga.stride(0), db, db.stride(0))
        _launch_up(args, meta, cfg, M, N, D, E, dy.device, key)
        state["dgp"] = dgp

    launch(_pick("up_bwd", (D, E, str(dy.dtype)), launch))
    return dh, state["dgp"].sum(0), (ga if need_ga else None), (db if need_db else None)


def _down_descriptors(a, w, BM, BN, BK):
    """(A, W, W_KROWS) TMA descriptors for `_down_tma_kernel`, or None where the layouts do not allow one:
    rows of `a` contiguous, and all experts' W as one 2-D matrix with a contiguous last dim."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    N, Ein, Dout = w.shape
    s0, s1, s2 = w.stride()
    es = a.element_size()
    if a.stride(1) != 1 or (a.stride(0) * es) % 16 or a.data_ptr() % 16 or w.data_ptr() % 16:
        return None
    if s2 == 1 and s0 == Ein * s1 and (s1 * es) % 16 == 0:      # [N*Ein, Dout]: rows are k
        w2d = TensorDescriptor(w, [N * Ein, Dout], [s1, 1], [BK, BN])
        krows = True
    elif s1 == 1 and s0 == Ein and (s2 * es) % 16 == 0:         # [Dout, N*Ein]: e.g. W_out's column view
        w2d = TensorDescriptor(w, [Dout, N * Ein], [s2, 1], [BN, BK])
        krows = False
    else:
        return None
    return TensorDescriptor(a, [a.shape[0], Ein], [a.stride(0), 1], [BM, BK]), w2d, krows


def down_scatter(a, w, plan, gate_flat, combine="buffer"):
    """y [T, Dout] = sum over k of (gate *) a[sorted row of (t, k)] @ w[expert of (t, k)].

    combine: "buffer" scatters each (t, k) row to a [T*K, Dout] buffer, then sums over k (deterministic);
    "atomic32"/"atomic16" add the rows into a zeroed fp32 / storage-dtype [T, Dout] output in place.
    """
    M, N, T, K = plan.num_rows, plan.num_experts, plan.num_tokens, plan.top_k
    Ein, Dout = w.shape[1], w.shape[2]
    atomic = combine != "buffer" and K > 1
    if atomic:
        out_dtype = torch.float32 if combine == "atomic32" else a.dtype
        out = torch.empty(T, Dout, device=a.device, dtype=out_dtype)  # zeroed per launch, below
    else:
        out = torch.empty(M, Dout, device=a.device, dtype=a.dtype)
    gate = gate_flat if gate_flat is not None else out

    def launch(cfg):
        BM, BN, BK, nw, ns = cfg[:5]
        variant = cfg[5] if len(cfg) > 5 else 0
        if atomic:
            out.zero_()
        if variant == PERSISTENT:
            args = (a, a.stride(0), w, w.stride(0), w.stride(1), w.stride(2), plan.order, plan.token, gate,
                    plan.offsets, out, out.stride(0), N, Ein, Dout)
            meta = dict(SCALE=gate_flat is not None, ATOMIC=atomic, PREC=_prec(a), BM=BM, BN=BN, BK=BK, NP2=_np2(N),
                        num_warps=nw, num_stages=ns)
            key = (tuple(cfg), a.dtype, w.dtype, out.dtype, atomic, gate_flat is not None, N, a.device)
            grid = (_persistent_programs(_down_persistent_kernel, args, meta, a.device, triton.cdiv(M, BM) + N, key),)
            _down_persistent_kernel[grid](*args, **meta)
            return
        if variant == TMA and Ein % BK == 0:
            descs = _down_descriptors(a, w, BM, BN, BK)
            if descs is not None:
                num_n = triton.cdiv(Dout, BN)
                _down_tma_kernel[((triton.cdiv(M, BM) + N) * num_n,)](
                    *descs[:2], plan.order, plan.token, gate, plan.offsets, out, out.stride(0), N, Ein, Dout, num_n,
                    SCALE=gate_flat is not None, ATOMIC=atomic, W_KROWS=descs[2], PREC=_prec(a),
                    BM=BM, BN=BN, BK=BK, NP2=_np2(N), num_warps=nw, num_stages=ns)
                return
        rowloop = variant == ROWLOOP
        num_n = 1 if rowloop else triton.cdiv(Dout, BN)
        grid = ((triton.cdiv(M, BM) + N) * num_n,)
        _down_kernel[grid](
            a, a.stride(0), w, w.stride(0), w.stride(1), w.stride(2), plan.order, plan.token, gate, plan.offsets,
            out, out.stride(0), N, Ein, Dout, num_n,
            SCALE=gate_flat is not None, ATOMIC=atomic, EVEN_K=Ein % BK == 0, EVEN_N=Dout % BN == 0,
            PREC=_prec(a), ROWLOOP=rowloop, BM=BM, BN=BN, BK=BK, NP2=_np2(N), num_warps=nw, num_stages=ns)

    launch(_pick(f"down:{combine}", (Ein, Dout, str(a.dtype)), launch))
    if atomic:
        return out.to(a.dtype)
    return out if K == 1 else out.view(T, K, Dout).sum(1)


def wgrad(lhs, rhs, plan, like, gathered: bool, split: bool = True):
    """dW [N, P, Q] = per expert lhs_rows^T @ rhs_rows; rhs rows are rhs[token[r]] when `gathered`
    is False (the kernel gathers), else rhs is already in sorted-row order. dW gets the strides of the
    weight `like` (e.g. the [N, E, D] view of W_out's columns): its grad then flows back without a copy.
    split: let the config's row chunks (6th entry, 0 = none) split each expert's reduction, summed by
    fp32 atomics (not bitwise reproducible: callers pass False under deterministic algorithms)."""
    N = plan.num_experts
    P, Q = lhs.shape[1], rhs.shape[1]
    dw = torch.empty_strided(like.shape, like.stride(), device=lhs.device, dtype=like.dtype)
    state = {}

    def launch(cfg):
        BP, BQ, BK, nw, ns = cfg[:5]
        ch = cfg[5] if split and len(cfg) > 5 else 0
        num_p, num_q = triton.cdiv(P, BP), triton.cdiv(Q, BQ)
        # with chunks, the grid is an upper bound on the (expert, chunk) pairs, as for the M-tiles
        num_t = triton.cdiv(plan.num_rows, ch) + N if ch else N
        out = torch.zeros(like.shape, device=lhs.device, dtype=torch.float32) if ch else dw
        _wgrad_kernel[(num_t * num_p * num_q,)](
            lhs, lhs.stride(0), rhs, rhs.stride(0), plan.token, plan.offsets,
            out, out.stride(0), out.stride(1), out.stride(2), N, P, Q, num_p, num_q,
            GATHER=not gathered, PREC=_prec(lhs), SPLIT=bool(ch), BP=BP, BQ=BQ, BK=BK, CH=max(ch, BK),
            NP2=_np2(N), num_warps=nw, num_stages=ns)
        state["out"] = out

    launch(_pick("wgrad" if not gathered else "wgrad_mat", (P, Q, str(lhs.dtype)), launch))
    if state["out"] is not dw:
        dw.copy_(state["out"])
    return dw
