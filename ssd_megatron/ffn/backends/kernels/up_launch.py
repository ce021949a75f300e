"""Launches of the up GEMM (kernels/up.py): the forward's gathered x @ W1^T with its bias and activation, and the
backward's dy @ W2^T with its epilogue (dh, the gate gradient, gate * a, db1); the Gluon up_bwd
(kernels/up_bwd_gluon.py) where `auto` takes it."""
from __future__ import annotations

import torch
import triton

from . import descriptors, tile_configs, tile_order
from .auto_ws import auto_up_bwd_ws
from .common import ACT_CODES, fill_args, np2, prec
from .switches import up_bwd_tma_stores
from .tile_configs import EPILOGUE_TILE, TWO_PASS, WS, default_tile, split_width, ws_boxes
from .tile_order import tile_list
from .up import _up_kernel


def up_columns(E: int, BN: int):
    """(BN, BN2, column blocks per M-tile, rows of up_bwd's dgate partials) of an up launch whose config asks
    for BN columns: a BN >= E makes each program cover all E columns, as one or two power-of-two tiles
    (192 = 128 + 64, `split_width`), so the gathered rows are read once and no masked column is multiplied."""
    if BN >= E:
        bn, bn2 = split_width(E)
        return bn, bn2, 1, 2 if bn2 else 1
    return BN, 0, triton.cdiv(E, BN), triton.cdiv(E, BN)


def _launch_up(head, tail, plan, meta, cfg, M, N, Din, E, fill=None):
    """One `_up_kernel` launch: a program per (M-tile, column block); `head` and `tail` are the kernel's
    arguments before and after TILES (head[0]: the gathered [T, Din] operand, or da for meta's PASS 2;
    kernels/up.py). fill = (out, row or None):
    the programs also initialise the contiguous `out` ([T, Dout], the next down launch's atomic target)
    to `row` broadcast over its rows, or to zeros."""
    BM, BN, BK, nw, ns = cfg[:5]
    bn, bn2, num_n, _ = up_columns(E, BN)
    tiles, sched = tile_order.schedule(plan, BM)
    programs = (triton.cdiv(M, BM) + N) * num_n
    fills, fill_meta = fill_args(fill, programs, head[0])
    descs = None  # a seventh config entry of 1: W's tiles by TMA (kernels/up.py `_gather_gemm`, WTMA)
    if meta["PASS"] != 2 and descriptors.operand_tma(cfg, head[2]):
        descs = descriptors.expert_descriptors(head[2], (bn, max(bn2, 16)), BK)
    _up_kernel[(programs,)](
        *head, tiles, *tail, *fills, *(descs[:2] if descs else (None, None)), N, M, Din, E, num_n,
        WTMA=descs is not None, W_RC=bool(descs and descs[2]), EVEN_K=Din % BK == 0, EVEN_N=bn2 > 0 or E % bn == 0,
        SCHED=sched, SPLIT=bn2 > 0, BM=BM, BN=bn, BN2=max(bn2, 16), BK=BK, NP2=np2(N), num_warps=nw, num_stages=ns,
        **fill_meta, **meta)


def up_forward(x, w1, b1, plan, activation, save_h: bool, fill=None):
    """a [M, E] (and h [M, F1] when save_h) for the sorted rows; `fill` as `_launch_up`'s."""
    act, glu = ACT_CODES[activation]
    M, N = plan.num_rows, plan.num_experts
    F1, D = w1.shape[1], w1.shape[2]
    E = F1 // 2 if glu else F1
    a = torch.empty(M, E, device=x.device, dtype=x.dtype)
    h = torch.empty(M, F1, device=x.device, dtype=x.dtype) if save_h else a
    bias = b1 if b1 is not None else a
    head = (x, x.stride(0), w1, w1.stride(0), w1.stride(1), w1.stride(2), bias, bias.stride(0),
            plan.token, plan.order, a, plan.offsets)
    tail = (h, h.stride(0), a, a.stride(0), a, a, 0, a, 0)
    meta = dict(BWD=False, ACT=act, GLU=glu, HAS_BIAS=b1 is not None, SAVE_H=save_h, STORE_GA=False, HAS_DB=False,
                PREC=prec(x), PASS=0)

    def launch(cfg):
        _launch_up(head, tail, plan, meta, cfg, M, N, D, E, fill)

    launch(tile_configs.pick_tile("up_glu" if glu else "up", (D, E, str(x.dtype)), launch, descriptors.hopper(x)))
    return a, (h if save_h else None)


