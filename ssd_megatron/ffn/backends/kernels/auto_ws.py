"""`auto`'s choices of the warp-specialised Gluon kernels (kernels/*_gluon.py): for each launch, the tile it takes
where the Gluon kernel serves and was measured to win, else None (the tile configs' defaults serve), with the
measurements behind each choice."""
from __future__ import annotations

import torch

from . import descriptors
from .switches import sums_dtype
from .tile_configs import WS, WS_PAIR, ws_boxes
from .wgrad import FOLD_CODES


# auto's down for a wide atomic combine (8B's dx) where the warp-specialised Gluon kernel serves (Triton >=
# 3.9, sm_90, Ein a power of two <= 256: 8B ReLU). H100, docs/kernels.md v16: the dx launch 2.21 ms with 3.6's
# ROWLOOP default, 2.66 with the same kernel under 3.9 (it spills more), 1.87 with WS at 128 x 64 and two W
# stages (2.22 at 64 x 64 x 3); in the 8B ReLU layer 9.17 / 9.19 ms (3.6) against 8.995 / 8.990 (3.9 + WS).
# WS_PAIR since docs/kernels.md v44 (H100): two consumers on each W tile halve the W tiles read per row; the dx
# launch alone 1.382-1.390 -> 1.344-1.352 ms, the graphed 8B ReLU layer's fwd+bwd 7.259 -> 7.202 ms (means of nine
# A/B rounds, seven won). At base (AUTO_WS_BOXES) it lost: 0.593-0.599 -> 0.621-0.626 ms.
AUTO_WS = (128, 64, 64, 4, 2, WS_PAIR)
# ... and for an atomic combine whose Ein is two TMA boxes (`down_gluon.ein_boxes`: base ReLU's dx, 192 = 128 + 64),
# three W stages. H100, docs/kernels.md v42: the graphed base ReLU layer's fwd+bwd 0.615-0.627 -> 0.592-0.597 ms
# (means 0.620 -> 0.594, -4.1%, five A/B rounds), where it had been the Triton TMA kernel (~119 us, ~245 TF/s).
AUTO_WS_BOXES = (128, 64, 64, 4, 3, WS)


# auto's fused forward while a CUDA graph is captured, where the Gluon WS kernel serves (Triton >= 3.9, sm_90) at
# base-like shapes (D <= 1024, E <= 192: the measured ones). H100, docs/kernels.md v20, base ReLU graphed inference
# forward 0.2083 ms (kernels/mlp.py) -> 0.1836 / 0.1839; eager forwards 0.39-0.43 -> 0.73-1.06 ms (its launch's host
# time), hence kernels/mlp.py for eager forwards once the module is loaded (`auto_mlp_ws`). v21, with this policy:
# graphed 0.182-0.185 ms (2.99-3.03x dense); eager 0.404 / 0.413 ms against 0.398 / 0.393 forced mlp.py. v23, in
# training (h stored) too: graphed sparse GPT-base step 32.70 / 32.69 -> 32.48 / 32.44 ms, layer fwd+bwd 0.784-0.792
# -> 0.785-0.787 (three A/B rounds).
AUTO_MLP_WS = (128, 64, 64, 6, 4, WS)


# auto's weight gradients where the Gluon WS wgrad serves with balanced items and TMA reduces (Triton >= 3.9, sm_90,
# P's first box <= 128 columns: base), under kernels/gluon_launches.py's rule. H200, docs/kernels.md v22, base ReLU
# layer fwd+bwd (graphed, two rounds): 0.7982 / 0.7955 ms (kernels/wgrad.py) -> 0.7325 / 0.7320; whole experts
# 0.7545 / 0.7544, balanced items with atomic adds 0.7743 / 0.7746. Graphed sparse GPT-base step 30.45 / 30.38 ->
# 29.65 / 29.69 ms. 8B (one 256-column box, 12 warps) lost: 8.03 -> 9.55 ms (atomics: the reduces do not fit); as two
# 128-column boxes (`ws_boxes`, v33) it wins there with bf16 weights' half sums (H200, 8B ReLU: 7.83-7.94 -> 7.48-7.72
# ms); with fp32 master weights their fp32 staging did not fit beside these rings (BK = 32, where it fits, lost: H100,
# v34, 8B ReLU 8.82 / 8.86 -> 9.61 / 9.64 ms) until the two equal boxes shared one staging buffer (v41): H100, 8B ReLU
# layer fwd+bwd with fp32 master weights (four rounds) 8.23 / 8.68 / 8.43 / 8.37 (kernels/wgrad.py) -> 7.55 / 7.73 /
# 8.13 / 7.76 ms. SwiGLU 8B's dW1 (P = 512) in two slices of 256 columns, H100,
# v34, 8B SwiGLU layer (three rounds): 13.02 / 13.04 / 13.12 -> 12.57 / 12.90 / 12.79 ms.
AUTO_WGRAD_WS = (64, 128, 64, 3, 3, 512, WS)
# ... and with an R ring of 4 where two equal boxes share one staging buffer (wgrad_gluon.smem_bytes' one_staging:
# 8B's) and the sums are bf16/fp16: H100, docs/kernels.md v41, 8B ReLU layer fwd+bwd (graphed, twelve A/B rounds)
# 7.348 -> 7.265 ms mean, 9 rounds won; 8B SwiGLU 12.170 -> 12.141 ms (5 rounds, 3 won). With fp32 sums (fp32 master
# weights) that ring would fill shared memory to within 2 kB without FOLD 3 and not fit with it; at base (boxes of
# 128 + 64, each staged) it would fit with half sums: both untimed, so R 3 stays there.
AUTO_WGRAD_WS_R4 = (64, 128, 64, 3, 4, 512, WS)


