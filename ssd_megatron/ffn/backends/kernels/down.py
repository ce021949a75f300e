"""The down GEMM: (scale *) A[r] @ W[e], the K-way combine fused into the store (atomic adds into y or dx,
or a scatter to the (t, k) row of a buffer). Per-tile, ROWLOOP, TMA and STAGED variants. RANK1 (dx only)
adds coef[r] * C[e] to each row first: the router's input gradient dgate * c_e (ffn/backends/triton_backend.py).

STAGED: a program loads its M-tile's whole A rows (all Ein columns) once and then sweeps every block of
output columns with one product per block, as the fused forward's down half does with the `a` it keeps
on chip (`_staged_blocks`, shared with kernels/mlp.py). ROWLOOP instead re-reads its A tile, BK columns at
a time, for each output block: at 8B's Dout = 4096 that is 32 reads of each tile (from L2). STAGED was
built to remove those reads and lost when timed (H100, docs/kernels.md v14: 8B dx 2.22 -> 2.30 ms at best,
SwiGLU 2x slower): what bounds the dx launch is its combine's DRAM round trips, not these reads. Opt-in."""
import triton
import triton.language as tl

from .common import _expert_tile, _grid_tile, _load_w


@triton.jit
def _down_cols(A, stride_a, W, stride_wk, stride_wn, OUT, stride_o, C, stride_c, e, rows64, rmask, tok, pair, g, n0,
               Ein, Dout, SCALE: tl.constexpr, ATOMIC: tl.constexpr, RANK1: tl.constexpr, EVEN_K: tl.constexpr,
               EVEN_N: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
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
        else:
            a = tl.load(ap, mask=rmask[:, None] & ((k0 + ks) < Ein)[None, :], other=0.0)
        acc = tl.dot(a, _load_w(wp, k0, ks, Ein, cmask, EVEN_K, EVEN_N), acc, input_precision=PREC)
        ap += BK
        wp += BK * stride_wk
    _down_store(acc, OUT, stride_o, C, stride_c, e, rmask, tok, pair, g, cols, cmask, SCALE, ATOMIC, RANK1)


@triton.jit
def _down_store(acc, OUT, stride_o, C, stride_c, e, rmask, tok, pair, g, cols, cmask, SCALE: tl.constexpr,
                ATOMIC: tl.constexpr, RANK1: tl.constexpr):
    """The down GEMM's epilogue: gate scale (or the rank-1 term g * C[e]), then the scatter to (t, k) rows
    or the atomic add into y."""
    if SCALE:
        acc = acc * g[:, None]
    if RANK1:
        c = tl.load(C + e.to(tl.int64) * stride_c + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += g[:, None] * c[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if ATOMIC:
        # the K contributions of a token come from different programs: add them in place
        tl.atomic_add(OUT + tok[:, None] * stride_o + cols[None, :], acc.to(OUT.dtype.element_ty),
                      mask=omask, sem="relaxed")
    else:
        tl.store(OUT + pair[:, None] * stride_o + cols[None, :], acc.to(OUT.dtype.element_ty), mask=omask)


@triton.jit
def _staged_blocks(a_tile, a_tile2, W, stride_wk, stride_wn, fcols, fmask, fcols2, fmask2, OUT, stride_o, C, stride_c,
                   e, rmask, tok, pair, g, Dout, WD, WD2, r0, SPLIT: tl.constexpr, SCALE: tl.constexpr,
                   ATOMIC: tl.constexpr, RANK1: tl.constexpr, WTMA: tl.constexpr, RC: tl.constexpr, PREC: tl.constexpr,
                   BN: tl.constexpr, BE: tl.constexpr):
    """Every block of BN output columns of an M-tile whose A rows are on chip: a_tile ([BM, BE], the
    reduction's columns fcols) @ W[fcols, block] (+ a_tile2 @ W[fcols2, block] with SPLIT, for a reduction
    that is not one power of two, e.g. 192 = 128 + 64), each block stored by the down epilogue. W: this
    expert's [Ein, Dout] weight (any strides); masked reduction columns multiply W rows loaded as zeros.
    WTMA: W's tiles by TMA instead (`common._expert_tile`, rows r0.. of all experts' weight rows; WD2: the
    second tile's boxes), which cannot mask the next expert's rows: the two tiles must cover Ein exactly;
    past Dout the boxes are TMA's zeros."""
    ns = tl.arange(0, BN)
    wp = W + fcols[:, None] * stride_wk + ns[None, :] * stride_wn
    wp2 = W + fcols2[:, None] * stride_wk + ns[None, :] * stride_wn
    for n0 in range(0, Dout, BN):
        cols = n0 + ns
        cmask = cols < Dout
        if WTMA:
            w = _expert_tile(WD, r0, n0, RC)
        else:
            w = tl.load(wp, mask=fmask[:, None] & cmask[None, :], other=0.0)
        out = tl.dot(a_tile, w, input_precision=PREC)
        if SPLIT:
            if WTMA:
                w2 = _expert_tile(WD2, r0 + BE, n0, RC)
            else:
                w2 = tl.load(wp2, mask=fmask2[:, None] & cmask[None, :], other=0.0)
            out = tl.dot(a_tile2, w2, out, input_precision=PREC)
        _down_store(out, OUT, stride_o, C, stride_c, e, rmask, tok, pair, g, cols, cmask, SCALE, ATOMIC, RANK1)
        wp += BN * stride_wn
        wp2 += BN * stride_wn


@triton.jit
def _down_rows(ORDER, TOK, GATE, rows, rmask, LOAD_G: tl.constexpr):
    """Routing metadata of an M-tile's rows: (flat pair, token, GATE[pair]) as int64, int64, fp32."""
    pair = tl.load(ORDER + rows, mask=rmask, other=0).to(tl.int64)
    tok = tl.load(TOK + rows, mask=rmask, other=0).to(tl.int64)
    if LOAD_G:
        g = tl.load(GATE + pair, mask=rmask, other=0.0).to(tl.float32)
    else:
        g = rmask.to(tl.float32)  # unused
    return pair, tok, g


@triton.jit
def _down_tma_kernel(
    A_desc, W_desc, ORDER, TOK, GATE, OFFS, TILES, OUT, stride_o, C, stride_c, N, Ein, Dout, num_n,
    SCALE: tl.constexpr, ATOMIC: tl.constexpr, RANK1: tl.constexpr, W_KROWS: tl.constexpr, PREC: tl.constexpr,
    SCHED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NP2: tl.constexpr,
):
    """`_down_kernel` with both operands fetched by the bulk-copy engine (TMA): A's tile is the contiguous
    sorted rows row0:row0 + BM (rows past the expert's end are fetched too and masked at the store), and
    W[e] comes from a 2-D view of all experts' weights ([N*Ein, Dout] when W_KROWS, else [Dout, N*Ein]).
    No per-thread addresses in the main loop; the launcher uses it only when Ein is a multiple of BK."""
    e, pid_n, row0, rows, rmask, live = _grid_tile(OFFS, TILES, num_n, N, BM, NP2, SCHED)
    if live:
        pair, tok, g = _down_rows(ORDER, TOK, GATE, rows, rmask, SCALE or RANK1)
        n0 = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, Ein, BK):
            a = A_desc.load([row0, k0])
            acc = tl.dot(a, _expert_tile(W_desc, e * Ein + k0, n0, W_KROWS), acc, input_precision=PREC)
        cols = n0 + tl.arange(0, BN)
        _down_store(acc, OUT, stride_o, C, stride_c, e, rmask, tok, pair, g, cols, cols < Dout, SCALE, ATOMIC, RANK1)


@triton.jit
def _down_kernel(
    A, stride_a,                 # [M, Ein] grouped rows (a fwd, dh bwd)
    W, stride_we, stride_wk, stride_wn,  # [N, Ein, Dout] (w2 fwd, w1 bwd)
    ORDER, TOK, GATE, OFFS,      # GATE: per flat pair, the scale (SCALE) or the rank-1 coefficient (RANK1)
    TILES,                       # SCHED: the M-tile schedule (common._grid_tile)
    OUT, stride_o,               # ATOMIC: [T, Dout] (zeroed), else [T*K, Dout] indexed by flat pair
    C, stride_c,                 # RANK1: [N, Dout]
    N, Ein, Dout, num_n,
    SCALE: tl.constexpr, ATOMIC: tl.constexpr, RANK1: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    PREC: tl.constexpr, SCHED: tl.constexpr, ROWLOOP: tl.constexpr, STAGED: tl.constexpr, SPLIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr, BE2: tl.constexpr, NP2: tl.constexpr,
):
    """A program owns an M-tile and BN output columns, or with ROWLOOP all Dout columns in BN steps
    (the A tile is then fetched from L2 once and re-read from L1, and the routing metadata once), or with
    STAGED all Dout columns from A rows loaded once (module docstring; Ein as BE + BE2 columns)."""
    e, pid_n, row0, rows, rmask, live = _grid_tile(OFFS, TILES, num_n, N, BM, NP2, SCHED)
    if live:
        rows64 = rows.to(tl.int64)
        pair, tok, g = _down_rows(ORDER, TOK, GATE, rows, rmask, SCALE or RANK1)
        we = W + e.to(tl.int64) * stride_we
        if STAGED:
            fcols = tl.arange(0, BE)
            fmask = fcols < Ein
            fcols2 = BE + tl.arange(0, BE2)
            fmask2 = fcols2 < Ein
            ap = A + rows64[:, None] * stride_a
            a_tile = tl.load(ap + fcols[None, :], mask=rmask[:, None] & fmask[None, :], other=0.0)
            a_tile2 = a_tile
            if SPLIT:
                a_tile2 = tl.load(ap + fcols2[None, :], mask=rmask[:, None] & fmask2[None, :], other=0.0)
            _staged_blocks(a_tile, a_tile2, we, stride_wk, stride_wn, fcols, fmask, fcols2, fmask2, OUT, stride_o, C,
                           stride_c, e, rmask, tok, pair, g, Dout, None, None, 0, SPLIT, SCALE, ATOMIC, RANK1, False,
                           True, PREC, BN, BE)
        elif ROWLOOP:
            for n0 in range(0, Dout, BN):
                _down_cols(A, stride_a, we, stride_wk, stride_wn, OUT, stride_o, C, stride_c, e, rows64, rmask, tok,
                           pair, g, n0, Ein, Dout, SCALE, ATOMIC, RANK1, EVEN_K, EVEN_N, PREC, BM, BN, BK)
        else:
            _down_cols(A, stride_a, we, stride_wk, stride_wn, OUT, stride_o, C, stride_c, e, rows64, rmask, tok,
                       pair, g, pid_n * BN, Ein, Dout, SCALE, ATOMIC, RANK1, EVEN_K, EVEN_N, PREC, BM, BN, BK)