def up_backward(dy, w2, h, gate_flat, plan, activation, need_ga: bool, need_db: bool, fill=None,
                partials: bool = False):
    """dh [M, F1], the per-pair gate gradient [T*K] (fp32; with `partials`, its [P, T*K] per-column-block
    partials unsummed), ga = gate*a [M, E], db1 [N, F1] (fp32); `fill` as `_launch_up`'s."""
    act, glu = ACT_CODES[activation]
    M, N = plan.num_rows, plan.num_experts
    E, D = w2.shape[1], w2.shape[2]
    F1 = h.shape[1]
    dh = torch.empty(M, F1, device=dy.device, dtype=dy.dtype)
    ga = torch.empty(M, E, device=dy.device, dtype=dy.dtype) if need_ga else dh
    db = torch.empty(N, F1, device=dy.device, dtype=torch.float32) if need_db else dh
    meta = dict(BWD=True, ACT=act, GLU=glu, HAS_BIAS=False, SAVE_H=False, STORE_GA=need_ga, HAS_DB=need_db,
                PREC=prec(dy))
    state = {}

    def eager_key():  # `auto_up_bwd_ws`'s cheap key of this launch (shapes, outputs, the store switch)
        return (dy.device, dy.dtype, tuple(dy.shape), M, tuple(w2.shape), w2.stride(), act, need_ga, need_db,
                fill is not None, up_bwd_tma_stores())

    def ws_key(cfg):  # kernels/gluon_launches.key of this launch with tile `cfg`
        from . import gluon_launches
        return gluon_launches.key((dy, w2, h, plan.offsets, plan.order, plan.token, gate_flat,
                                   fill[0] if fill is not None else None), act, need_ga, need_db, cfg,
                                  up_bwd_tma_stores())

    def launch(cfg):
        if cfg[5:] == (WS,):  # the Gluon kernel where it serves (kernels/up_bwd_gluon.py), else kernels/up.py's default
            state["dgp"] = _up_bwd_ws(dy, w2, h, gate_flat, plan, act, glu, dh, ga if need_ga else None,
                                      db if need_db else None, fill, cfg)
            if state["dgp"] is not None:
                from . import gluon_launches
                gluon_launches.note(ws_key(cfg), eager_key(), dy)
                return
            cfg = default_tile("up_bwd_glu" if glu else "up_bwd", (D, E, str(dy.dtype)), descriptors.hopper(dy))
        two = len(cfg) > 5 and cfg[5] == TWO_PASS
        dgp = torch.empty(up_columns(E, (EPILOGUE_TILE if two else cfg)[1])[3], M, device=dy.device,
                          dtype=torch.float32)
        if need_db:
            db.zero_()
        head = (dy, dy.stride(0), w2, w2.stride(0), w2.stride(1), w2.stride(2), dh, 0,
                plan.token, plan.order, gate_flat, plan.offsets)
        tail = (h, h.stride(0), dh, dh.stride(0), dgp, ga, ga.stride(0), db, db.stride(0))
        if two:  # the GEMM into da, then the epilogue from da (kernels/up.py)
            da = torch.empty(M, E, device=dy.device, dtype=dy.dtype)
            _launch_up(head, (h, 0, da, da.stride(0)) + tail[4:], plan, dict(meta, PASS=1), cfg, M, N, D, E, fill)
            _launch_up((da, da.stride(0)) + head[2:], tail, plan, dict(meta, PASS=2), EPILOGUE_TILE, M, N, D, E)
        else:
            _launch_up(head, tail, plan, dict(meta, PASS=0), cfg, M, N, D, E, fill)
        state["dgp"] = dgp

    config_kind = "up_bwd_glu" if glu else "up_bwd"
    launch(tile_configs.pick_tile(config_kind, (D, E, str(dy.dtype)), launch, descriptors.hopper(dy),
                                  auto=lambda: auto_up_bwd_ws(dy, w2, act, glu, eager_key, ws_key)))
    dgate = state["dgp"] if partials else state["dgp"].sum(0)
    return dh, dgate, (ga if need_ga else None), (db if need_db else None)


def _up_bwd_ws(dy, w2, h, gate_flat, plan, act: int, glu: bool, dh, ga, db, fill, cfg):
    """up_bwd variant 5 (WS: kernels/up_bwd_gluon.py) where it serves (`fill` only with zeros): the kernel writes dh,
    ga and db (when not None); returns the gate gradient's one row of partials [1, M], else None."""
    from . import up_bwd_gluon

    BM, _, BK, w_ring, ring = cfg[:5]
    be, be2 = ws_boxes(w2.shape[1])  # (8B's E = 256 as 128 + 128: boxes of at most 128 columns)
    zeros = fill[0] if fill is not None and fill[1] is None else None
    if (fill is not None and zeros is None) or not up_bwd_gluon.serves(dy, w2, h, act, glu, zeros, BM, BK, w_ring,
                                                                       ring, be, be2):
        return None
    dgp = torch.empty(1, plan.num_rows, device=dy.device, dtype=torch.float32)
    if db is not None:
        db.zero_()
    up_bwd_gluon.launch(dy, w2, h, tile_list(plan, BM, None), plan.offsets, plan.order, plan.token, gate_flat, dh, ga,
                        dgp, db, zeros, act, BM, BK, w_ring, ring, be, be2, up_bwd_tma_stores())
    return dgp
