"""Launches of the down GEMM (kernels/down.py, kernels/down_gluon.py): each sorted row's product with its expert's
weights, scattered to its token and combined over the token's K rows (a buffer summed after, or atomic adds)."""
from __future__ import annotations

import functools

import torch
import triton

from ..routing import initialise
from . import descriptors, tile_configs, tile_order
from .auto_ws import auto_down_ws
from .common import np2, prec
from .down import _down_kernel, _down_tma_kernel
from .tile_configs import ROWLOOP, STAGED, TMA, WS, WS_PAIR, split_width
from .tile_order import tile_list, wide_group, ws_down_group


def _down_descriptors(a, w, BM, BN, BK):
    """(A, W, W's RC) TMA descriptors for `_down_tma_kernel`, or None where the layouts do not allow one: rows
    of `a` contiguous, and all experts' W as one 2-D matrix (`descriptors.expert_descriptors`). Dynamo cannot
    trace these host-side descriptors (torch 2.11), one reason the backend is an opaque custom op."""
    wd = descriptors.expert_descriptors(w, (BK,), BN)
    ad = descriptors.tma_descriptors(a, ([BM, BK],)) if a.shape[1] == w.shape[1] else None
    return None if wd is None or ad is None else (ad[0], wd[0], wd[1])


def default_combine(x: torch.Tensor) -> str:
    """down_scatter's combine for tokens `x`: "buffer" (deterministic) under torch's deterministic algorithms;
    else atomic adds into the output in its own dtype ("atomic16", fastest measured on an H100/H200), except
    bf16 before Hopper, whose atomic adds would be compare-and-swap loops: fp32 ones there ("atomic32",
    native reductions on sm_80; the compiled SASS in docs/kernels.md)."""
    if torch.are_deterministic_algorithms_enabled():
        return "buffer"
    return "atomic32" if x.dtype == torch.bfloat16 and not descriptors.hopper(x) else "atomic16"


def _adds(combine: str, K: int) -> bool:
    """Whether a down (or fused) launch adds each token's K rows into a [T, Dout] target with atomics
    (else it writes every (t, k) row: "buffer", or K = 1)."""
    return combine != "buffer" and K > 1


def atomic_output(a_like: torch.Tensor, T: int, K: int, Dout: int, combine: str):
    """The [T, Dout] tensor a down (or fused) launch with `combine` adds its rows into (fp32 for "atomic32"),
    to be initialised by a launch before it (`up_launch._launch_up`'s or the routing plan's fill), or None where
    that launch writes rows instead (`_adds`)."""
    if not _adds(combine, K):
        return None
    dtype = torch.float32 if combine == "atomic32" else a_like.dtype
    return torch.empty(T, Dout, device=a_like.device, dtype=dtype)


def combine_target(a_like, plan, Dout: int, combine: str, out, out_bias):
    """(what a down or fused launch writes, whether it adds atomically, a call to make before every launch
    or None). The atomic target is `out` when an earlier launch's fill initialised it, else allocated here;
    the call initialises it to out_bias (or zeros), except for the first launch into a given `out` (the
    tuner's repeated launches are all re-initialised). Otherwise a [T*K, Dout] buffer of (t, k) rows."""
    M, T, K = plan.num_rows, plan.num_tokens, plan.top_k
    if not _adds(combine, K):
        if out is not None:
            raise ValueError("`out` is the atomic combines' target (atomic_output), not the buffer's")
        return a_like.new_empty(M, Dout), False, None
    buf = out if out is not None else atomic_output(a_like, T, K, Dout, combine)
    fresh = out is not None

    def init():
        nonlocal fresh
        if not fresh:
            initialise(buf, out_bias)
        fresh = False
    return buf, True, init


