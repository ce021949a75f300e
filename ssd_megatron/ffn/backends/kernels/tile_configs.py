"""Tile configurations of the `triton` backend's launches: each kernel kind's default tile (the sweeps' winners in
docs/kernels.md), its tuning candidates (SSD_TRITON_TUNE=1), the overrides (`force_config`, SSD_TRITON_CONFIG), and
how a launch picks among them (`pick_tile`); also the column boxes an expert's width is split into."""
from __future__ import annotations

import os

from .common import np2


# (BM|BP, BN|BQ, BK, num_warps, num_stages[, variant]). variant: down 1 = ROWLOOP (a program covers all
# output columns), 3 = TMA (descriptor loads), 4 = STAGED (ROWLOOP from A rows loaded once; BK unused),
# 5 = WS (STAGED as a warp-specialised Gluon kernel, kernels/down_gluon.py: `auto`'s for base ReLU's dx with
# Triton >= 3.9, AUTO_WS_BOXES; BK and WARPS unused, STAGES = its W ring; STAGED where a forced WS does not serve),
# 6 = WS_PAIR (the same kernel over M-tiles of 2 * BM rows, each consumer taking BM of them over every column block
# on the same W tile as the other: `auto`'s for 8B's dx, AUTO_WS);
# mlp 3 = TMA (the weights' tiles by TMA where the descriptors serve, `mlp_launch._mlp_descriptors`), 5 = WS (the fused
# forward as a warp-specialised Gluon kernel, kernels/mlp_gluon.py: `auto`'s for captured inference forwards at
# base-like shapes with Triton >= 3.9, AUTO_MLP_WS; WARPS is then the depth of its weight ring (W1's and W2's
# tiles), STAGES its x ring's; kernels/mlp.py where it does not serve);
# up_bwd[_glu] 1 = TWO_PASS (the GEMM, then its epilogue in a launch of EPILOGUE_TILE); up_bwd 5 = WS (a
# warp-specialised Gluon kernel, kernels/up_bwd_gluon.py, Triton >= 3.9, no gate: BN unused, WARPS and STAGES the
# depths of its W2 and dy rings; the default tile where it does not serve); a seventh entry of 1
# (up kinds: 8B's GLU ones by default on Hopper, elsewhere opt-in) = their weights' tiles by TMA;
# wgrad n = split each expert's reduction into chunks of n rows (0 = none), and a seventh entry of 1 = its
# left operand by TMA (Hopper's default) or 5 = WS (a warp-specialised Gluon kernel, kernels/wgrad_gluon.py,
# Triton >= 3.9: `auto`'s choice at base, `auto_ws.auto_wgrad_ws`; BP unused, BQ 128, WARPS and STAGES the depths
# of its L and R rings, n > 0 its balanced items (equal row segments of all experts' rows, each at least n rows);
# LTMA where it does not serve); a wgrad BP >= P makes each program cover all of P (kernels/wgrad.py), an up
# BN >= E all of E (`up_launch.up_columns`). Defaults are chosen per kernel from the sweeps recorded in
# docs/kernels.md; `SSD_TRITON_TUNE=1` times the candidates once per shape key instead.
ROWLOOP, TMA, STAGED, WS = 1, 3, 4, 5  # down variants (2 was PERSISTENT, slower and removed: docs/kernels.md v8)
WS_PAIR = 6  # down variant: WS over M-tiles of 2 * BM rows, the two consumers sharing each W tile (down_gluon.launch)
TMA_OPERAND = ("up", "up_glu", "up_bwd", "up_bwd_glu", "wgrad")  # kinds whose configs take a seventh entry
TWO_PASS = 1  # up_bwd variant: the GEMM, then its epilogue in a second launch (kernels/up.py)
EPILOGUE_TILE = (64, 64, 16, 4, 1)  # that second launch's (BM, BN, -, warps, stages): elementwise work
DEFAULTS = {
    "up": (128, 256, 64, 8, 3),           # BN >= E: all of E per program (base: 128 + 64 columns, up_columns)
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
TUNED: dict = {}
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
        _ENV_PARSED[text] = parse_configs(text)
    return _ENV_PARSED[text]


def parse_configs(text: str) -> dict:
    from ....errors import UserError

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


def default_tile(base: str, key: tuple, hopper: bool = True):
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


def pick_tile(kind: str, key: tuple, launch, hopper: bool = True, auto=None):
    """The config for `kind` at `key` (on a Hopper GPU or not); when tuning, time each candidate once with
    `launch(cfg)`. `auto()`: a default that depends on the operands (None where the table's serves)."""
    base = kind.split(":")[0]
    for table in (_FORCED, env_configs()):
        if kind in table or base in table:
            return table.get(kind, table.get(base))
    if not _tuning() or os.environ.get("TRITON_INTERPRET") == "1":
        return (auto and auto()) or default_tile(base, key, hopper)
    k = (kind,) + key
    if k not in TUNED:
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
        TUNED[k] = CANDIDATES[base][min(range(len(times)), key=times.__getitem__)]
    return TUNED[k]


def split_width(E: int):
    """(BE, BE2): E's columns as one power-of-two tile of BE >= 16 plus, when E is not one, a second of
    BE2 (a power of two >= 16; 0 = none): 192 -> (128, 64), 256 -> (256, 0), 24 -> (16, 16)."""
    be = max(16, 1 << (E.bit_length() - 1))
    rest = E - be
    return be, (0 if rest <= 0 else np2(rest))


def ws_boxes(P: int):
    """The Gluon WS kernels' column boxes of an expert's P (or E) columns: `split_width`'s below 256 (base's 192 =
    128 + 64), else two of 128, for the wgrad a wider P in slices of 256 (kernels/wgrad_gluon.launch; SwiGLU 8B's
    dW1, P = 512: `auto`'s, v34). Their consumers then hold two m64n128 accumulators in the 16-warp layout: for the
    wgrad, one m64n256 box took 12 warps (two R loader warps) and lost at 8B (docs/kernels.md v22, v26). H200, v33,
    8B ReLU layer fwd+bwd (graphed, seven A/B rounds, the WS wgrad forced): kernels/wgrad.py 7.83-7.94 ms, two boxes
    7.48-7.72, one box 8.63-8.69. The fused forward and up_bwd take 8B's E = 256 so too when forced; both lost at 8B
    ReLU (H100, v34: 8.04-8.23 ms -> 8.58-8.78 with the forward, 9.24-9.35 with both), so `auto` keeps them to
    base-like shapes."""
    return (128, 128) if P >= 256 else split_width(P)
