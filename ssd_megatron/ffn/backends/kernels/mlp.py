"""The fused expert MLP forward: up GEMM, activation and down GEMM of one M-tile in one program.

Per M-tile (BM sorted rows of one expert e): h = X[token] @ W1[e]^T over all of the expert's E (GLU: 2E)
columns at once, the up kernel's epilogue (bias, activation; h stored when the backward needs it), then,
for each block of BN output columns, a @ W2[e][:, block] with the down kernel's epilogue (gate scale,
atomic add into y or a store of the (t, k) row). `a` stays on chip: no [T*K, E] round trip through
memory, no second launch, and none of the down kernel's re-reads of an a-tile per output column block.
E is covered by a power-of-two tile of BE columns plus, with SPLIT, a second one of BE2 (E = 192 as
128 + 64, where one 256-wide tile would multiply 64 masked columns in both GEMMs); the rest is masked.
y must hold its initial value (the output bias or zeros) before the launch: the routing plan's kernels
set it (`routing_plan`'s fill).

WTMA (mlp variant 3, `mlp_launch.mlp_forward`): both weights' tiles come from TMA descriptors instead of
per-thread pointer loads (the gathered x rows stay pointer loads), where the layouts allow it, the
activation has no gate, and E is exactly the one or two power-of-two tiles (the descriptors cannot mask
the next expert's rows).
"""
import triton
import triton.language as tl

from .common import _grid_tile
from .down import _down_rows, _staged_blocks
from .up import _gather_gemm, _up_act


@triton.jit
def _mlp_kernel(
    X, stride_x,                             # [T, D] tokens
    W1, stride_w1e, stride_w1f, stride_w1k,  # [N, F1, D]
    B1, stride_b1e,                          # [N, F1]
    W2, stride_w2e, stride_w2k, stride_w2n,  # [N, E, Dout]
    TOK, ORDER, GATE, OFFS, TILES,           # plan; TILES: the M-tile schedule (common._grid_tile)
    H, stride_h,                             # SAVE_H: [M, F1] pre-activation, for the backward
    OUT, stride_o,                           # ATOMIC: y [T, Dout], initialised; else [T*K, Dout] by pair
    W1D, W1D2, W2D, W2D2,                    # WTMA: TMA descriptors of W1 and W2 (module docstring)
    N, D, E, Dout,
    ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_H: tl.constexpr, ATOMIC: tl.constexpr,
    EVEN_K: tl.constexpr, PREC: tl.constexpr, SCHED: tl.constexpr, SPLIT: tl.constexpr, WTMA: tl.constexpr,
    W1_RC: tl.constexpr, W2_RC: tl.constexpr,
    BM: tl.constexpr, BE: tl.constexpr, BE2: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, NP2: tl.constexpr,
):
    e, _, row0, rows, rmask, live = _grid_tile(OFFS, TILES, 1, N, BM, NP2, SCHED)
    if live:
        pair, tok, g = _down_rows(ORDER, TOK, GATE, rows, rmask, True)
        fcols = tl.arange(0, BE)
        fmask = fcols < E
        fcols2 = BE + tl.arange(0, BE2)
        fmask2 = fcols2 < E
        acc, acc2, accb, accb2 = _gather_gemm(X, stride_x, tok, W1, stride_w1e, stride_w1f, stride_w1k, e, fcols,
                                              fmask, fcols2, fmask2, D, E, W1D, W1D2, e * (stride_w1e // stride_w1f),
                                              GLU, SPLIT, EVEN_K, False, WTMA, W1_RC, PREC, BM, BE, BE2, BK)
        dt = X.dtype.element_ty
        hp = H + rows.to(tl.int64)[:, None] * stride_h
        act = _up_act(acc, acc2, e, fcols, fmask, B1, stride_b1e, E, dt, hp + fcols[None, :],
                      rmask[:, None] & fmask[None, :], ACT, GLU, HAS_BIAS, SAVE_H)
        # masked columns (E..) multiply W2 rows loaded as zeros, whatever act(0) is
        a_tile = act.to(dt)
        if SPLIT:
            act2 = _up_act(accb, accb2, e, fcols2, fmask2, B1, stride_b1e, E, dt, hp + fcols2[None, :],
                           rmask[:, None] & fmask2[None, :], ACT, GLU, HAS_BIAS, SAVE_H)
            a_tile2 = act2.to(dt)
        else:
            a_tile2 = a_tile
        _staged_blocks(a_tile, a_tile2, W2 + e.to(tl.int64) * stride_w2e, stride_w2k, stride_w2n, fcols, fmask,
                       fcols2, fmask2, OUT, stride_o, OUT, 0, e, rmask, tok, pair, g, Dout, W2D, W2D2, e * E, SPLIT,
                       True, ATOMIC, False, WTMA, W2_RC, PREC, BN, BE)
