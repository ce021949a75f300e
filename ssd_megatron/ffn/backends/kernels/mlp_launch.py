"""Launches of the fused forward (kernels/mlp.py, kernels/mlp_gluon.py): up, activation and down per M-tile, the
activations kept on chip, combined into the tokens' outputs as down_launch's are."""
from __future__ import annotations

import torch
import triton

from . import descriptors, tile_configs, tile_order
from .auto_ws import auto_mlp_ws
from .common import ACT_CODES, np2, prec
from .down_launch import combine_target, combined_output
from .mlp import _mlp_kernel
from .tile_configs import TMA, WS, split_width, ws_boxes
from .tile_order import tile_groups, tile_list, wide_group


def _mlp_descriptors(w1, w2, BN, BK, be, be2):
    """(W1 and its second tile, W1's RC, W2 and its second tile, W2's RC) TMA descriptors for the fused forward
    (variant TMA, kernels/mlp.py; `descriptors.expert_descriptors`), or None where they cannot serve: E must be
    exactly the one or two column tiles (be + be2), so that no box reaches into the next expert's rows, and w1
    without a gate half (F1 = E)."""
    if be + be2 != w2.shape[1] or w1.shape[1] != w2.shape[1]:
        return None
    boxes = (be, be2 or be)
    up, down = descriptors.expert_descriptors(w1, boxes, BK), descriptors.expert_descriptors(w2, boxes, BN)
    return None if up is None or down is None else up + down


def mlp_forward(x, w1, b1, w2, plan, gate_flat, activation, save_h: bool, combine: str, out=None, out_bias=None):
    """(y, h when save_h): up GEMM, activation and down GEMM fused per M-tile (`kernels/mlp.py`), the same
    function as up_forward + down_scatter. `out`/`out_bias` as down_scatter's (`out`: initialised by the
    routing plan's fill)."""
    act, glu = ACT_CODES[activation]
    M, N, T, K = plan.num_rows, plan.num_experts, plan.num_tokens, plan.top_k
    F1, D = w1.shape[1], w1.shape[2]
    E, Dout = w2.shape[1], w2.shape[2]
    buf, atomic, init = combine_target(x, plan, Dout, combine, out, out_bias)
    h = torch.empty(M, F1, device=x.device, dtype=x.dtype) if save_h else buf
    bias = b1 if b1 is not None else buf
    be, be2 = split_width(E)
    wb = ws_boxes(E)  # the Gluon kernel's boxes (8B's E = 256 as 128 + 128: at most 128 columns each)
    order = None if glu else wide_group(Dout, x)

    def eager_key():  # `auto_mlp_ws`'s cheap key of this launch (shapes), built only where `auto` consults it
        return x.device, x.dtype, tuple(x.shape), M, tuple(w1.shape), tuple(w2.shape), act, atomic, save_h

    def ws_key(cfg):  # kernels/gluon_launches.key of this launch with tile `cfg`
        from . import gluon_launches
        return gluon_launches.key((x, w1, b1, w2, plan.offsets, plan.order, plan.token, gate_flat,
                                   h if save_h else None, buf), act, atomic, tile_groups(order), cfg)

    def launch(cfg):
        BM, BN, BK, nw, ns = cfg[:5]
        if init:
            init()
        if cfg[5:] == (WS,):  # the Gluon kernel where it serves (kernels/mlp_gluon.py), else the pointer loads
            from . import gluon_launches, mlp_gluon
            if mlp_gluon.serves(x, w1, w2, act, glu, BM, BN, BK, nw, ns, *wb):  # (nw: the weight ring's depth)
                tiles = tile_list(plan, BM, tile_groups(order))
                mlp_gluon.launch(x, w1, b1, w2, tiles, plan.offsets, plan.order, plan.token, gate_flat,
                                 h if save_h else None, buf, act, atomic, BM, BN, BK, nw, ns, *wb)
                gluon_launches.note(ws_key(cfg), eager_key(), x)
                return
        descs = _mlp_descriptors(w1, w2, BN, BK, be, be2) if cfg[5:] == (TMA,) and descriptors.hopper(x) else None
        tiles, sched = tile_order.schedule(plan, BM, order)
        _mlp_kernel[(triton.cdiv(M, BM) + N,)](
            x, x.stride(0), w1, w1.stride(0), w1.stride(1), w1.stride(2), bias, bias.stride(0),
            w2, w2.stride(0), w2.stride(1), w2.stride(2), plan.token, plan.order, gate_flat, plan.offsets, tiles,
            h, h.stride(0), buf, buf.stride(0), *(descs[:2] + descs[3:5] if descs else (None,) * 4), N, D, E, Dout,
            ACT=act, GLU=glu, HAS_BIAS=b1 is not None, SAVE_H=save_h, ATOMIC=atomic, EVEN_K=D % BK == 0,
            PREC=prec(x), SCHED=sched, SPLIT=be2 > 0, WTMA=descs is not None, W1_RC=bool(descs and descs[2]),
            W2_RC=bool(descs and descs[5]),
            BM=BM, BE=be, BE2=max(be2, 16), BK=BK, BN=BN, NP2=np2(N), num_warps=nw, num_stages=ns)

    config_kind = "mlp_glu" if glu else "mlp"
    launch(tile_configs.pick_tile(config_kind, (D, E, Dout, str(x.dtype)), launch, descriptors.hopper(x),
                                  auto=lambda: auto_mlp_ws(x, w1, w2, act, glu, *wb, eager_key, ws_key)))
    return combined_output(buf, atomic, T, K, x.dtype, out_bias), (h if save_h else None)
