"""Launches of the grouped weight gradients (kernels/wgrad.py, kernels/wgrad_gluon.py): dW[e] = sum over expert e's
rows of L^T R, with the router's term folded in where asked."""
from __future__ import annotations

import functools

import torch
import triton

from . import descriptors, tile_configs
from .auto_ws import auto_wgrad_ws, ws_reduces
from .common import np2, prec
from .switches import half_sums, reduces_allowed, router_sums, sums_dtype
from .tile_configs import WS, split_width, ws_boxes
from .wgrad import FOLD_CODES, _wgrad_kernel


def _zeroed(dw: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The zeroed target of a weight gradient's partial sums in `dtype`: dW itself when of that dtype, else a buffer
    with dW's strides, so that its copy into a strided dW (W_out's [N, E, D] view) is one dense, vectorised pass,
    not an elementwise one (40 us of the GPT-base layer in bf16, v15)."""
    out = dw if dw.dtype == dtype else torch.empty_strided(dw.shape, dw.stride(), device=dw.device, dtype=dtype)
    return out.zero_()


def _wgrad_ws(lhs, rhs, plan, dw, fold_kind, coef, fold_p: int, ch: int, BQ: int, BK: int, l_stages: int,
              r_stages: int, state: dict) -> bool:
    """The warp-specialised Gluon wgrad (kernels/wgrad_gluon.py), if it serves; True if launched. With ch > 0 its
    balanced items (equal row segments of at least ch rows) add into a zeroed dW (by TMA reduces in `sums_dtype`,
    else by fp32 atomics: dW itself when of that dtype, else a buffer with its strides, copied by the caller);
    else each expert's rows per program, stored into dW."""
    from . import score_grad, wgrad_gluon
    be, be2 = ws_boxes(lhs.shape[1])

    def tile(target, fold):
        return lhs, rhs, target, fold, ch > 0, BQ, BK, l_stages, r_stages, be, be2

    # a "pairs" term summed in the kernel (FOLD 3) where that fits, else added per expert (FOLD 2)
    for kind in ((fold_kind, "expert") if fold_kind == "pairs" else (fold_kind,)):
        fold = FOLD_CODES[kind]
        sums = sums_dtype(dw) if ch else dw.dtype
        # the balanced items' adds as TMA reduces where allowed and dW's layout and shared memory serve
        tma_out = ch > 0 and reduces_allowed() and ws_reduces(dw, tile(sums, fold))
        if ch and not tma_out:
            sums = torch.float32  # (relaxed atomics add in fp32)
        if tma_out or wgrad_gluon.serves(*tile(sums, fold)):
            break
    else:
        return False
    extra = {}
    if kind == "pairs":
        dgate, scale, _ = coef
        extra = dict(rows=score_grad.row_matrix(dgate, plan.order, lhs.dtype), scale=scale)
        coef = lhs  # (FOLD 3 reads no COEF)
    elif fold_kind == "pairs":
        coef = coef[2]()
    out = _zeroed(dw, sums) if ch else dw
    wgrad_gluon.launch(lhs, rhs, plan.offsets, plan.token, coef, fold_p, out, fold, ch, BK, l_stages, r_stages, be,
                       be2, tma_out, **extra)
    state["out"] = out
    return True


def expert_fold(fold):
    """`wgrad`'s fold with a "pairs" term as ("expert", that term by torch, p), for the kernels that add the router's
    term per expert (kernels/wgrad.py, torch's GEMMs); other folds as they are."""
    if fold is None or fold[0] != "pairs":
        return fold
    return "expert", fold[1][2](), fold[2]