def auto_mlp_ws(x, w1, w2, act: int, glu: bool, be: int, be2: int, eager_key, key):
    """AUTO_MLP_WS where `auto` takes the Gluon fused forward for this launch, else None (the defaults serve):
    inference and training forwards at a measured shape where the kernel serves, by kernels/gluon_launches.py's
    rule (in a capture once an eager launch with this launch key `key(cfg)` loaded its module; the first eager
    forward of its `eager_key()`, which tells training's from inference's; later eager forwards keep
    kernels/mlp.py)."""
    D, E = w1.shape[2], w2.shape[1]
    if glu or D > 1024 or E > 192 or not descriptors.hopper(x):
        return None
    from . import gluon_launches, mlp_gluon
    if not gluon_launches.take(x, lambda: key(AUTO_MLP_WS), eager_key):
        return None
    BM, BN, BK, wring, ring, _ = AUTO_MLP_WS
    return AUTO_MLP_WS if mlp_gluon.serves(x, w1, w2, act, glu, BM, BN, BK, wring, ring, be, be2) else None


def auto_wgrad_ws(lhs, rhs, dw, fold_kind, split: bool, gathered: bool, eager_key, key):
    """AUTO_WGRAD_WS where `auto` takes the Gluon wgrad for this launch, else None (the defaults serve): its balanced
    items with TMA reduces (row segments: no grid tail whatever the expert loads), where they serve, split sums are
    allowed (not under deterministic algorithms), a wider P than 256 in slices of 256 (SwiGLU 8B's dW1), by
    kernels/gluon_launches.py's rule (in a capture once an eager launch with this launch key loaded the module; the
    first eager launch of its `eager_key()`; later eager launches keep kernels/wgrad.py unless heavy: 8B's)."""
    if not split or gathered or fold_kind == "rows" or not descriptors.hopper(lhs):
        return None
    be, be2 = ws_boxes(lhs.shape[1])
    sums = sums_dtype(dw)
    tiles = (AUTO_WGRAD_WS_R4, AUTO_WGRAD_WS) if sums.itemsize == 2 and be == be2 else (AUTO_WGRAD_WS,)
    cfg = next((c for c in tiles if ws_reduces(dw, (lhs, rhs, sums, FOLD_CODES[fold_kind], True, *c[1:5], be, be2))),
               None)
    from . import gluon_launches
    flops = 2 * lhs.shape[0] * lhs.shape[1] * rhs.shape[1]  # (heavy launches take it in every eager call: 8B's)
    # (the launch key of the tile this launch takes: the one its eager launch recorded)
    return cfg if cfg is not None and gluon_launches.take(lhs, lambda: key(cfg), eager_key, flops) else None


# auto's up_bwd where the Gluon WS kernel serves with its TMA stores (Triton >= 3.9, sm_90), for ReLU at base-like
# shapes (D <= 1024, E <= 192: the measured ones; its GELU epilogue spills), under kernels/gluon_launches.py's rule.
# H100, docs/kernels.md v28, base ReLU layer fwd+bwd (graphed, three A/B rounds): 0.6600 / 0.6642 / 0.6661 ms
# (kernels/up.py) -> 0.6496 / 0.6507 / 0.6507; up_backward alone 144.3 -> 123.8 us.
AUTO_UP_BWD_WS = (128, 64, 64, 3, 4, WS)


def auto_up_bwd_ws(dy, w2, act: int, glu: bool, eager_key, key):
    """AUTO_UP_BWD_WS where `auto` takes the Gluon up_bwd for this launch, else None (the defaults serve): ReLU at a
    measured shape, by kernels/gluon_launches.py's rule (in a capture once an eager launch with this launch key
    loaded the module; the first eager launch of its `eager_key()`; later eager launches keep kernels/up.py). Where
    the kernel does not serve, the launch falls back to kernels/up.py's default (`up_launch._up_bwd_ws`)."""
    D, E = w2.shape[2], w2.shape[1]
    if glu or act != 0 or D > 1024 or E > 192 or not descriptors.hopper(dy):
        return None
    from . import gluon_launches
    return AUTO_UP_BWD_WS if gluon_launches.take(dy, lambda: key(AUTO_UP_BWD_WS), eager_key) else None


def ws_reduces(dw, tile) -> bool:
    """Whether the WS wgrad's balanced items, at `tile` (wgrad_gluon.serves' arguments after dW), can add their
    partial sums as TMA reduces in tile[2]'s dtype: dW has a 2-D view for them, and their staging fits beside the
    rings."""
    from . import wgrad_gluon
    return wgrad_gluon.out_view(dw, tile[0].shape[1], tile[2]) is not None and wgrad_gluon.serves(*tile, True)


def auto_down_ws(a: torch.Tensor, w: torch.Tensor, atomic: bool, view: str = "fallback"):
    """The config where `auto` takes the Gluon down kernel for this launch (an atomic combine into rows >= 2048
    wide: AUTO_WS; one whose Ein is two TMA boxes: AUTO_WS_BOXES), else None (the defaults serve). `view`: how a W
    that is not row-major reaches it (`down_launch.down_scatter`). Not for an Ein in passes (SwiGLU 8B's dx,
    512 = 2 x 256, `down_gluon.ein_passes`): built, not yet timed (docs/kernels.md v49); a forced WS config takes
    it."""
    from . import down_gluon
    if not atomic or down_gluon.ein_passes(w.shape[1]) != 1:
        return None
    boxes = down_gluon.ein_boxes(w.shape[1])
    cfg = AUTO_WS if w.shape[2] >= 2048 else AUTO_WS_BOXES if boxes and boxes[1] else None
    return cfg if cfg is not None and down_gluon.serves(a, w, *cfg[:2], cfg[4], view) else None