def down_scatter(a, w, plan, gate_flat, combine="buffer", rank1=None, out=None, out_bias=None, view="fallback"):
    """y [T, Dout] = out_bias + sum over k of (gate *) a[sorted row of (t, k)] @ w[expert of (t, k)].

    combine: "buffer" scatters each (t, k) row to a [T*K, Dout] buffer, then sums over k (deterministic);
    "atomic32"/"atomic16" add the rows into an fp32 / storage-dtype [T, Dout] output in place, which starts
    as out_bias (or zeros). `out`: that output (`atomic_output`) already initialised so by the up launch;
    else it is allocated and filled here, before every launch (the tuner's repeated launches included).
    rank1 = (coef [T*K] fp32 by flat pair, c [N, Dout]): each (t, k) row also gets coef * c[expert]
    (without a gate scale). view: where the config is the warp-specialised kernel (WS, WS_PAIR) and W is not
    row-major (W_out's column view, `weights.expert_views`), "fallback" runs the Triton kernel instead, "copy" gives
    the WS kernel a row-major copy of W (made once per call, docs/kernels.md v48), "tma" lets it read the view in
    place (`down_gluon.serves`, v49).
    """
    M, N, T, K = plan.num_rows, plan.num_experts, plan.num_tokens, plan.top_k
    Ein, Dout = w.shape[1], w.shape[2]
    buf, atomic, init = combine_target(a, plan, Dout, combine, out, out_bias)
    if rank1 is not None and gate_flat is not None:
        raise ValueError("down_scatter: rank1 goes with an unscaled product (gate_flat=None)")
    gate = gate_flat if gate_flat is not None else (rank1[0] if rank1 is not None else buf)
    c = rank1[1].to(a.dtype).contiguous() if rank1 is not None else buf
    w_ws = functools.cache(lambda: w.contiguous() if view == "copy" else w)  # one copy for all the tuner's configs

    def launch(cfg):
        BM, BN, BK, nw, ns = cfg[:5]
        variant = cfg[5] if len(cfg) > 5 else 0
        if init:
            init()
        operands = (a, a.stride(0), w, w.stride(0), w.stride(1), w.stride(2))
        tiles, sched = tile_order.schedule(plan, BM)
        rest = (plan.order, plan.token, gate, plan.offsets, tiles, buf, buf.stride(0), c, c.stride(0), N, Ein, Dout)
        meta = dict(SCALE=gate_flat is not None, ATOMIC=atomic, RANK1=rank1 is not None, PREC=prec(a), SCHED=sched,
                    BM=BM, BN=BN, BK=BK, NP2=np2(N), num_warps=nw, num_stages=ns)
        m_tiles = triton.cdiv(M, BM) + N
        num_n = triton.cdiv(Dout, BN)
        if variant in (WS, WS_PAIR):  # the Gluon kernel where it serves (kernels/down_gluon.py), else STAGED
            from . import down_gluon
            if down_gluon.serves(a, w, BM, BN, ns, view, adds=atomic):
                pair = variant == WS_PAIR
                ws_tiles = tile_list(plan, 2 * BM if pair else BM, ws_down_group(wide_group(Dout, a)))
                down_gluon.launch(a, w_ws(), ws_tiles, plan.offsets, plan.order, plan.token, gate, buf,
                                  c, M, gate_flat is not None, atomic, rank1 is not None, BM, BN, ns, pair=pair)
                return
            variant = STAGED
        tma = variant == TMA and Ein % BK == 0 and descriptors.hopper(a)
        descs = _down_descriptors(a, w, BM, BN, BK) if tma else None
        if descs is not None:
            _down_tma_kernel[(m_tiles * num_n,)](*descs[:2], *rest, num_n, W_KROWS=descs[2], **meta)
            return
        num_n = 1 if variant in (ROWLOOP, STAGED) else num_n
        # STAGED's reduction tiles; fixed for the other variants, which do not read them (no extra compiles)
        be, be2 = split_width(Ein) if variant == STAGED else (16, 0)
        _down_kernel[(m_tiles * num_n,)](*operands, *rest, num_n, EVEN_K=Ein % BK == 0, EVEN_N=Dout % BN == 0,
                                         ROWLOOP=variant == ROWLOOP, STAGED=variant == STAGED, SPLIT=be2 > 0, BE=be,
                                         BE2=max(be2, 16), **meta)

    # (`auto` positional: tests stand in for pick_tile with *more)
    launch(tile_configs.pick_tile(f"down:{combine}", (Ein, Dout, str(a.dtype)), launch, descriptors.hopper(a),
                                  lambda: auto_down_ws(a, w, atomic, view)))
    return combined_output(buf, atomic, T, K, a.dtype, out_bias)


def combined_output(buf, atomic: bool, T: int, K: int, dtype, out_bias):
    """y from the down (or fused) launch's target: the atomic sums in `dtype`, or the (t, k) rows summed
    over k, plus the output bias (an atomic target started from it)."""
    if atomic:
        return buf.to(dtype)
    y = buf if K == 1 else buf.view(T, K, -1).sum(1)
    return y if out_bias is None else y.add_(out_bias.to(y.dtype))