def wgrad(lhs, rhs, plan, like, gathered: bool, split: bool = True, fold=None):
    """dW [N, P, Q] = per expert lhs_rows^T @ rhs_rows; rhs rows are rhs[token[r]] when `gathered`
    is False (the kernel gathers), else rhs is already in sorted-row order. dW gets the strides of the
    weight `like` (e.g. the [N, E, D] view of W_out's columns): its grad then flows back without a copy.
    dW's dtype is `like`'s (the fp32 master weight's under autocast: no rounding to bf16 and no cast after).
    split: let the config's row chunks (6th entry, 0 = none) split each expert's reduction, summed by fp32
    atomics (not bitwise reproducible: callers pass False under deterministic algorithms), into dW itself when
    it is fp32, else into an fp32 buffer copied to dW (the Gluon kernel's TMA reduces: into a bf16/fp16 dW itself,
    `sums_dtype`). A 7th config entry of 1 loads lhs by TMA (kernels/wgrad.py).
    fold = ("rows", coef [M] fp32 per sorted row, p): lhs rows get coef added to their first p columns as
    loaded; ("expert", v [N, Q] fp32, p): dW[e, :p] += v[e] in the epilogue; ("pairs", (g, scale, term), p): the
    same with v = scale * sum over e's rows r of g[order[r]] * rhs's row, g [T * K] fp32 by flat pair (dS's
    entries, rounded to lhs's dtype): the Gluon kernel sums it itself where it serves (kernels/wgrad_gluon.py's
    FOLD 3, from kernels/score_grad.row_matrix), the others add term() ([N, Q] fp32, torch's) per expert."""
    N = plan.num_experts
    P, Q = lhs.shape[1], rhs.shape[1]
    dw = torch.empty_strided(like.shape, like.stride(), device=lhs.device, dtype=like.dtype)
    if fold is not None and fold[0] == "pairs":  # term() at most once (tuning launches each candidate)
        fold = ("pairs", fold[1][:2] + (functools.lru_cache(None)(fold[1][2]),), fold[2])
        fold = fold if router_sums() else expert_fold(fold)
    fold_kind, coef, fold_p = fold if fold is not None else (None, lhs, 0)
    state = {}

    def eager_key():  # `auto_wgrad_ws`'s cheap key of this launch (shapes and the switches that pick the kernel's
        # specialisation: an A/B arm that flips one needs its own eager launch to load that module), built only where
        # `auto` consults it
        return (lhs.device, lhs.dtype, tuple(lhs.shape), tuple(rhs.shape), tuple(dw.shape), dw.stride(), dw.dtype,
                fold_kind, reduces_allowed(), half_sums())

    def ws_key(cfg):  # kernels/gluon_launches.key of this launch with tile `cfg`
        from . import gluon_launches
        return gluon_launches.key((lhs, rhs, plan.offsets, plan.token, coef[0] if fold_kind == "pairs" else coef, dw),
                                  fold_kind, fold_p, split, cfg, reduces_allowed(), half_sums())

    def launch(cfg):
        BP, BQ, BK, nw, ns = cfg[:5]
        ch = cfg[5] if split and len(cfg) > 5 else 0
        if cfg[6:] == (WS,):  # the Gluon kernel where it serves (kernels/wgrad_gluon.py), else LTMA's pointer loads
            if not gathered and _wgrad_ws(lhs, rhs, plan, dw, fold_kind, coef, fold_p, ch, BQ, BK, nw, ns, state):
                from . import gluon_launches
                gluon_launches.note(ws_key(cfg), eager_key(), lhs)
                return
            nw = 4  # (the L ring's depth is no warp count: kernels/wgrad.py's 4, by TMA)
            cfg = cfg[:3] + (nw,) + cfg[4:6] + (1,)
        kind, c, _ = expert_fold((fold_kind, coef, fold_p))
        # a tile as tall as P: all of P per program, as one or two power-of-two tiles (kernels/wgrad.py)
        bp, bp2 = split_width(P) if BP >= P else (BP, 0)
        num_p, num_q = triton.cdiv(P, BP), triton.cdiv(Q, BQ)
        # with chunks, the grid is an upper bound on the (expert, chunk) pairs, as for the M-tiles
        num_t = triton.cdiv(plan.num_rows, ch) + N if ch else N
        out = _zeroed(dw) if ch else dw
        descs = None
        if kind != "rows" and descriptors.operand_tma(cfg, lhs):
            descs = descriptors.tma_descriptors(lhs, ([BK, bp], [BK, max(bp2, 16)]))
        _wgrad_kernel[(num_t * num_p * num_q,)](
            lhs, lhs.stride(0), rhs, rhs.stride(0), plan.token, plan.offsets, c, fold_p,
            out, out.stride(0), out.stride(1), out.stride(2), N, P, Q, num_p, num_q, *(descs or (None, None)),
            GATHER=not gathered, PREC=prec(lhs), SPLIT=bool(ch), FOLD=FOLD_CODES[kind], SPLIT_P=bp2 > 0,
            LTMA=descs is not None, BP=bp, BP2=max(bp2, 16), BQ=BQ, BK=BK, CH=max(ch, BK), NP2=np2(N),
            num_warps=nw, num_stages=ns)
        state["out"] = out

    config_kind = "wgrad" if not gathered else "wgrad_mat"
    launch(tile_configs.pick_tile(config_kind, (P, Q, str(lhs.dtype)), launch, descriptors.hopper(lhs),
                                  auto=lambda: auto_wgrad_ws(lhs, rhs, dw, fold_kind, split, gathered, eager_key,
                                                             ws_key)))
    if state["out"] is not dw:
        dw.copy_(state["out"])
    return dw
