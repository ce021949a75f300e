"""Tile configurations and launchers of the `triton` expert backend's kernels (`kernels/`; imported lazily:
needs triton).

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
  mlp     y[token[r]] += gate * act(X[token[r]] @ W1[e]^T + b1) @ W2[e]   (the fused forward: up and down
          per M-tile, `a` kept on chip; `kernels/mlp.py`; TritonBackend(fused_forward=...), on by default for
          activations without a gate on Hopper)

The routing plan itself (the pairs sorted by expert) is a counting sort in two small kernels
(`kernels/routing_plan.py`). Expert e owns sorted rows offsets[e]:offsets[e+1]. The M-tiles of `up`/`down` never
straddle two experts: every program finds its (expert, first row) from the offsets with a vectorised cumsum over
the per-expert tile counts, so the grid is a host-side upper bound (cdiv(M, BM) + N tiles) and no
count ever travels to the host.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from .kernels.common import ACT_CODES, expert_boxes, expert_matrix, fill_args, tma_aligned
from .kernels.down import _down_kernel, _down_tma_kernel
from .kernels.mlp import _mlp_kernel
from .kernels.tile_table import expert_tile_table, token_window_table
from .kernels.up import _up_kernel
from .kernels.wgrad import _wgrad_kernel
from .routing import initialise


# (BM|BP, BN|BQ, BK, num_warps, num_stages[, variant]). variant: down 1 = ROWLOOP (a program covers all
# output columns), 3 = TMA (descriptor loads), 4 = STAGED (ROWLOOP from A rows loaded once; BK unused),
# 5 = WS (STAGED as a warp-specialised Gluon kernel, kernels/down_gluon.py: `auto`'s for base ReLU's dx with
# Triton >= 3.9, AUTO_WS_BOXES; BK and WARPS unused, STAGES = its W ring; STAGED where a forced WS does not serve),
# 6 = WS_PAIR (the same kernel over M-tiles of 2 * BM rows, each consumer taking BM of them over every column block
# on the same W tile as the other: `auto`'s for 8B's dx, AUTO_WS);
# mlp 3 = TMA (the weights' tiles by TMA where the descriptors serve, `_mlp_descriptors`), 5 = WS (the fused
# forward as a warp-specialised Gluon kernel, kernels/mlp_gluon.py: `auto`'s for captured inference forwards at
# base-like shapes with Triton >= 3.9, AUTO_MLP_WS; WARPS is then the depth of its weight ring (W1's and W2's
# tiles), STAGES its x ring's; kernels/mlp.py where it does not serve);
# up_bwd[_glu] 1 = TWO_PASS (the GEMM, then its epilogue in a launch of EPILOGUE_TILE); up_bwd 5 = WS (a
# warp-specialised Gluon kernel, kernels/up_bwd_gluon.py, Triton >= 3.9, no gate: BN unused, WARPS and STAGES the
# depths of its W2 and dy rings; the default tile where it does not serve); a seventh entry of 1
# (up kinds: 8B's GLU ones by default on Hopper, elsewhere opt-in) = their weights' tiles by TMA;
# wgrad n = split each expert's reduction into chunks of n rows (0 = none), and a seventh entry of 1 = its
# left operand by TMA (Hopper's default) or 5 = WS (a warp-specialised Gluon kernel, kernels/wgrad_gluon.py,
# Triton >= 3.9: `auto`'s choice at base, `_auto_wgrad_ws`; BP unused, BQ 128, WARPS and STAGES the depths of its L
# and R rings, n > 0 its balanced items (equal row segments of all experts' rows, each at least n rows); LTMA where
# it does not serve); a wgrad BP >= P makes each program cover all of P (kernels/wgrad.py),
# an up BN >= E all of E (`_up_columns`). Defaults are chosen per
# kernel from the sweeps recorded in docs/kernels.md; `SSD_TRITON_TUNE=1` times the candidates once per
# shape key instead.
ROWLOOP, TMA, STAGED, WS = 1, 3, 4, 5  # down variants (2 was PERSISTENT, slower and removed: docs/kernels.md v8)
WS_PAIR = 6  # down variant: WS over M-tiles of 2 * BM rows, the two consumers sharing each W tile (down_gluon.launch)
TMA_OPERAND = ("up", "up_glu", "up_bwd", "up_bwd_glu", "wgrad")  # kinds whose configs take a seventh entry
TWO_PASS = 1  # up_bwd variant: the GEMM, then its epilogue in a second launch (kernels/up.py)
EPILOGUE_TILE = (64, 64, 16, 4, 1)  # that second launch's (BM, BN, -, warps, stages): elementwise work
DEFAULTS = {
    "up": (128, 256, 64, 8, 3),           # BN >= E: all of E per program (base: 128 + 64 columns, `_up_columns`)
    "up_glu": (128, 64, 64, 8, 3),
    "up_bwd": (128, 64, 64, 4, 4),
    "up_bwd_glu": (64, 64, 64, 4, 4),
    "down": (128, 128, 64, 8, 3, TMA),    # falls back to pointer loads where TMA cannot describe the operands
    "wgrad": (128, 128, 64, 8, 3),
    "wgrad_mat": (128, 128, 64, 8, 3),
    "mlp": (128, 64, 64, 8, 3),           # BM, BN = output columns per step, BK; the expert's E in one tile
    "mlp_glu": (64, 64, 64, 8, 3),
}
CANDIDATES = {  # (BM|BP, BN|BQ, BK, warps, stages); swept with SSD_TRITON_TUNE=1 (see docs/kernels.md)
    "up": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4)],
    "up_glu": [(128, 64, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (256, 64, 64, 8, 3)],
    "up_bwd": [(128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 64, 64, 8, 4), (64, 64, 64, 4, 4),
               (64, 256, 64, 8, 3), (128, 256, 64, 8, 3, 1)],
    "up_bwd_glu": [(64, 64, 64, 4, 4), (128, 32, 64, 4, 4), (64, 128, 64, 8, 3), (128, 64, 64, 4, 4),
                   (128, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 1)],
    "down": [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4),
             (128, 256, 64, 8, 3), (128, 128, 64, 4, 3, 1), (128, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 3),
             (128, 128, 64, 4, 3, 3), (128, 64, 64, 8, 3, 4), (64, 64, 64, 4, 2, 4)],
    "wgrad": [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 128, 128, 4, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
              (64, 128, 128, 4, 3, 1024), (128, 128, 64, 8, 3, 2048), (256, 128, 64, 8, 3), (256, 128, 64, 8, 3, 2048),
              (128, 128, 64, 8, 3, 0, 1), (64, 128, 128, 4, 3, 2048, 1)],
    "wgrad_mat": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4)],
    "mlp": [(128, 64, 64, 8, 3), (128, 64, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3, TMA),
            (64, 64, 64, 4, 2), (128, 128, 64, 8, 2), (128, 32, 64, 8, 3)],
    "mlp_glu": [(64, 64, 64, 8, 3), (64, 32, 64, 8, 3), (64, 64, 64, 8, 2)],
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


_ENV_PARSED: dict = {}


def env_configs() -> dict:
    """Tile configs from SSD_TRITON_CONFIG, e.g. "wgrad=64,128,128,4,3,1024;down=128,128,64,4,3,1": per kernel
    kind (DEFAULTS' names; "down:atomic16" for one combine), BM,BN,BK,warps,stages[,variant], which win over
    the defaults and the tuner (A/B runs of a variant in the step, or a GPU whose sweep differs)."""
    text = os.environ.get("SSD_TRITON_CONFIG", "").strip()
    if text not in _ENV_PARSED:
        _ENV_PARSED.clear()
        _ENV_PARSED[text] = _parse_configs(text)
    return _ENV_PARSED[text]


def _parse_configs(text: str) -> dict:
    from ...errors import UserError

    out = {}
    for item in filter(None, (t.strip() for t in text.split(";"))):
        kind, sep, values = item.partition("=")
        kind = kind.strip()
        bad = f"SSD_TRITON_CONFIG: {item!r}"
        if not sep or kind.split(":")[0] not in DEFAULTS:
            raise UserError(f"{bad}: expected KIND=BM,BN,BK,WARPS,STAGES[,VARIANT] with KIND one of "
                            f"{', '.join(DEFAULTS)} (down may name a combine, e.g. down:atomic16)")
        try:
            cfg = tuple(int(v) for v in values.split(","))
        except ValueError:
            cfg = ()
        base = kind.split(":")[0]
        if len(cfg) not in (5, 6, 7):  # (the variant is checked before the tile: a WS variant reads WARPS as a ring)
            raise UserError(f"{bad}: the values must be 5 to 7 integers, e.g. 128,128,64,8,3")
        if len(cfg) == 7 and (base not in TMA_OPERAND or cfg[6] not in ((0, 1, WS) if base == "wgrad" else (0, 1))):
            raise UserError(f"{bad}: a seventh value is for {', '.join(TMA_OPERAND)} only: 1 loads the operand that "
                            f"is not gathered (the weights; wgrad's left one) by TMA, else 0; for wgrad, 5 (WS)")
        if len(cfg) >= 6 and not _variant_ok(base, cfg[5]):
            raise UserError(f"{bad}: VARIANT must be 0 or, for down, 1 (ROWLOOP), 3 (TMA), 4 (STAGED), 5 (WS) or "
                            f"6 (WS_PAIR); "
                            f"for mlp, 3 (TMA) or 5 (WS); for up_bwd[_glu], 1 (TWO_PASS), and for up_bwd 5 (WS); "
                            f"for wgrad, a row chunk >= 0")
        # the fourth entry: a ring's depth (the weight ring, kernels/mlp_gluon.py; the L ring, kernels/wgrad_gluon.py)
        ring = (base in ("mlp", "up_bwd") and cfg[5:] == (WS,)) or (base == "wgrad" and cfg[6:] == (WS,))
        pow2 = cfg[:3 if ring else 4]
        if any(v < 1 or v & (v - 1) for v in pow2) or min(cfg[3:5]) < 1:
            raise UserError(f"{bad}: BM, BN, BK and WARPS must be powers of two and STAGES >= 1")
        out[kind] = cfg
    return out


def _variant_ok(base: str, variant: int) -> bool:
    return (variant == 0 or (base == "down" and variant in (ROWLOOP, TMA, STAGED, WS, WS_PAIR))
            or (base == "mlp" and variant in (TMA, WS)) or (base == "wgrad" and variant > 0)
            or (base.startswith("up_bwd") and variant == TWO_PASS) or (base == "up_bwd" and variant == WS))


def _default(base: str, key: tuple, hopper: bool = True):
    """Untuned choice: the winners of the sweeps (docs/kernels.md: H100 run 4, H200 v7-v8, H100 v14) by problem size.
    Before Hopper (A100: mma.sync keeps operand fragments in registers, no wgmma) the wide 8B tiles below
    spill 104-400 bytes per thread; there the nearest tiles that compile without spilling (offline sm_80
    compile, docs/kernels.md v11; not timed)."""
    # the GLU up kinds at 8B on Hopper take their weights by TMA (a seventh entry of 1). H100, docs/kernels.md v18,
    # 8B SwiGLU layer, three A/B rounds: fwd+bwd 12.68 / 12.69 / 12.76 -> 12.49 / 12.58 / 12.65 ms, forward
    # 3.92 / 3.91 / 4.20 -> 3.76 / 3.88 / 4.01 (8B ReLU's up_bwd and base's: even, so they stay pointer loads)
    wtma = (1,) if hopper and base in ("up_glu", "up_bwd_glu") and key[0] >= 2048 else ()
    if base.startswith("up_bwd") and hopper and (key[0] >= 2048 or base == "up_bwd_glu"):
        # TWO_PASS: the GEMM on wide tiles, its epilogue in a second launch (H100 sweep 2026-12-05, kernels.md
        # v14: 8B ReLU 1.49 -> 1.09 ms, 8B SwiGLU 2.28 -> 1.34, base SwiGLU 0.240 -> 0.195; base ReLU even)
        return (128, 256 if key[0] >= 2048 else 128, 64, 8, 3, TWO_PASS) + wtma
    if base in ("up_bwd", "up_glu") and key[0] >= 2048:   # long reduction (D): wider tiles
        if hopper:
            return (128, 128, 64, 8, 3, 0) + wtma
        return (128, 128, 64, 8, 3) if base == "up_bwd" else DEFAULTS[base]
    if base == "down" and key[1] >= 2048:                  # wide output (8B's D = 4096): ROWLOOP, H200 2026-12-04
        if not hopper:
            return (128, 128, 64, 8, 3, ROWLOOP) if key[0] >= 512 else (64, 128, 64, 4, 3, ROWLOOP)
        return (128, 256, 64, 8, 3, ROWLOOP) if key[0] >= 512 else (128, 128, 64, 4, 3, ROWLOOP)
    if base == "mlp" and hopper and key[0] >= 2048 and key[1] <= 256:  # 8B's (D, E): weights by TMA, 128 columns
        # per down step (224 kB of shared memory at E = 256). H100, docs/kernels.md v17, 8B ReLU, four A/B rounds:
        # inference forward 2.50-2.57 -> 2.44-2.53 ms, fwd+bwd 9.20-9.35 -> 9.04-9.22 (without TMA: no gain)
        return (128, 128, 64, 8, 3, TMA)
    if base == "mlp" and hopper and key[0] <= 1024 and key[1] <= 192:  # base's (D, E): a fourth operand stage
        # (160 kB of shared memory at E = 192) keeps more loads in flight: H100, docs/kernels.md v17, base ReLU
        # inference forward 0.2067 / 0.2053 -> 0.2019 / 0.2015 ms, fwd+bwd 0.888 -> 0.878 ms
        return (128, 64, 64, 8, 4)
    if base == "wgrad":
        cfg = DEFAULTS[base]
        if key[1] <= 1024:                                # few (expert, tile) programs: smaller P tiles
            # base's thin experts (P <= 256): rows split in chunks of 2048, so that the step's skewed expert
            # loads do not leave a long grid tail (sparse GPT-base step 32.1 -> 31.3 ms, H200 v8)
            cfg = (64, 128, 128, 4, 3, 2048) if key[0] <= 256 else (64, 128, 64, 4, 4)
        # on Hopper the left operand by TMA (kernels/wgrad.py, LTMA). H100, docs/kernels.md v17, layer fwd+bwd in
        # three A/B rounds: base ReLU 0.879 -> 0.861 ms, 8B ReLU 9.10 -> 8.99, 8B SwiGLU (two) 12.75 / 13.08 ->
        # 12.55 / 12.61
        return cfg[:5] + (cfg[5] if len(cfg) > 5 else 0, 1) if hopper else cfg
    return DEFAULTS[base]


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
# time), hence kernels/mlp.py for eager forwards once the module is loaded (`_auto_mlp_ws`). v21, with this policy:
# graphed 0.182-0.185 ms (2.99-3.03x dense); eager 0.404 / 0.413 ms against 0.398 / 0.393 forced mlp.py. v23, in
# training (h stored) too: graphed sparse GPT-base step 32.70 / 32.69 -> 32.48 / 32.44 ms, layer fwd+bwd 0.784-0.792
# -> 0.785-0.787 (three A/B rounds).
AUTO_MLP_WS = (128, 64, 64, 6, 4, WS)


# auto's weight gradients where the Gluon WS wgrad serves with balanced items and TMA reduces (Triton >= 3.9, sm_90,
# P's first box <= 128 columns: base), under kernels/gluon_launches.py's rule. H200, docs/kernels.md v22, base ReLU
# layer fwd+bwd (graphed, two rounds): 0.7982 / 0.7955 ms (kernels/wgrad.py) -> 0.7325 / 0.7320; whole experts
# 0.7545 / 0.7544, balanced items with atomic adds 0.7743 / 0.7746. Graphed sparse GPT-base step 30.45 / 30.38 ->
# 29.65 / 29.69 ms. 8B (one 256-column box, 12 warps) lost: 8.03 -> 9.55 ms (atomics: the reduces do not fit); as two
# 128-column boxes (`_ws_boxes`, v33) it wins there with bf16 weights' half sums (H200, 8B ReLU: 7.83-7.94 -> 7.48-7.72
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


def _auto_mlp_ws(x, w1, w2, act: int, glu: bool, be: int, be2: int, eager_key, key):
    """AUTO_MLP_WS where `auto` takes the Gluon fused forward for this launch, else None (the defaults serve):
    inference and training forwards at a measured shape where the kernel serves, by kernels/gluon_launches.py's
    rule (in a capture once an eager launch with this launch key `key(cfg)` loaded its module; the first eager
    forward of its `eager_key()`, which tells training's from inference's; later eager forwards keep
    kernels/mlp.py)."""
    D, E = w1.shape[2], w2.shape[1]
    if glu or D > 1024 or E > 192 or not _hopper(x):
        return None
    from .kernels import gluon_launches, mlp_gluon
    if not gluon_launches.take(x, lambda: key(AUTO_MLP_WS), eager_key):
        return None
    BM, BN, BK, wring, ring, _ = AUTO_MLP_WS
    return AUTO_MLP_WS if mlp_gluon.serves(x, w1, w2, act, glu, BM, BN, BK, wring, ring, be, be2) else None


def _auto_wgrad_ws(lhs, rhs, dw, fold_kind, split: bool, gathered: bool, eager_key, key):
    """AUTO_WGRAD_WS where `auto` takes the Gluon wgrad for this launch, else None (the defaults serve): its balanced
    items with TMA reduces (row segments: no grid tail whatever the expert loads), where they serve, split sums are
    allowed (not under deterministic algorithms), a wider P than 256 in slices of 256 (SwiGLU 8B's dW1), by
    kernels/gluon_launches.py's rule (in a capture once an eager launch with this launch key loaded the module; the
    first eager launch of its `eager_key()`; later eager launches keep kernels/wgrad.py unless heavy: 8B's)."""
    if not split or gathered or fold_kind == "rows" or not _hopper(lhs):
        return None
    be, be2 = _ws_boxes(lhs.shape[1])
    sums = _sums_dtype(dw)
    tiles = (AUTO_WGRAD_WS_R4, AUTO_WGRAD_WS) if sums.itemsize == 2 and be == be2 else (AUTO_WGRAD_WS,)
    cfg = next((c for c in tiles if _ws_reduces(dw, (lhs, rhs, sums, _FOLD_CODES[fold_kind], True, *c[1:5], be, be2))),
               None)
    from .kernels import gluon_launches
    flops = 2 * lhs.shape[0] * lhs.shape[1] * rhs.shape[1]  # (heavy launches take it in every eager call: 8B's)
    # (the launch key of the tile this launch takes: the one its eager launch recorded)
    return cfg if cfg is not None and gluon_launches.take(lhs, lambda: key(cfg), eager_key, flops) else None


# auto's up_bwd where the Gluon WS kernel serves with its TMA stores (Triton >= 3.9, sm_90), for ReLU at base-like
# shapes (D <= 1024, E <= 192: the measured ones; its GELU epilogue spills), under kernels/gluon_launches.py's rule.
# H100, docs/kernels.md v28, base ReLU layer fwd+bwd (graphed, three A/B rounds): 0.6600 / 0.6642 / 0.6661 ms
# (kernels/up.py) -> 0.6496 / 0.6507 / 0.6507; up_backward alone 144.3 -> 123.8 us.
AUTO_UP_BWD_WS = (128, 64, 64, 3, 4, WS)


def _auto_up_bwd_ws(dy, w2, act: int, glu: bool, eager_key, key):
    """AUTO_UP_BWD_WS where `auto` takes the Gluon up_bwd for this launch, else None (the defaults serve): ReLU at a
    measured shape, by kernels/gluon_launches.py's rule (in a capture once an eager launch with this launch key
    loaded the module; the first eager launch of its `eager_key()`; later eager launches keep kernels/up.py). Where
    the kernel does not serve, the launch falls back to kernels/up.py's default (`_up_bwd_ws`)."""
    D, E = w2.shape[2], w2.shape[1]
    if glu or act != 0 or D > 1024 or E > 192 or not _hopper(dy):
        return None
    from .kernels import gluon_launches
    return AUTO_UP_BWD_WS if gluon_launches.take(dy, lambda: key(AUTO_UP_BWD_WS), eager_key) else None


def _ws_reduces(dw, tile) -> bool:
    """Whether the WS wgrad's balanced items, at `tile` (wgrad_gluon.serves' arguments after dW), can add their
    partial sums as TMA reduces in tile[2]'s dtype: dW has a 2-D view for them, and their staging fits beside the
    rings."""
    from .kernels import wgrad_gluon
    return wgrad_gluon.out_view(dw, tile[0].shape[1], tile[2]) is not None and wgrad_gluon.serves(*tile, True)


def _auto_down_ws(a: torch.Tensor, w: torch.Tensor, atomic: bool, view: str = "fallback"):
    """The config where `auto` takes the Gluon down kernel for this launch (an atomic combine into rows >= 2048
    wide: AUTO_WS; one whose Ein is two TMA boxes: AUTO_WS_BOXES), else None (the defaults serve). `view`: how a W
    that is not row-major reaches it (`down_scatter`). Not for an Ein in passes (SwiGLU 8B's dx, 512 = 2 x 256,
    `down_gluon.ein_passes`): built, not yet timed (docs/kernels.md v49); a forced WS config takes it."""
    from .kernels import down_gluon
    if not atomic or down_gluon.ein_passes(w.shape[1]) != 1:
        return None
    boxes = down_gluon.ein_boxes(w.shape[1])
    cfg = AUTO_WS if w.shape[2] >= 2048 else AUTO_WS_BOXES if boxes and boxes[1] else None
    return cfg if cfg is not None and down_gluon.serves(a, w, *cfg[:2], cfg[4], view) else None


def _pick(kind: str, key: tuple, launch, hopper: bool = True, auto=None):
    """The config for `kind` at `key` (on a Hopper GPU or not); when tuning, time each candidate once with
    `launch(cfg)`. `auto()`: a default that depends on the operands (None where the table's serves)."""
    base = kind.split(":")[0]
    for table in (_FORCED, env_configs()):
        if kind in table or base in table:
            return table.get(kind, table.get(base))
    if not _tuning() or os.environ.get("TRITON_INTERPRET") == "1":
        return (auto and auto()) or _default(base, key, hopper)
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


# M-tile order. Expert order (tile i of expert e after all tiles of experts < e) makes the programs that
# run at the same time cover every token: fine while the token-indexed operand (the gathered x or dy, the
# atomically combined y or dx) fits in L2, but at the 8B shape it is 134 MB, so each of a token's K rows
# is gathered, or atomically added, through DRAM again. Token-window order sorts the tiles by their
# relative position in their expert's token-sorted rows, so that the tiles resident at once cover one
# window of tokens of every expert, whose rows stay in L2 across the K visits; but then every expert's W
# is in flight at once and the weights miss L2 (Nsight Compute, docs/kernels.md v14: the 8B dx launch
# moves ~4 GB through DRAM in expert order, L2 hit rate 79% -> 41% in token order). Token order over all
# experts lost everywhere (v12, v14: +1.24 ms in the H100 8B layer). Grouped windows (`token:G`) take
# the experts in groups of G, one group after the other, with token windows within each group: fewer
# weights in flight, fewer DRAM round trips per dx row. Timed at 8B (H100, v15), G = 16 won in the layer
# for the fused forward without a gate only: inference forward 2.88 -> 2.55 ms (two A/B runs), training
# fwd+bwd even (9.59 -> 9.56 / 9.54 with the backward launches grouped too). Alone, down for dx, up_bwd
# and the fused forward each looked 2-8% faster grouped, but in the layer the backward's gains did not show
# (SwiGLU fwd+bwd 13.09 -> 13.11 / 13.58), and the unfused GLU forward lost (3.95 -> 4.17 ms). The WS dx
# (kernels/down_gluon.py, since v16) was never in that A/B; at 8B its adds alone cost what it does (v37:
# 1.51 of 1.55 ms on the H200), and in windows of 16 experts it took 1.885 -> 1.452 ms alone and the H100
# 8B ReLU layer 8.13 -> 8.01 ms (eight rounds over three calls, each won), while up_bwd grouped too lost
# again (8.12). So `auto` is grouped windows for the fused forward and the WS down on Hopper where the
# token rows are >= 2048 wide (`_wide_group`), expert order for every other launch;
# SSD_TRITON_TILE_ORDER=expert|token|token:G forces one order, SSD_TRITON_WS_DOWN_ORDER the WS down's alone.
AUTO_GROUP = 16


def _tile_groups(auto=None, var="SSD_TRITON_TILE_ORDER"):
    """How a launch takes its M-tiles (SSD_TRITON_TILE_ORDER, or `var`): None for expert order, else the size
    of the expert groups of token-window order (0: one group of all experts, `token`); `auto` is the launch's
    own choice, taken when the variable is unset or `auto` (`_wide_group`)."""
    from ...errors import UserError

    mode = os.environ.get(var, "auto")
    if mode == "auto":
        return auto
    if mode == "expert":
        return None
    if mode == "token":
        return 0
    name, _, group = mode.partition(":")
    if name != "token" or not group.isdigit() or int(group) < 1:
        raise UserError(f"{var}: {mode!r}; accepted: auto, expert, token, or token:G with G >= 1 "
                        f"experts per group")
    return int(group)


def _ws_down_group(auto=None):
    """The WS down kernel's M-tile order: SSD_TRITON_WS_DOWN_ORDER (this launch alone), else
    SSD_TRITON_TILE_ORDER, else `auto` (the launcher passes `_wide_group`'s: token windows of 16 experts
    where its output rows are >= 2048 wide on Hopper, the 8B dx; comment above)."""
    return _tile_groups(_tile_groups(auto), "SSD_TRITON_WS_DOWN_ORDER")


def _wide_group(width: int, t: torch.Tensor):
    """`auto`'s M-tile order for the launch that won with grouped token windows (the fused forward without a
    gate; comment above): AUTO_GROUP on Hopper when the token-indexed rows are `width` >= 2048 wide (x and y
    do not fit L2), else None (expert order)."""
    return AUTO_GROUP if width >= 2048 and _hopper(t) else None


def _tile_index(offsets: torch.Tensor, M: int, N: int, BM: int):
    """(expert, index within the expert, the expert's tile count, whether real) of the M-tiles j = 0 ..
    cdiv(M, BM) + N - 1 in expert order (an upper bound: the tail is not real). Device ops, no host sync."""
    counts = (offsets[1:] - offsets[:-1]).long()
    nt = (counts + BM - 1) // BM
    cum = nt.cumsum(0)
    j = torch.arange(triton.cdiv(M, BM) + N, device=offsets.device)
    e = torch.searchsorted(cum, j, right=True).clamp_max(N - 1)
    return e, j - (cum[e] - nt[e]), nt[e], j < cum[-1]


def _tile_table(offsets: torch.Tensor, M: int, BM: int, e, i, valid) -> torch.Tensor:
    """[n, 2] int32 (expert, first row) of the tiles (e, i); first row M where not `valid` (empty)."""
    row0 = torch.where(valid, offsets.long()[e] + i * BM, M)
    return torch.stack([e, row0], 1).to(torch.int32).contiguous()


def _table_launches(offsets: torch.Tensor) -> bool:
    """Whether the tile tables come from kernels/tile_table.py's launches (Triton runs: CUDA, or the interpreter)."""
    return offsets.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def expert_tiles(offsets: torch.Tensor, M: int, N: int, BM: int) -> torch.Tensor:
    """[cdiv(M, BM) + N, 2] int32 (expert, first row) of every M-tile in expert order; the unused tail of
    this upper bound holds empty tiles (first row M). The work list of the Gluon kernels (WS): one launch,
    `kernels/tile_table.py`, where Triton runs (else torch ops, as `token_window_tiles`)."""
    if _table_launches(offsets):
        return expert_tile_table(offsets, M, N, BM)
    e, i, _, valid = _tile_index(offsets, M, N, BM)
    return _tile_table(offsets, M, BM, e, i, valid)


def token_window_tiles(offsets: torch.Tensor, M: int, N: int, BM: int, group: int = 0) -> torch.Tensor:
    """`expert_tiles` ordered by the tile's relative position (i + 1/2) / tiles_e within its expert (ties:
    expert order), within groups of `group` consecutive experts taken one after the other (0: all experts
    in one group); empty tiles last. One launch where Triton runs (`kernels/tile_table.py`), else torch ops and a
    sort; no host sync."""
    if _table_launches(offsets):
        return token_window_table(offsets, M, N, BM, group)
    return token_window_tiles_torch(offsets, M, N, BM, group)


def token_window_tiles_torch(offsets: torch.Tensor, M: int, N: int, BM: int, group: int = 0) -> torch.Tensor:
    """`token_window_tiles` by torch ops: the relative positions as doubles, sorted stably (exact enough: with tile
    counts below 2^20, two distinct positions differ by at least 1 / (nt * nt') >= 2^-40, far above a double's
    rounding)."""
    e, i, nt, valid = _tile_index(offsets, M, N, BM)
    pos = (i.double() + 0.5) / nt.clamp_min(1).double()   # in (0, 1): the group index is the major key
    key = torch.where(valid, pos + (e // group if group else 0), float("inf"))
    order = torch.argsort(key, stable=True)
    return _tile_table(offsets, M, BM, e[order], i[order], valid[order])


def _tile_list(plan, BM: int, group):
    """The plan's M-tile table at tile height BM, built once per plan, height and order (unless the plan's
    counting sort wrote it: `plan.tiles`): expert order (group None, `expert_tiles`) or token windows within
    groups of `group` experts (`token_window_tiles`)."""
    cache = plan.tiles
    if (BM, group) not in cache:
        M, N = plan.num_rows, plan.num_experts
        cache[BM, group] = (expert_tiles(plan.offsets, M, N, BM) if group is None
                            else token_window_tiles(plan.offsets, M, N, BM, group))
    return cache[BM, group]


def _tiles(plan, BM: int, auto=None):
    """(TILES, SCHED) of a launch: the token-window schedule, built once per plan, tile height and expert
    grouping, or expert order (TILES unused); `auto`: the launch's own order (`_tile_groups`)."""
    group = _tile_groups(auto)
    if group is None:
        return plan.offsets, False
    return _tile_list(plan, BM, group), True


def _prec(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _np2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _up_columns(E: int, BN: int):
    """(BN, BN2, column blocks per M-tile, rows of up_bwd's dgate partials) of an up launch whose config asks
    for BN columns: a BN >= E makes each program cover all E columns, as one or two power-of-two tiles
    (192 = 128 + 64, `_split_width`), so the gathered rows are read once and no masked column is multiplied."""
    if BN >= E:
        bn, bn2 = _split_width(E)
        return bn, bn2, 1, 2 if bn2 else 1
    return BN, 0, triton.cdiv(E, BN), triton.cdiv(E, BN)


def _launch_up(head, tail, plan, meta, cfg, M, N, Din, E, fill=None):
    """One `_up_kernel` launch: a program per (M-tile, column block); `head` and `tail` are the kernel's
    arguments before and after TILES (head[0]: the gathered [T, Din] operand, or da for meta's PASS 2;
    kernels/up.py). fill = (out, row or None):
    the programs also initialise the contiguous `out` ([T, Dout], the next down launch's atomic target)
    to `row` broadcast over its rows, or to zeros."""
    BM, BN, BK, nw, ns = cfg[:5]
    bn, bn2, num_n, _ = _up_columns(E, BN)
    tiles, sched = _tiles(plan, BM)
    programs = (triton.cdiv(M, BM) + N) * num_n
    fills, fill_meta = fill_args(fill, programs, head[0])
    descs = None  # a seventh config entry of 1: W's tiles by TMA (kernels/up.py `_gather_gemm`, WTMA)
    if meta["PASS"] != 2 and _operand_tma(cfg, head[2]):
        descs = _expert_descriptors(head[2], (bn, max(bn2, 16)), BK)
    _up_kernel[(programs,)](
        *head, tiles, *tail, *fills, *(descs[:2] if descs else (None, None)), N, M, Din, E, num_n,
        WTMA=descs is not None, W_RC=bool(descs and descs[2]), EVEN_K=Din % BK == 0, EVEN_N=bn2 > 0 or E % bn == 0,
        SCHED=sched, SPLIT=bn2 > 0, BM=BM, BN=bn, BN2=max(bn2, 16), BK=BK, NP2=_np2(N), num_warps=nw, num_stages=ns,
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
                PREC=_prec(x), PASS=0)

    def launch(cfg):
        _launch_up(head, tail, plan, meta, cfg, M, N, D, E, fill)

    launch(_pick("up_glu" if glu else "up", (D, E, str(x.dtype)), launch, _hopper(x)))
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
                PREC=_prec(dy))
    state = {}

    def eager_key():  # `_auto_up_bwd_ws`'s cheap key of this launch (shapes, outputs, the store switch)
        return (dy.device, dy.dtype, tuple(dy.shape), M, tuple(w2.shape), w2.stride(), act, need_ga, need_db,
                fill is not None, _up_bwd_tma_stores())

    def ws_key(cfg):  # kernels/gluon_launches.key of this launch with tile `cfg`
        from .kernels import gluon_launches
        return gluon_launches.key((dy, w2, h, plan.offsets, plan.order, plan.token, gate_flat,
                                   fill[0] if fill is not None else None), act, need_ga, need_db, cfg,
                                  _up_bwd_tma_stores())

    def launch(cfg):
        if cfg[5:] == (WS,):  # the Gluon kernel where it serves (kernels/up_bwd_gluon.py), else kernels/up.py's default
            state["dgp"] = _up_bwd_ws(dy, w2, h, gate_flat, plan, act, glu, dh, ga if need_ga else None,
                                      db if need_db else None, fill, cfg)
            if state["dgp"] is not None:
                from .kernels import gluon_launches
                gluon_launches.note(ws_key(cfg), eager_key(), dy)
                return
            cfg = _default("up_bwd_glu" if glu else "up_bwd", (D, E, str(dy.dtype)), _hopper(dy))
        two = len(cfg) > 5 and cfg[5] == TWO_PASS
        dgp = torch.empty(_up_columns(E, (EPILOGUE_TILE if two else cfg)[1])[3], M, device=dy.device,
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

    launch(_pick("up_bwd_glu" if glu else "up_bwd", (D, E, str(dy.dtype)), launch, _hopper(dy),
                 auto=lambda: _auto_up_bwd_ws(dy, w2, act, glu, eager_key, ws_key)))
    dgate = state["dgp"] if partials else state["dgp"].sum(0)
    return dh, dgate, (ga if need_ga else None), (db if need_db else None)


def _up_bwd_ws(dy, w2, h, gate_flat, plan, act: int, glu: bool, dh, ga, db, fill, cfg):
    """up_bwd variant 5 (WS: kernels/up_bwd_gluon.py) where it serves (`fill` only with zeros): the kernel writes dh,
    ga and db (when not None); returns the gate gradient's one row of partials [1, M], else None."""
    from .kernels import up_bwd_gluon

    BM, _, BK, w_ring, ring = cfg[:5]
    be, be2 = _ws_boxes(w2.shape[1])  # (8B's E = 256 as 128 + 128: boxes of at most 128 columns)
    zeros = fill[0] if fill is not None and fill[1] is None else None
    if (fill is not None and zeros is None) or not up_bwd_gluon.serves(dy, w2, h, act, glu, zeros, BM, BK, w_ring,
                                                                        ring, be, be2):
        return None
    dgp = torch.empty(1, plan.num_rows, device=dy.device, dtype=torch.float32)
    if db is not None:
        db.zero_()
    up_bwd_gluon.launch(dy, w2, h, _tile_list(plan, BM, None), plan.offsets, plan.order, plan.token, gate_flat, dh, ga,
                        dgp, db, zeros, act, BM, BK, w_ring, ring, be, be2, _up_bwd_tma_stores())
    return dgp


def _hopper(t: torch.Tensor) -> bool:
    """Hopper or newer, or the interpreter (tests): TMA (the bulk-copy engine; A100s take the pointer loads)
    and bf16 atomic adds in hardware (on sm_80 Triton lowers them to compare-and-swap loops)."""
    from . import _sm90  # cached per device

    if t.device.type != "cuda":
        return True
    return _sm90(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _operand_tma(cfg, t: torch.Tensor) -> bool:
    """Whether a config's seventh entry asks for its non-gathered operand by TMA (TMA_OPERAND) and `t`'s device
    has TMA."""
    return cfg[6:] == (1,) and _hopper(t)


def _down_descriptors(a, w, BM, BN, BK):
    """(A, W, W's RC) TMA descriptors for `_down_tma_kernel`, or None where the layouts do not allow one: rows
    of `a` contiguous, and all experts' W as one 2-D matrix (`_expert_descriptors`). Dynamo cannot trace these
    host-side descriptors (torch 2.11), one reason the backend is an opaque custom op."""
    wd = _expert_descriptors(w, (BK,), BN)
    ad = _tma_descriptors(a, ([BM, BK],)) if a.shape[1] == w.shape[1] else None
    return None if wd is None or ad is None else (ad[0], wd[0], wd[1])


def _expert_descriptors(w, row_boxes, cols: int):
    """TMA descriptors of all experts' weights w [N, R, C] as one 2-D matrix, one per box height in `row_boxes`,
    and the layout flag RC of `kernels.common._expert_tile`: [N * R, C] in [r, cols] boxes (RC: C contiguous),
    or [C, N * R] in [cols, r] boxes (R contiguous, e.g. W_out's column view); None for any other layout or a
    misaligned one."""
    matrix = expert_matrix(w)
    if matrix is None:
        return None
    w2d, rc = matrix
    d = _tma_descriptors(w2d, expert_boxes(rc, row_boxes, cols))
    return None if d is None else d + (rc,)


def _tma_descriptors(t, boxes):
    """TMA descriptors of the 2-D `t` in each box of `boxes`, or None where its rows are not contiguous and
    16-byte aligned."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not tma_aligned(t):
        return None
    return tuple(TensorDescriptor.from_tensor(t, list(b)) for b in boxes)


def default_combine(x: torch.Tensor) -> str:
    """down_scatter's combine for tokens `x`: "buffer" (deterministic) under torch's deterministic algorithms;
    else atomic adds into the output in its own dtype ("atomic16", fastest measured on an H100/H200), except
    bf16 before Hopper, whose atomic adds would be compare-and-swap loops: fp32 ones there ("atomic32",
    native reductions on sm_80; the compiled SASS in docs/kernels.md)."""
    if torch.are_deterministic_algorithms_enabled():
        return "buffer"
    return "atomic32" if x.dtype == torch.bfloat16 and not _hopper(x) else "atomic16"


def _adds(combine: str, K: int) -> bool:
    """Whether a down (or fused) launch adds each token's K rows into a [T, Dout] target with atomics
    (else it writes every (t, k) row: "buffer", or K = 1)."""
    return combine != "buffer" and K > 1


def atomic_output(a_like: torch.Tensor, T: int, K: int, Dout: int, combine: str):
    """The [T, Dout] tensor a down (or fused) launch with `combine` adds its rows into (fp32 for "atomic32"),
    to be initialised by a launch before it (`_launch_up`'s or the routing plan's fill), or None where
    that launch writes rows instead (`_adds`)."""
    if not _adds(combine, K):
        return None
    dtype = torch.float32 if combine == "atomic32" else a_like.dtype
    return torch.empty(T, Dout, device=a_like.device, dtype=dtype)


def _target(a_like, plan, Dout: int, combine: str, out, out_bias):
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
    buf, atomic, init = _target(a, plan, Dout, combine, out, out_bias)
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
        tiles, sched = _tiles(plan, BM)
        rest = (plan.order, plan.token, gate, plan.offsets, tiles, buf, buf.stride(0), c, c.stride(0), N, Ein, Dout)
        meta = dict(SCALE=gate_flat is not None, ATOMIC=atomic, RANK1=rank1 is not None, PREC=_prec(a), SCHED=sched,
                    BM=BM, BN=BN, BK=BK, NP2=_np2(N), num_warps=nw, num_stages=ns)
        m_tiles = triton.cdiv(M, BM) + N
        num_n = triton.cdiv(Dout, BN)
        if variant in (WS, WS_PAIR):  # the Gluon kernel where it serves (kernels/down_gluon.py), else STAGED
            from .kernels import down_gluon
            if down_gluon.serves(a, w, BM, BN, ns, view, adds=atomic):
                pair = variant == WS_PAIR
                ws_tiles = _tile_list(plan, 2 * BM if pair else BM, _ws_down_group(_wide_group(Dout, a)))
                down_gluon.launch(a, w_ws(), ws_tiles, plan.offsets, plan.order, plan.token, gate, buf,
                                  c, M, gate_flat is not None, atomic, rank1 is not None, BM, BN, ns, pair=pair)
                return
            variant = STAGED
        descs = _down_descriptors(a, w, BM, BN, BK) if variant == TMA and Ein % BK == 0 and _hopper(a) else None
        if descs is not None:
            _down_tma_kernel[(m_tiles * num_n,)](*descs[:2], *rest, num_n, W_KROWS=descs[2], **meta)
            return
        num_n = 1 if variant in (ROWLOOP, STAGED) else num_n
        # STAGED's reduction tiles; fixed for the other variants, which do not read them (no extra compiles)
        be, be2 = _split_width(Ein) if variant == STAGED else (16, 0)
        _down_kernel[(m_tiles * num_n,)](*operands, *rest, num_n, EVEN_K=Ein % BK == 0, EVEN_N=Dout % BN == 0,
                                         ROWLOOP=variant == ROWLOOP, STAGED=variant == STAGED, SPLIT=be2 > 0, BE=be,
                                         BE2=max(be2, 16), **meta)

    launch(_pick(f"down:{combine}", (Ein, Dout, str(a.dtype)), launch, _hopper(a),
                 lambda: _auto_down_ws(a, w, atomic, view)))  # (positional: tests stand in for _pick with *more)
    return _combined(buf, atomic, T, K, a.dtype, out_bias)


def _combined(buf, atomic: bool, T: int, K: int, dtype, out_bias):
    """y from the down (or fused) launch's target: the atomic sums in `dtype`, or the (t, k) rows summed
    over k, plus the output bias (an atomic target started from it)."""
    if atomic:
        return buf.to(dtype)
    y = buf if K == 1 else buf.view(T, K, -1).sum(1)
    return y if out_bias is None else y.add_(out_bias.to(y.dtype))


def _split_width(E: int):
    """(BE, BE2): E's columns as one power-of-two tile of BE >= 16 plus, when E is not one, a second of
    BE2 (a power of two >= 16; 0 = none): 192 -> (128, 64), 256 -> (256, 0), 24 -> (16, 16)."""
    be = max(16, 1 << (E.bit_length() - 1))
    rest = E - be
    return be, (0 if rest <= 0 else _np2(rest))


def _mlp_descriptors(w1, w2, BN, BK, be, be2):
    """(W1 and its second tile, W1's RC, W2 and its second tile, W2's RC) TMA descriptors for the fused forward
    (variant TMA, kernels/mlp.py; `_expert_descriptors`), or None where they cannot serve: E must be exactly the
    one or two column tiles (be + be2), so that no box reaches into the next expert's rows, and w1 without a
    gate half (F1 = E)."""
    if be + be2 != w2.shape[1] or w1.shape[1] != w2.shape[1]:
        return None
    boxes = (be, be2 or be)
    up, down = _expert_descriptors(w1, boxes, BK), _expert_descriptors(w2, boxes, BN)
    return None if up is None or down is None else up + down


def mlp_forward(x, w1, b1, w2, plan, gate_flat, activation, save_h: bool, combine: str, out=None, out_bias=None):
    """(y, h when save_h): up GEMM, activation and down GEMM fused per M-tile (`kernels/mlp.py`), the same
    function as up_forward + down_scatter. `out`/`out_bias` as down_scatter's (`out`: initialised by the
    routing plan's fill)."""
    act, glu = ACT_CODES[activation]
    M, N, T, K = plan.num_rows, plan.num_experts, plan.num_tokens, plan.top_k
    F1, D = w1.shape[1], w1.shape[2]
    E, Dout = w2.shape[1], w2.shape[2]
    buf, atomic, init = _target(x, plan, Dout, combine, out, out_bias)
    h = torch.empty(M, F1, device=x.device, dtype=x.dtype) if save_h else buf
    bias = b1 if b1 is not None else buf
    be, be2 = _split_width(E)
    wb = _ws_boxes(E)  # the Gluon kernel's boxes (8B's E = 256 as 128 + 128: at most 128 columns each)
    order = None if glu else _wide_group(Dout, x)

    def eager_key():  # `_auto_mlp_ws`'s cheap key of this launch (shapes), built only where `auto` consults it
        return x.device, x.dtype, tuple(x.shape), M, tuple(w1.shape), tuple(w2.shape), act, atomic, save_h

    def ws_key(cfg):  # kernels/gluon_launches.key of this launch with tile `cfg`
        from .kernels import gluon_launches
        return gluon_launches.key((x, w1, b1, w2, plan.offsets, plan.order, plan.token, gate_flat,
                                     h if save_h else None, buf), act, atomic, _tile_groups(order), cfg)

    def launch(cfg):
        BM, BN, BK, nw, ns = cfg[:5]
        if init:
            init()
        if cfg[5:] == (WS,):  # the Gluon kernel where it serves (kernels/mlp_gluon.py), else the pointer loads
            from .kernels import gluon_launches, mlp_gluon
            if mlp_gluon.serves(x, w1, w2, act, glu, BM, BN, BK, nw, ns, *wb):  # (nw: the weight ring's depth)
                tiles = _tile_list(plan, BM, _tile_groups(order))
                mlp_gluon.launch(x, w1, b1, w2, tiles, plan.offsets, plan.order, plan.token, gate_flat,
                                 h if save_h else None, buf, act, atomic, BM, BN, BK, nw, ns, *wb)
                gluon_launches.note(ws_key(cfg), eager_key(), x)
                return
        descs = _mlp_descriptors(w1, w2, BN, BK, be, be2) if cfg[5:] == (TMA,) and _hopper(x) else None
        tiles, sched = _tiles(plan, BM, order)
        _mlp_kernel[(triton.cdiv(M, BM) + N,)](
            x, x.stride(0), w1, w1.stride(0), w1.stride(1), w1.stride(2), bias, bias.stride(0),
            w2, w2.stride(0), w2.stride(1), w2.stride(2), plan.token, plan.order, gate_flat, plan.offsets, tiles,
            h, h.stride(0), buf, buf.stride(0), *(descs[:2] + descs[3:5] if descs else (None,) * 4), N, D, E, Dout,
            ACT=act, GLU=glu, HAS_BIAS=b1 is not None, SAVE_H=save_h, ATOMIC=atomic, EVEN_K=D % BK == 0,
            PREC=_prec(x), SCHED=sched, SPLIT=be2 > 0, WTMA=descs is not None, W1_RC=bool(descs and descs[2]),
            W2_RC=bool(descs and descs[5]),
            BM=BM, BE=be, BE2=max(be2, 16), BK=BK, BN=BN, NP2=_np2(N), num_warps=nw, num_stages=ns)

    launch(_pick("mlp_glu" if glu else "mlp", (D, E, Dout, str(x.dtype)), launch, _hopper(x),
                 auto=lambda: _auto_mlp_ws(x, w1, w2, act, glu, *wb, eager_key, ws_key)))
    return _combined(buf, atomic, T, K, x.dtype, out_bias), (h if save_h else None)


_FOLD_CODES = {None: 0, "rows": 1, "expert": 2, "pairs": 3}  # kernels/wgrad.py's FOLD (3: kernels/wgrad_gluon.py's)


def _zeroed(dw: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The zeroed target of a weight gradient's partial sums in `dtype`: dW itself when of that dtype, else a buffer
    with dW's strides, so that its copy into a strided dW (W_out's [N, E, D] view) is one dense, vectorised pass,
    not an elementwise one (40 us of the GPT-base layer in bf16, v15)."""
    out = dw if dw.dtype == dtype else torch.empty_strided(dw.shape, dw.stride(), device=dw.device, dtype=dtype)
    return out.zero_()


def _reduces_allowed() -> bool:
    """Whether the WS wgrad's balanced items may add by TMA reduces (SSD_WGRAD_TMA_OUT=0: fp32 atomics instead, for
    A/Bs and tests); part of its launch key, as it picks the kernel's specialisation."""
    return os.environ.get("SSD_WGRAD_TMA_OUT", "1") != "0"


def _switch(name: str, default: str, on: str, off: str) -> bool:
    """A 0/1 kernel switch's value (`default` when unset); any other value is a one-line UserError naming the variable
    and what 1 (`on`) and 0 (`off`) mean."""
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        from ...errors import UserError
        mark = {v: ", the default" if v == default else "" for v in ("0", "1")}
        raise UserError(f"{name}={value!r}: accepted: 1 ({on}{mark['1']}), 0 ({off}{mark['0']})")
    return value == "1"


def _half_sums() -> bool:
    """SSD_WGRAD_HALF_SUMS=1 (the default): the WS wgrad's TMA reduces add into a bf16/fp16 dW itself
    (kernels/wgrad_gluon.py's half sums; H100, base ReLU layer fwd+bwd with the WS wgrad in both arms, three
    rounds: 0.7096 / 0.7189 / 0.7182 -> 0.6784 / 0.6790 / 0.6789 ms, docs/kernels.md v26); 0: into an fp32
    buffer, cast after. Part of its launch keys."""
    return _switch("SSD_WGRAD_HALF_SUMS", "1", "in dW's bf16/fp16", "fp32 sums")


def _router_sums() -> bool:
    """SSD_WGRAD_ROUTER_SUMS=1 (the default): a "pairs" router term is summed in the Gluon dW1 kernel where it serves
    (`wgrad`'s fold; kernels/wgrad_gluon.py's FOLD 3); 0: torch's GEMM, added per expert, as elsewhere."""
    return _switch("SSD_WGRAD_ROUTER_SUMS", "1", "in the Gluon kernel", "torch's GEMM")


def _up_bwd_tma_stores() -> bool:
    """SSD_TRITON_UP_BWD_TMA_STORES=1 (the default): the WS up_bwd stores dh and gate * a by TMA from h's
    shared-memory slots (kernels/up_bwd_gluon.py `_put`; H100, docs/kernels.md v28, base ReLU up_backward alone
    123.8 / 123.4 us against 143.9 / 142.6 with 0); 0: 4-byte stores from the accumulator's layout. Part of its
    launch keys."""
    return _switch("SSD_TRITON_UP_BWD_TMA_STORES", "1", "TMA stores", "pointer stores")


def _ws_boxes(P: int):
    """The Gluon WS kernels' column boxes of an expert's P (or E) columns: `_split_width`'s below 256 (base's 192 =
    128 + 64), else two of 128, for the wgrad a wider P in slices of 256 (kernels/wgrad_gluon.launch; SwiGLU 8B's
    dW1, P = 512: `auto`'s, v34). Their consumers then hold two m64n128 accumulators in the 16-warp layout: for the
    wgrad, one m64n256 box took 12 warps (two R loader warps) and lost at 8B (docs/kernels.md v22, v26). H200, v33,
    8B ReLU layer fwd+bwd (graphed, seven A/B rounds, the WS wgrad forced): kernels/wgrad.py 7.83-7.94 ms, two boxes
    7.48-7.72, one box 8.63-8.69. The fused forward and up_bwd take 8B's E = 256 so too when forced; both lost at 8B
    ReLU (H100, v34: 8.04-8.23 ms -> 8.58-8.78 with the forward, 9.24-9.35 with both), so `auto` keeps them to
    base-like shapes."""
    return (128, 128) if P >= 256 else _split_width(P)


def check_switches() -> None:
    """Parse every SSD_* switch of these kernels that is set, so that a malformed value fails where the backend is
    built, not inside a compiled step (each raises a one-line UserError naming the variable)."""
    from .kernels import routing_plan, score_grad
    if os.environ.get("SSD_TRITON_CONFIG"):
        env_configs()
    for var in ("SSD_TRITON_TILE_ORDER", "SSD_TRITON_WS_DOWN_ORDER"):
        if os.environ.get(var):
            _tile_groups(var=var)
    _half_sums()
    _router_sums()
    _up_bwd_tma_stores()
    score_grad.enabled(0)
    routing_plan.fill_place(0)


def _sums_dtype(dw: torch.Tensor) -> torch.dtype:
    """The dtype the WS wgrad's balanced items add their partial sums in by TMA reduces: dW's own with half sums
    and a bf16/fp16 dW, else fp32 (dW itself when fp32, else a buffer)."""
    return dw.dtype if dw.dtype in (torch.bfloat16, torch.float16) and _half_sums() else torch.float32


def _wgrad_ws(lhs, rhs, plan, dw, fold_kind, coef, fold_p: int, ch: int, BQ: int, BK: int, l_stages: int,
              r_stages: int, state: dict) -> bool:
    """The warp-specialised Gluon wgrad (kernels/wgrad_gluon.py), if it serves; True if launched. With ch > 0 its
    balanced items (equal row segments of at least ch rows) add into a zeroed dW (by TMA reduces in `_sums_dtype`,
    else by fp32 atomics: dW itself when of that dtype, else a buffer with its strides, copied by the caller);
    else each expert's rows per program, stored into dW."""
    from .kernels import score_grad, wgrad_gluon
    be, be2 = _ws_boxes(lhs.shape[1])
    def tile(target, fold):
        return lhs, rhs, target, fold, ch > 0, BQ, BK, l_stages, r_stages, be, be2

    # a "pairs" term summed in the kernel (FOLD 3) where that fits, else added per expert (FOLD 2)
    for kind in ((fold_kind, "expert") if fold_kind == "pairs" else (fold_kind,)):
        fold = _FOLD_CODES[kind]
        sums = _sums_dtype(dw) if ch else dw.dtype
        # the balanced items' adds as TMA reduces where allowed and dW's layout and shared memory serve
        tma_out = ch > 0 and _reduces_allowed() and _ws_reduces(dw, tile(sums, fold))
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
    `_sums_dtype`). A 7th config entry of 1 loads lhs by TMA (kernels/wgrad.py).
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
        fold = fold if _router_sums() else expert_fold(fold)
    fold_kind, coef, fold_p = fold if fold is not None else (None, lhs, 0)
    state = {}

    def eager_key():  # `_auto_wgrad_ws`'s cheap key of this launch (shapes and the switches that pick the kernel's
        # specialisation: an A/B arm that flips one needs its own eager launch to load that module), built only where
        # `auto` consults it
        return (lhs.device, lhs.dtype, tuple(lhs.shape), tuple(rhs.shape), tuple(dw.shape), dw.stride(), dw.dtype,
                fold_kind, _reduces_allowed(), _half_sums())

    def ws_key(cfg):  # kernels/gluon_launches.key of this launch with tile `cfg`
        from .kernels import gluon_launches
        return gluon_launches.key((lhs, rhs, plan.offsets, plan.token, coef[0] if fold_kind == "pairs" else coef, dw),
                                  fold_kind, fold_p, split, cfg, _reduces_allowed(), _half_sums())

    def launch(cfg):
        BP, BQ, BK, nw, ns = cfg[:5]
        ch = cfg[5] if split and len(cfg) > 5 else 0
        if cfg[6:] == (WS,):  # the Gluon kernel where it serves (kernels/wgrad_gluon.py), else LTMA's pointer loads
            if not gathered and _wgrad_ws(lhs, rhs, plan, dw, fold_kind, coef, fold_p, ch, BQ, BK, nw, ns, state):
                from .kernels import gluon_launches
                gluon_launches.note(ws_key(cfg), eager_key(), lhs)
                return
            nw = 4  # (the L ring's depth is no warp count: kernels/wgrad.py's 4, by TMA)
            cfg = cfg[:3] + (nw,) + cfg[4:6] + (1,)
        kind, c, _ = expert_fold((fold_kind, coef, fold_p))
        # a tile as tall as P: all of P per program, as one or two power-of-two tiles (kernels/wgrad.py)
        bp, bp2 = _split_width(P) if BP >= P else (BP, 0)
        num_p, num_q = triton.cdiv(P, BP), triton.cdiv(Q, BQ)
        # with chunks, the grid is an upper bound on the (expert, chunk) pairs, as for the M-tiles
        num_t = triton.cdiv(plan.num_rows, ch) + N if ch else N
        out = _zeroed(dw) if ch else dw
        descs = None
        if kind != "rows" and _operand_tma(cfg, lhs):
            descs = _tma_descriptors(lhs, ([BK, bp], [BK, max(bp2, 16)]))
        _wgrad_kernel[(num_t * num_p * num_q,)](
            lhs, lhs.stride(0), rhs, rhs.stride(0), plan.token, plan.offsets, c, fold_p,
            out, out.stride(0), out.stride(1), out.stride(2), N, P, Q, num_p, num_q, *(descs or (None, None)),
            GATHER=not gathered, PREC=_prec(lhs), SPLIT=bool(ch), FOLD=_FOLD_CODES[kind], SPLIT_P=bp2 > 0,
            LTMA=descs is not None, BP=bp, BP2=max(bp2, 16), BQ=BQ, BK=BK, CH=max(ch, BK), NP2=_np2(N),
            num_warps=nw, num_stages=ns)
        state["out"] = out

    launch(_pick("wgrad" if not gathered else "wgrad_mat", (P, Q, str(lhs.dtype)), launch, _hopper(lhs),
                 auto=lambda: _auto_wgrad_ws(lhs, rhs, dw, fold_kind, split, gathered, eager_key, ws_key)))
    if state["out"] is not dw:
        dw.copy_(state["out"])
    return dw
