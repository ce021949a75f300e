"""Every fast backend == the reference (forward and all grads) on CUDA. Skipped without a GPU.

Run on the device machine by tools/gpu_bench.sh. Truth is the reference backend in float64 on the
same (rounded) inputs; tolerances are norm-relative: bf16 3e-2 (a bf16 reference lands near 5e-3),
fp32 1e-4.
"""
import pytest
import torch

from .backend_cases import (Compiled, compare, expert_major_sparse_ffn, fresh_gluon_records, make_inputs, rel_err, run,
                            run_router, upcast, with_column_view_w2)
from ssd_megatron.ffn.activations import ACTIVATIONS
from ssd_megatron.ffn.backends import ReferenceBackend, available_backends, get_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run via tools/gpu_bench.sh)")
FAST = ("grouped_mm", "triton", "megablocks")
AVAILABLE = available_backends("cuda") if torch.cuda.is_available() else []

SMALL = dict(T=300, D=128, E=64, N=8, K=2)
CASES = [dict(activation=a, **SMALL) for a in ACTIVATIONS] + [
    dict(activation="relu", T=300, D=128, E=64, N=8, K=3, routing="skewed"),
    dict(activation="relu", T=300, D=128, E=64, N=8, K=2, routing="empty"),
    dict(activation="gelu", T=257, D=96, E=48, N=6, K=1),                  # K=1; D, E not tile multiples
    dict(activation="swiglu", T=131, D=64, E=32, N=4, K=4, bias=False),    # K=N
    dict(activation="relu", T=1, D=64, E=32, N=4, K=2),                    # one token
    dict(activation="squared_relu", T=2048, D=768, E=192, N=32, K=6, routing="skewed"),  # base-like
    dict(activation="swiglu", T=1024, D=768, E=192, N=32, K=6),
    # rows 2048 wide: `auto` takes grouped token windows for the fused forward (non-GLU, Hopper)
    dict(activation="relu", T=1024, D=2048, E=256, N=24, K=6, routing="skewed"),
    dict(activation="swiglu", T=512, D=2048, E=128, N=16, K=4),
]
IDS = [f"{c['activation']}-T{c['T']}-N{c['N']}K{c['K']}-{c.get('routing', 'random')}" for c in CASES]


def _check(backend, case, dtype, tol):
    if backend not in AVAILABLE:
        pytest.skip(f"{backend} not available here")
    if backend == "megablocks" and dtype != torch.bfloat16:
        pytest.skip("megablocks is bf16-only")
    inp = make_inputs(device="cuda", dtype=dtype, **case)
    want = run(ReferenceBackend(), upcast(inp))
    got = run(get_backend(backend), inp)
    errs = compare(got, want, tol)
    print(backend, case, dtype, {k: f"{v:.1e}" for k, v in errs.items()})


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", FAST)
def test_bf16_matches_reference(backend, case):
    _check(backend, case, torch.bfloat16, 3e-2)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[8]], ids=[IDS[0], IDS[3], IDS[8]])
@pytest.mark.parametrize("backend", FAST)
def test_fp32_matches_reference(backend, case):
    _check(backend, case, torch.float32, 1e-4)


@pytest.mark.parametrize("opts", [{"combine": "atomic16"}, {"combine": "atomic32", "wgrad": "triton_mat"},
                                  {"wgrad": "gmm"}], ids=["atomic16", "atomic32-mat", "gmm"])
@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[9], CASES[12]], ids=[IDS[0], IDS[5], IDS[9], IDS[12]])
def test_triton_variants_bf16(case, opts):
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    inp = make_inputs(device="cuda", dtype=torch.bfloat16, **case)
    compare(run(TritonBackend(**opts), inp), run(ReferenceBackend(), upcast(inp)), 3e-2)


KERNEL_VARIANTS = {  # forced tile configs of the non-default kernel variants (see kernels/tile_configs.py DEFAULTS)
    "down-rowloop": {"down": (128, 128, 64, 4, 3, 1)},
    "down-plain": {"down": (128, 128, 64, 8, 3)},
    "down-tma": {"down": (128, 128, 64, 8, 3, 3)},
    "down-staged": {"down": (64, 64, 64, 4, 2, 4)},
    # "backend": TritonBackend options (the up kernels run in the forward only when it is not fused)
    "up-small": {"up": (64, 64, 64, 4, 4), "up_glu": (64, 64, 64, 4, 4), "up_bwd": (64, 64, 64, 4, 4),
                 "up_bwd_glu": (128, 64, 64, 4, 4), "backend": {"fused_forward": False}},
    "up-whole-e": {"up": (128, 256, 64, 8, 3), "up_bwd": (64, 256, 64, 8, 3), "up_bwd_glu": (64, 256, 64, 8, 3),
                   "backend": {"fused_forward": False}},  # BN >= E: all of E per program (192 = 128 + 64)
    "up-bwd-two-pass": {"up_bwd": (128, 256, 64, 8, 3, 1), "up_bwd_glu": (128, 128, 64, 8, 3, 1)},
    "wgrad-split": {"wgrad": (64, 128, 128, 4, 3, 256)},
    "wgrad-whole-p": {"wgrad": (256, 128, 64, 8, 3)},  # BP >= P: all of P per program (192 = 128 + 64)
    "wgrad-whole-p-split": {"wgrad": (256, 64, 64, 8, 3, 256)},
    "both-small": {"down": (64, 64, 32, 4, 2, 1), "wgrad": (64, 64, 32, 4, 2, 64)},
}


@pytest.mark.parametrize("case", [CASES[0], CASES[8], CASES[11], CASES[12]], ids=[IDS[0], IDS[8], IDS[11], IDS[12]])
@pytest.mark.parametrize("variant", list(KERNEL_VARIANTS))
def test_triton_kernel_variants_bf16(case, variant):
    """The kernel variants (plain, ROWLOOP, TMA and STAGED down, other up/up_bwd tiles, the row-chunk split
    and whole-P wgrad; compiled, bf16) against the reference."""
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    inp = make_inputs(device="cuda", dtype=torch.bfloat16, **case)
    cfgs = dict(KERNEL_VARIANTS[variant])
    opts = cfgs.pop("backend", {})
    tc.force_config(**cfgs)
    try:
        compare(run(TritonBackend(**opts), inp), run(ReferenceBackend(), upcast(inp)), 3e-2)
    finally:
        tc.force_config()


# down variants 5 and 6 (WS and WS_PAIR, kernels/down_gluon.py: Gluon, sm_90, Triton >= 3.9) where they serve: Ein
# (E for the forward's down, F1 for dx) one or two power-of-two boxes (base's 192 = 128 + 64), contiguous bf16
# weights. Skewed loads, experts with no tokens, M = T * K not a multiple of the 64-row tile, D not a multiple of the
# 64-column block (200), one token
# tiles: auto's at 8B (128 x 64 x 2 in pairs: 256-row M-tiles, variant 6) and at base (128 x 64 x 3, where its shared
# memory fits: not 8B's Ein = 256), and the others in pairs too
DOWN_WS_TILES = {"64x64x3": (64, 64, 64, 4, 3, 5), "128x64x2": (128, 64, 64, 4, 2, 5),
                 "128x64x3": (128, 64, 64, 4, 3, 5), "pairs-64x64x3": (64, 64, 64, 4, 3, 6),
                 "pairs-128x64x2": (128, 64, 64, 4, 2, 6), "pairs-128x64x3": (128, 64, 64, 4, 3, 6)}
WS_CASES = [dict(activation="relu", T=300, D=128, E=64, N=8, K=3, routing="skewed"),
            dict(activation="relu", T=333, D=200, E=64, N=8, K=2, routing="empty"),
            dict(activation="relu", T=1000, D=512, E=256, N=16, K=4, routing="skewed"),  # 8B's E = 256
            dict(activation="relu", T=500, D=256, E=192, N=8, K=3, routing="skewed"),  # base's 192 = 128 + 64
            dict(activation="relu", T=1, D=128, E=64, N=4, K=2),
            dict(activation="swiglu", T=257, D=256, E=128, N=8, K=2, routing="skewed"),  # dx's Ein = 2E = 256
            # SwiGLU 8B's E: dx's Ein = 512 in two passes of 256 (`down_gluon.ein_passes`; atomic combines only)
            dict(activation="swiglu", T=300, D=320, E=256, N=8, K=3, routing="skewed")]
WS_IDS = [f"{c['activation']}-T{c['T']}-D{c['D']}-E{c['E']}-N{c['N']}K{c['K']}-{c.get('routing', 'random')}"
          for c in WS_CASES]
# TritonBackend options: the unfused forward (its down launch takes the WS kernel too), the combines
# (bf16 atomic adds, fp32 ones, the (t, k) rows stored), y initialised by the up kernel, the router folded
# into dx (the rank-1 term), W2 as W_out's column view read in place by TMA or copied row-major (w2_view)
WS_OPTS = {"atomic16": {"combine": "atomic16"}, "atomic32": {"combine": "atomic32"}, "buffer": {"combine": "buffer"},
           "fold-output": {"combine": "atomic16", "fold_output": True}, "router-fold": {"combine": "atomic16"},
           "view-tma": {"combine": "atomic16", "w2_view": "tma"}, "view-copy": {"combine": "buffer", "w2_view": "copy"}}


@pytest.mark.parametrize("order", ["auto", "token:3"])
@pytest.mark.parametrize("tile", list(DOWN_WS_TILES))
@pytest.mark.parametrize("opts", list(WS_OPTS))
@pytest.mark.parametrize("case", WS_CASES, ids=WS_IDS)
def test_triton_down_ws_bf16(case, opts, tile, order, monkeypatch):
    """The warp-specialised Gluon down kernel (down variant 5, and 6 in pairs) in the forward's down and dx against
    the reference, forward and every grad, at each tile, in expert order and in token windows of 3 experts
    (SSD_TRITON_WS_DOWN_ORDER); each launch is checked to have taken it (not the STAGED fallback)."""
    DOWN_WS = DOWN_WS_TILES[tile]
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends.kernels import down_gluon, tile_configs as tc
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    probe = torch.zeros(64, 64, device="cuda", dtype=torch.bfloat16)
    if not down_gluon.serves(probe, torch.zeros(2, 64, 64, device="cuda", dtype=torch.bfloat16), *DOWN_WS[:2],
                             DOWN_WS[4]):
        pytest.skip("the WS down kernel does not serve here (needs sm_90 and Triton >= 3.9's Gluon): "
                    "variant 5 falls back to STAGED")
    ein = case["E"] * (2 if case["activation"] == "swiglu" else 1)  # (dx's; the forward's down has E)
    width = ein // down_gluon.ein_passes(ein)  # (each pass's slice of dx's Ein)
    if down_gluon.smem_bytes(*DOWN_WS[:2], max(width, case["E"]), DOWN_WS[4]) > down_gluon.SMEM_LIMIT:
        pytest.skip(f"tile {tile} does not fit shared memory at Ein = {width}: variant 5 falls back to STAGED")
    launches = []
    real = down_gluon.launch

    def counted(*args, **kwargs):
        launches.append(args[10:13] + (kwargs["pair"],))  # (scale, atomic, rank1, pairs)
        return real(*args, **kwargs)

    monkeypatch.setattr(down_gluon, "launch", counted)
    monkeypatch.setenv("SSD_TRITON_WS_DOWN_ORDER", order)
    inp = make_inputs(device="cuda", dtype=torch.bfloat16, **case)
    if opts.startswith("view"):
        inp = with_column_view_w2(inp)
    be = TritonBackend(fused_forward=False, **WS_OPTS[opts])
    tc.force_config(down=DOWN_WS)
    try:
        if opts == "router-fold":
            got = run_router(be, inp, fold=True)
            want = run_router(ReferenceBackend(), upcast(inp), fold=False)
        else:
            got, want = run(be, inp), run(ReferenceBackend(), upcast(inp))
        errs = compare(got, want, 3e-2)
    finally:
        tc.force_config()
    atomic = WS_OPTS[opts]["combine"] != "buffer"  # (K > 1 in every case)
    # the forward's down (scaled by the gate; with the router folded, a gate of ones), then dx (in passes: only where
    # it adds into dx)
    pair = DOWN_WS[5] == tc.WS_PAIR
    dx = [(False, atomic, opts == "router-fold", pair)] if atomic or width == ein else []
    assert launches == [(True, atomic, False, pair)] + dx, launches
    print("down ws", case, opts, {k: f"{v:.1e}" for k, v in errs.items()})


@pytest.mark.parametrize("w2_view", ["fallback", "copy", "tma"])
def test_triton_w2_view_gives_the_forward_down_the_ws_kernel(w2_view, monkeypatch):
    """W_out's column view in the unfused forward (SwiGLU's; rows >= 2048 wide, where `auto` takes the WS kernel in
    pairs): with w2_view "copy" the forward's down takes the WS kernel on a row-major copy, with "tma" on the view
    itself, with "fallback" the Triton kernel; dx (W_in's rows, row-major) takes it either way; all equal the
    reference, forward and every grad."""
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends.kernels import auto_ws, down_gluon
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    probe = torch.zeros(64, 64, device="cuda", dtype=torch.bfloat16)
    if not down_gluon.serves(probe, torch.zeros(2, 64, 64, device="cuda", dtype=torch.bfloat16),
                             *auto_ws.AUTO_WS[:2], auto_ws.AUTO_WS[4]):
        pytest.skip("the WS down kernel does not serve here (needs sm_90 and Triton >= 3.9's Gluon)")
    launches = []
    real = down_gluon.launch

    def counted(*args, **kwargs):
        launches.append((args[10], args[1].is_contiguous()))  # the gate scale (the forward's down), W's layout
        return real(*args, **kwargs)

    monkeypatch.setattr(down_gluon, "launch", counted)
    inp = with_column_view_w2(make_inputs(device="cuda", dtype=torch.bfloat16, activation="swiglu", T=300, D=2048,
                                          E=128, N=8, K=2, routing="skewed"))
    errs = compare(run(TritonBackend(w2_view=w2_view), inp), run(ReferenceBackend(), upcast(inp)), 3e-2)
    forward = {"fallback": [], "copy": [(True, True)], "tma": [(True, False)]}[w2_view]
    assert launches == forward + [(False, True)], launches
    print("w2 view", w2_view, {k: f"{v:.1e}" for k, v in errs.items()})


# mlp variant 5 (WS, kernels/mlp_gluon.py: the fused forward in Gluon, sm_90, Triton >= 3.9) where it serves: E
# exactly one or two power-of-two tiles (64; 192 = 128 + 64; 256), D a multiple of BK, no gate. Skewed loads,
# experts with no tokens, M not a multiple of the 128-row tile, D = 192 and 64 (which the 128-column tile, BN = BK
# = 128, does not serve), one token; W_out's column view and contiguous weights; the activations without a gate.
# BN = BK: W1's and W2's tiles share the weight ring's slots; the 64-column tile is the opt-in one (v20)
MLP_WS_TILES = {"64-cols": (128, 64, 64, 6, 4, 5), "128-cols": (128, 128, 128, 2, 2, 5)}
MLP_WS_CASES = [dict(activation="relu", T=300, D=128, E=64, N=8, K=3, routing="skewed"),
                dict(activation="relu", T=333, D=192, E=192, N=8, K=2, routing="empty"),  # base's E = 128 + 64
                dict(activation="relu", T=1000, D=512, E=256, N=16, K=4, routing="skewed"),  # 8B's: 128 + 128
                dict(activation="relu", T=1, D=128, E=64, N=4, K=2),
                dict(activation="gelu", T=257, D=256, E=192, N=8, K=2, routing="skewed"),
                dict(activation="squared_relu", T=129, D=64, E=64, N=4, K=3),
                dict(activation="gelu_tanh", T=200, D=128, E=128, N=8, K=2, bias=False)]
MLP_WS_IDS = [f"{c['activation']}-T{c['T']}-D{c['D']}-E{c['E']}-N{c['N']}K{c['K']}-{c.get('routing', 'random')}"
              for c in MLP_WS_CASES]


@pytest.mark.parametrize("w2", ["column-view", "contiguous"])
@pytest.mark.parametrize("tile", list(MLP_WS_TILES))
@pytest.mark.parametrize("combine", ["atomic16", "atomic32", "buffer"])
@pytest.mark.parametrize("case", MLP_WS_CASES, ids=MLP_WS_IDS)
def test_triton_mlp_ws_bf16(case, combine, tile, w2, monkeypatch):
    """The warp-specialised Gluon fused forward (mlp variant 5) against the reference, forward and every grad
    (the backward reads the h it stored), at each tile, combine and W2 layout; each forward is checked to have
    taken it (not kernels/mlp.py)."""
    cfg = MLP_WS_TILES[tile]
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends.kernels import mlp_gluon, tile_configs as tc
    from ssd_megatron.ffn.backends.kernels.common import ACT_CODES
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    if mlp_gluon._build_once() is None or not mlp_gluon.down_gluon._sm90(torch.zeros(1, device="cuda")):
        pytest.skip("the WS fused forward does not serve here (needs sm_90 and Triton >= 3.9's Gluon): "
                    "variant 5 falls back to kernels/mlp.py")
    inp = make_inputs(device="cuda", dtype=torch.bfloat16, **case)
    if w2 == "column-view":
        inp = with_column_view_w2(inp)
    act = ACT_CODES[case["activation"]][0]
    if not mlp_gluon.serves(inp["x"], inp["w1"], inp["w2"], act, False, *cfg[:5], *tc.ws_boxes(case["E"])):
        pytest.skip("variant 5 falls back to kernels/mlp.py here: buffers beyond shared memory")
    launches = []
    real = mlp_gluon.launch

    def counted(*args, **kwargs):
        launches.append(args[11:13])  # (act, atomic)
        return real(*args, **kwargs)

    monkeypatch.setattr(mlp_gluon, "launch", counted)
    tc.force_config(mlp=cfg)
    try:
        got, want = run(TritonBackend(combine=combine, fused_forward=True), inp), run(ReferenceBackend(), upcast(inp))
        errs = compare(got, want, 3e-2)
    finally:
        tc.force_config()
    assert len(launches) == 1 and launches[0][1] == (combine != "buffer"), launches
    print("mlp ws", case, combine, tile, w2, {k: f"{v:.1e}" for k, v in errs.items()})


# up_bwd variant 5 (WS, kernels/up_bwd_gluon.py: Gluon, sm_90, Triton >= 3.9) where it serves, as the fused forward's:
# E exactly one or two power-of-two tiles (64; 192 = 128 + 64; 128), D a multiple of BK, no gate. Skewed loads,
# experts with no tokens, M not a multiple of the 128-row tile, one token, K = 1, the activations without a gate,
# no bias (no db1 sums), W2 as W_out's column view and contiguous, the dx zeros written by the kernel (atomic
# combines) or none (the buffer combine); rings of (W2, dy) slots 3 + 4 and 2 + 2; dh and gate * a by TMA stores
# (SSD_TRITON_UP_BWD_TMA_STORES=1, the default) or pointer stores ("-ptr")
UP_BWD_WS_TILES = {"3w-4x": (128, 64, 64, 3, 4, 5), "3w-4x-ptr": (128, 64, 64, 3, 4, 5),
                   "2w-2x-bk128": (128, 128, 128, 2, 2, 5),
                   "2w-3x": (128, 64, 64, 2, 3, 5)}  # (the one whose buffers fit at 8B's E = 256 = 128 + 128)
UP_BWD_WS_CASES = MLP_WS_CASES + [dict(activation="relu", T=257, D=128, E=192, N=8, K=1, routing="skewed")]
UP_BWD_WS_IDS = [f"{c['activation']}-T{c['T']}-D{c['D']}-E{c['E']}-N{c['N']}K{c['K']}-{c.get('routing', 'random')}"
                 f"{'' if c.get('bias', True) else '-nobias'}" for c in UP_BWD_WS_CASES]


@pytest.mark.parametrize("w2", ["column-view", "contiguous"])
@pytest.mark.parametrize("tile", list(UP_BWD_WS_TILES))
@pytest.mark.parametrize("combine", ["atomic16", "buffer"])
@pytest.mark.parametrize("case", UP_BWD_WS_CASES, ids=UP_BWD_WS_IDS)
def test_triton_up_bwd_ws_bf16(case, combine, tile, w2, monkeypatch):
    """The warp-specialised Gluon up_bwd (variant 5) against the reference, forward and every grad, at each tile,
    store kind, combine and W2 layout; each backward is checked to have taken it (not kernels/up.py), with the dx
    zeros for the atomic combine."""
    cfg = UP_BWD_WS_TILES[tile]
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc, up_bwd_gluon
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    if up_bwd_gluon._build_once() is None or not up_bwd_gluon.down_gluon._sm90(torch.zeros(1, device="cuda")):
        pytest.skip("the WS up_bwd does not serve here (needs sm_90 and Triton >= 3.9's Gluon): variant 5 falls "
                    "back to kernels/up.py")
    if cfg[2] > case["D"] or case["D"] % cfg[2] or \
            up_bwd_gluon.smem_bytes(cfg[0], cfg[2], case["E"], cfg[4], cfg[3]) > up_bwd_gluon.down_gluon.SMEM_LIMIT:
        pytest.skip("variant 5 falls back to kernels/up.py here: D not a multiple of BK, or buffers beyond shared "
                    "memory")
    launches = []
    real = up_bwd_gluon.launch

    def counted(*args, **kwargs):
        launches.append((args[9] is not None, args[11] is not None, args[12] is not None))  # (ga, db, fill)
        return real(*args, **kwargs)

    monkeypatch.setattr(up_bwd_gluon, "launch", counted)
    monkeypatch.setenv("SSD_TRITON_UP_BWD_TMA_STORES", "0" if tile.endswith("ptr") else "1")
    inp = make_inputs(device="cuda", dtype=torch.bfloat16, **case)
    if w2 == "column-view":
        inp = with_column_view_w2(inp)
    tc.force_config(up_bwd=cfg)
    try:
        got, want = run(TritonBackend(combine=combine), inp), run(ReferenceBackend(), upcast(inp))
        errs = compare(got, want, 3e-2)
    finally:
        tc.force_config()
    assert launches == [(True, case.get("bias", True), combine != "buffer" and case["K"] > 1)], launches
    print("up_bwd ws", case, combine, tile, w2, {k: f"{v:.1e}" for k, v in errs.items()})


# wgrad's seventh entry 5 (WS, kernels/wgrad_gluon.py: Gluon, sm_90, Triton >= 3.9) where it serves: P = E (dW2) or F1
# (dW1; 2E with a gate) up to 256 as one or two power-of-two boxes (48 = 32 + 16, 192 = 128 + 64, 256 = 128 + 128), Q
# (D) a multiple of 16. Balanced items (row segments of at least 96 or 40 rows, crossing experts; atomic adds, or TMA
# reduces through either 2-D view of dW) and whole experts (0: stores), skewed loads, experts with no tokens, Q not a
# multiple of the column block (208, 96), one token, K = 1, SwiGLU's dW1 (P = 2E = 128), the router's term in dW1's
# epilogue; fp32 master weights (dW written in place) and bf16 weights (an fp32 buffer, copied; or stored straight into
# dW for whole experts; with half sums, TMA reduces into bf16 dW itself)
WGRAD_WS_TILES = {"balanced96": (64, 128, 64, 4, 4, 96, 5), "balanced40-bk32": (64, 128, 32, 2, 3, 40, 5),
                  "balanced96-tmaout": (64, 128, 64, 3, 3, 96, 5),  # TMA reduces (the others: SSD_WGRAD_TMA_OUT=0)
                  "balanced96-tmaout-half": (64, 128, 64, 3, 3, 96, 5),  # into bf16 dW itself (SSD_WGRAD_HALF_SUMS=1)
                  "balanced96-tmaout-half-r4": (64, 128, 64, 3, 4, 96, 5),  # (auto's R ring at 8B's P = 128 + 128)
                  "experts": (64, 128, 64, 3, 4, 0, 5)}
WGRAD_WS_CASES = [dict(activation="relu", T=300, D=128, E=64, N=8, K=3, routing="skewed"),
                  dict(activation="relu", T=333, D=208, E=192, N=8, K=2, routing="empty"),  # base's P = 128 + 64
                  dict(activation="relu", T=1000, D=512, E=256, N=16, K=4, routing="skewed"),  # 8B's P = 256
                  dict(activation="relu", T=1, D=128, E=64, N=4, K=2),
                  dict(activation="swiglu", T=257, D=256, E=64, N=8, K=2, routing="skewed"),
                  # SwiGLU 8B's dW1 (P = 2E = 512): two slices of two 128-column boxes
                  dict(activation="swiglu", T=600, D=256, E=256, N=8, K=2, routing="skewed"),
                  dict(activation="gelu", T=257, D=96, E=48, N=6, K=1)]
WGRAD_WS_IDS = [f"{c['activation']}-T{c['T']}-D{c['D']}-E{c['E']}-N{c['N']}K{c['K']}-{c.get('routing', 'random')}"
                for c in WGRAD_WS_CASES]


@pytest.mark.parametrize("weights", ["bf16", "fp32-master"])
@pytest.mark.parametrize("tile", list(WGRAD_WS_TILES))
@pytest.mark.parametrize("fold", ["none", "router"])
@pytest.mark.parametrize("case", WGRAD_WS_CASES, ids=WGRAD_WS_IDS)
def test_triton_wgrad_ws_bf16(case, fold, tile, weights, monkeypatch):
    """The warp-specialised Gluon weight gradients (wgrad variant 5) against the reference, forward and every grad,
    at each tile, with and without the router's term folded into dW1, into bf16 weights' grads and fp32 master
    weights'; both weight gradients are checked to have taken it (not kernels/wgrad.py)."""
    cfg = WGRAD_WS_TILES[tile]
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc, wgrad_gluon
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    if wgrad_gluon._build_once() is None or not wgrad_gluon.down_gluon._sm90(torch.zeros(1, device="cuda")):
        pytest.skip("the WS wgrad does not serve here (needs sm_90 and Triton >= 3.9's Gluon): variant 5 falls back "
                    "to kernels/wgrad.py")
    launches = []
    real = wgrad_gluon.launch

    def counted(*args, **kwargs):
        launches.append((args[0].shape[1], args[7]))  # (P, FOLD)
        reduces.append(args[14])  # tma_out
        return real(*args, **kwargs)

    reduces = []
    monkeypatch.setattr(wgrad_gluon, "launch", counted)
    tma_out, half = "tmaout" in tile, "half" in tile
    if not tma_out:  # the balanced items' fp32 atomics, not the TMA reduces they take where they fit
        monkeypatch.setenv("SSD_WGRAD_TMA_OUT", "0")
    monkeypatch.setenv("SSD_WGRAD_HALF_SUMS", str(int(half)))
    master = weights == "fp32-master"
    inp = make_inputs(device="cuda", dtype=torch.float32 if master else torch.bfloat16, **case)
    ref = upcast(inp)
    if master:  # as test_triton_master_weights_bf16: bf16 tokens, the reference on the weights' bf16 casts
        for k in ("x", "gate"):
            inp[k] = inp[k].detach().bfloat16().requires_grad_()
        inp["dy"] = inp["dy"].bfloat16()
        ref = upcast({**inp, **{k: inp[k].detach().bfloat16().requires_grad_()
                                for k in ("w1", "b1", "w2", "b2") if inp[k] is not None}})
    if tma_out and not master and fold == "none":  # dW2 with P contiguous: the other 2-D view
        inp = with_column_view_w2(inp)
        ref = upcast(inp)
    be = TritonBackend(combine="atomic16")
    tc.force_config(wgrad=cfg)
    try:
        if fold == "router":
            got, want = run_router(be, inp, fold=True), run_router(ReferenceBackend(), ref, fold=False)
        else:
            got, want = run(be, inp), run(ReferenceBackend(), ref)
        errs = compare(got, want, 3e-2)
    finally:
        tc.force_config()
    assert not master or all(g.dtype == torch.float32 for k, g in got[1].items() if k in ("w1", "w2")), got[1]
    F1 = case["E"] * (2 if case["activation"] == "swiglu" else 1)
    # (the router's term: summed in the kernel, FOLD 3)
    assert sorted(launches) == sorted([(F1, 3 if fold == "router" else 0), (case["E"], 0)]), launches
    # TMA reduces wherever their staging fits beside the rings (8B's P = 256 and each 256-column slice of a wider P:
    # two equal boxes through one staging buffer)
    def fits(P, fold_code):
        be, be2 = tc.ws_boxes(P)
        return wgrad_gluon.smem_bytes(cfg[2], cfg[1], be + max(be2, 16), cfg[3], cfg[4], 2, True,
                                      2 if half and not master else 4,
                                      wgrad_gluon.score_grad.ROW_WIDTH if fold_code == 3 else 0,
                                      be == be2) <= wgrad_gluon.down_gluon.SMEM_LIMIT
    assert reduces == [tma_out and fits(*p) for p in launches], (launches, reduces)
    print("wgrad ws", case, fold, tile, weights, reduces, {k: f"{v:.1e}" for k, v in errs.items()})


def test_triton_auto_ws_forward_in_captured_inference(monkeypatch):
    """`auto` in inference at a base-like shape: the first eager forward takes the Gluon WS fused forward (which
    loads its module), the next eager one kernels/mlp.py, and a CUDA graph captured after them the WS forward again
    (no module load inside the capture); every output, the replay's included, matches the reference."""
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends import expert_ffn
    from ssd_megatron.ffn.backends.kernels import gluon_launches, mlp_gluon
    if mlp_gluon._build_once() is None or not mlp_gluon.down_gluon._sm90(torch.zeros(1, device="cuda")):
        pytest.skip("the WS fused forward does not serve here (needs sm_90 and Triton >= 3.9's Gluon)")
    inp = make_inputs(device="cuda", dtype=torch.bfloat16, activation="relu", T=2048, D=768, E=192, N=32, K=6,
                      routing="skewed")
    want = run(ReferenceBackend(), upcast(inp))[0]
    launches, real = [], mlp_gluon.launch

    def counted(*args, **kwargs):
        launches.append(gluon_launches.capturing(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(mlp_gluon, "launch", counted)
    fresh_gluon_records(monkeypatch)  # (what earlier tests launched at these shapes would decide the eager choices)
    backend = get_backend("triton")

    def forward():
        return expert_ffn(backend, inp["x"], inp["w1"], inp["b1"], inp["w2"], inp["topk_idx"], inp["gate"], "relu",
                          inp.get("b2"))

    with torch.no_grad():
        eager = [forward(), forward()]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = forward()
        graph.replay()
        torch.cuda.synchronize()
    assert launches == [False, True], launches  # eager WS (the module loaded), eager kernels/mlp.py, captured WS
    errs = [rel_err(y, want) for y in eager + [captured]]
    assert max(errs) <= 3e-2, errs
    print("auto ws captured", [f"{e:.1e}" for e in errs])


@pytest.mark.parametrize("E", [192, 256], ids=["base-boxes", "8b-boxes"])
def test_triton_auto_ws_wgrad_in_captured_training(monkeypatch, E):
    """`auto` in training at a base-like shape: the first eager fwd+bwd takes the Gluon WS fused forward (h stored)
    and the WS wgrad with balanced items and TMA reduces for both weight gradients (dW1 with Q contiguous, dW2 as
    W_out's column view with P contiguous), and the WS up_bwd with TMA stores; the next eager one kernels/mlp.py,
    kernels/wgrad.py and kernels/up.py, and a fwd+bwd captured in a CUDA graph after them the Gluon kernels again
    (their modules already loaded); the eager and replayed gradients match the reference. With 8B's E = 256 (two
    equal boxes, one staging buffer) the WS wgrad takes an R ring of 4, in the capture too (its launch key is the R 4
    tile's), and the forward and up_bwd stay Triton's (`auto` keeps their Gluon kernels to E <= 192)."""
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends import expert_ffn
    from ssd_megatron.ffn.backends.kernels import gluon_launches, mlp_gluon, up_bwd_gluon, wgrad_gluon
    if wgrad_gluon._build_once() is None or not wgrad_gluon.down_gluon._sm90(torch.zeros(1, device="cuda")):
        pytest.skip("the WS wgrad does not serve here (needs sm_90 and Triton >= 3.9's Gluon)")
    inp = with_column_view_w2(make_inputs(device="cuda", dtype=torch.bfloat16, activation="relu", T=2048, D=768,
                                          E=E, N=32, K=6, routing="skewed"))
    want = run(ReferenceBackend(), upcast(inp))[1]
    launches, forwards, ups, real, real_fwd, real_up = [], [], [], wgrad_gluon.launch, mlp_gluon.launch, \
        up_bwd_gluon.launch

    def counted(*args, **kwargs):
        launches.append((gluon_launches.capturing(args[0]), args[14], args[11]))  # (capturing, TMA reduces, R ring)
        return real(*args, **kwargs)

    def counted_fwd(*args, **kwargs):
        forwards.append((gluon_launches.capturing(args[0]), args[9] is not None))  # (capturing, h stored)
        return real_fwd(*args, **kwargs)

    def counted_up(*args, **kwargs):
        ups.append((gluon_launches.capturing(args[0]), args[-1]))  # (capturing, TMA stores)
        return real_up(*args, **kwargs)

    monkeypatch.setattr(wgrad_gluon, "launch", counted)
    monkeypatch.setattr(mlp_gluon, "launch", counted_fwd)
    monkeypatch.setattr(up_bwd_gluon, "launch", counted_up)
    fresh_gluon_records(monkeypatch)
    backend = get_backend("triton")
    leaves = {k: inp[k] for k in ("x", "w1", "b1", "gate", "b2") if inp.get(k) is not None}
    # a fresh W_out leaf: with_column_view_w2's view made the original's gradient node on the default stream, which
    # a captured backward may not touch
    leaves["w2"] = inp["w2_leaf"].detach().requires_grad_()
    names = list(leaves)

    def fwd_bwd():  # as `ssd-bench ffn` captures the layer: autograd.grad, W_out's [N, E, D] view taken inside
        y = expert_ffn(backend, inp["x"], inp["w1"], inp["b1"], leaves["w2"].permute(1, 2, 0), inp["topk_idx"],
                       inp["gate"], "relu", inp.get("b2"))
        grads = torch.autograd.grad(y, [leaves[k] for k in names], inp["dy"])
        return {k: (g.permute(1, 2, 0) if k == "w2" else g) for k, g in zip(names, grads)}

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = [{k: g.clone() for k, g in fwd_bwd().items()} for _ in range(2)]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = fwd_bwd()
    graph.replay()
    torch.cuda.synchronize()
    ring = 4 if E == 256 else 3
    # eager WS, eager wgrad.py, captured WS
    assert launches == [(False, True, ring)] * 2 + [(True, True, ring)] * 2, launches
    base = E <= 192
    assert forwards == [(False, True), (True, True)] * base, forwards  # eager WS, eager mlp.py, captured WS
    assert ups == [(False, True), (True, True)] * base, ups  # eager WS, eager up.py, captured WS
    errs = {f"{i}:{k}": rel_err(g[k], want[k]) for i, g in enumerate(eager + [replayed]) for k in ("x", "w1", "w2")}
    assert max(errs.values()) <= 3e-2, errs
    print("auto ws wgrad captured", {k: f"{v:.1e}" for k, v in errs.items()})


@pytest.mark.parametrize("order", ["token", "token:3"])
@pytest.mark.parametrize("down", ["pointer", "rowloop", "tma", "staged"])
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[8], CASES[12]], ids=[IDS[0], IDS[4], IDS[8], IDS[12]])
def test_triton_token_window_order_bf16(case, down, order, monkeypatch):
    """The up, up_bwd and down M-tiles from the token-window schedule (SSD_TRITON_TILE_ORDER=token, and
    token:3, windows within groups of 3 experts) against the reference, with each down kernel."""
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    monkeypatch.setenv("SSD_TRITON_TILE_ORDER", order)
    inp = make_inputs(device="cuda", dtype=torch.bfloat16, **case)
    tc.force_config(down={"pointer": (128, 128, 64, 8, 3), "rowloop": (128, 128, 64, 4, 3, tc.ROWLOOP),
                          "tma": (128, 128, 64, 8, 3, tc.TMA),
                          "staged": (64, 64, 64, 4, 2, tc.STAGED)}[down])
    try:
        compare(run(TritonBackend(), inp), run(ReferenceBackend(), upcast(inp)), 3e-2)
    finally:
        tc.force_config()


@pytest.mark.parametrize("order", ["auto", "token", "token:3"])
@pytest.mark.parametrize("opts", [{}, {"combine": "atomic32"}, {"combine": "buffer"}, {"fold_output": True}],
                         ids=["default", "atomic32", "buffer", "output-fold"])
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 4, 6, 8, 9, 10, 11, 12)],
                         ids=[IDS[i] for i in (0, 4, 6, 8, 9, 10, 11, 12)])
def test_triton_fused_forward_bf16(case, opts, order, monkeypatch):
    """The fused forward (up, activation and down in one kernel per M-tile; y initialised by the routing
    plan) against the reference, forward and the backward that follows it, in both tile orders."""
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    monkeypatch.setenv("SSD_TRITON_TILE_ORDER", order)
    inp = make_inputs(device="cuda", dtype=torch.bfloat16, **case)
    errs = compare(run(TritonBackend(fused_forward=True, **opts), inp), run(ReferenceBackend(), upcast(inp)), 3e-2)
    print("fused forward", case, opts, order, {k: f"{v:.1e}" for k, v in errs.items()})


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[12]], ids=[IDS[0], IDS[4], IDS[12]])
@pytest.mark.parametrize("backend", ["grouped_mm", "triton", "triton-wgrad-split"])
def test_w2_as_column_view(backend, case):
    """w2 as weights.gather_expert_weights passes it (a strided view of W_out's columns), grads included;
    with the row-chunk split, dW2's fp32 buffer takes that view's strides and is copied into it."""
    name = backend.split("-")[0]
    if name not in AVAILABLE:
        pytest.skip(f"{name} not available here")
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    inp = with_column_view_w2(make_inputs(device="cuda", dtype=torch.bfloat16, **case))
    tc.force_config(**({"wgrad": KERNEL_VARIANTS["wgrad-split"]["wgrad"]} if name != backend else {}))
    try:
        compare(run(get_backend(name), inp), run(ReferenceBackend(), upcast(inp)), 3e-2)
    finally:
        tc.force_config()


@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_no_host_sync(backend):
    """Forward + backward never waits on the host (no .item()/.tolist()/bincount on the hot path)."""
    if backend not in AVAILABLE:
        pytest.skip(f"{backend} not available here")
    inp = make_inputs(device="cuda", dtype=torch.bfloat16, activation="swiglu", T=512, D=256, E=64, N=16, K=4)
    be = get_backend(backend)
    run(be, inp)  # warm-up (compilation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(be, inp)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_auto_picks_triton_on_sm90():
    if torch.cuda.get_device_capability()[0] < 9 or "triton" not in AVAILABLE:
        pytest.skip("needs sm90 and triton")
    assert get_backend("auto").resolve(torch.zeros(1, device="cuda", dtype=torch.bfloat16)).name == "triton"


@pytest.mark.parametrize("variant", ["default", "down-tma", "down-rowloop", "wgrad-split"])
def test_triton_under_torch_compile_fullgraph(variant):
    """The training step compiles each block with the expert backend inside: with every variant (the TMA
    one's host-side descriptors included) the backend must compile without a graph break and give the
    eager output and gradients (traced as an autograd.Function, all gradients came back zero)."""
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    torch._dynamo.reset()
    tc.force_config(**KERNEL_VARIANTS.get(variant, {}))
    try:
        inp = make_inputs(device="cuda", dtype=torch.bfloat16, activation="relu", T=1024, D=768, E=192, N=32, K=6)
        be = TritonBackend(combine="atomic16")
        compare(run(Compiled(be), inp), run(be, inp), 1e-2)
    finally:
        tc.force_config()


@pytest.mark.parametrize("fold", ["epilogue", "rows"])
@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[10], CASES[12], CASES[13]],
                         ids=[IDS[0], IDS[5], IDS[10], IDS[12], IDS[13]])
def test_triton_router_fold_bf16(case, fold):
    """SSD's router gradient folded into the kernels (router_centroids) == autograd through the router
    on the float64 reference."""
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    inp = make_inputs(device="cuda", dtype=torch.bfloat16, **case)
    want = run_router(ReferenceBackend(), upcast(inp), fold=False)
    errs = compare(run_router(TritonBackend(fold_router=fold), inp, fold=True), want, 3e-2)
    print("router fold", fold, case, {k: f"{v:.1e}" for k, v in errs.items()})


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[12]], ids=[IDS[0], IDS[5], IDS[12]])
def test_triton_master_weights_bf16(case, fold):
    """fp32 weights with bf16 tokens (master weights, as SwitchableFFN passes them under autocast): cast inside
    the custom op, fp32 weight gradients from the wgrad kernels; == the float64 reference."""
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    inp = make_inputs(device="cuda", dtype=torch.float32, **case)
    for k in ("x", "gate"):
        inp[k] = inp[k].detach().bfloat16().requires_grad_()
    inp["dy"] = inp["dy"].bfloat16()
    be = TritonBackend()
    assert be.takes_master_weights(inp["x"])
    # The reference multiplies what the backend does: the bf16 casts of the weights (their gradients are the
    # fp32 weights' gradients). Against the fp32 weights themselves ReLU's mask flips wherever the cast moves
    # a pre-activation across 0, a ~3% difference in dh that says nothing about the kernels.
    ref = upcast({**inp, **{k: inp[k].detach().bfloat16().requires_grad_()
                            for k in ("w1", "b1", "w2", "b2") if inp[k] is not None}})
    if fold:
        got, want = run_router(be, inp, fold=True), run_router(ReferenceBackend(), ref, fold=False)
    else:
        got, want = run(be, inp), run(ReferenceBackend(), ref)
    assert all(g.dtype == torch.float32 for k, g in got[1].items() if k in ("w1", "b1", "w2")), got[1]
    errs = compare(got, want, 3e-2)
    print("master weights", fold, case, {k: f"{v:.1e}" for k, v in errs.items()})


def test_sparse_layer_master_weights_under_autocast_and_compile():
    """SwitchableFFN under bf16 autocast hands the triton backend its fp32 parameters: eager equals the layer
    casting them itself (master_weights=False) up to the weight grads' bf16 rounding, and the compiled
    layer (inductor around the custom ops, mixed dtypes in their fake implementations) runs and agrees."""
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    import copy

    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    ffn = expert_major_sparse_ffn(256, 1024, "relu", 8, 2, device="cuda")
    x = torch.randn(512, 256, device="cuda")
    w = torch.randn(512, 256, device="cuda")

    def grads(layer, master, compiled=False):
        layer = copy.deepcopy(layer)
        layer.set_backend(TritonBackend(master_weights=master))
        run = torch.compile(layer) if compiled else layer
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = run(xi)
        return torch.autograd.grad((y.float() * w).sum(), [xi, *layer.parameters()])

    master, outside = grads(ffn, True), grads(ffn, False)
    torch._dynamo.reset()
    compiled = grads(ffn, True, compiled=True)
    for a, b, c in zip(master, outside, compiled):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
        assert ((c.float() - a.float()).norm() / a.float().norm()).item() < 5e-2


def test_sparse_layer_with_triton_under_torch_compile():
    """The sparse SwitchableFFN with the triton backend as an SSD sparse phase runs it (expert-major
    storage, the router folded into the kernels) and as the loop compiles it (inductor), fp32: output and
    every gradient equal eager (fp32 keeps the top-K choices from flipping between the two). fullgraph: a graph
    break in the sparse layer fails here (docs/kernels.md v30: three per layer under torch 2.11 had doubled the
    eager step's time; CI's torch traced the same code without them)."""
    if "triton" not in AVAILABLE:
        pytest.skip("triton not available here")
    ffn = expert_major_sparse_ffn(256, 1024, "relu", 8, 2, device="cuda")
    ffn.set_backend(get_backend("triton"))
    x = torch.randn(512, 256, device="cuda", requires_grad=True)
    w = torch.randn(512, 256, device="cuda")
    eager = torch.autograd.grad((ffn(x) * w).sum(), [x, *ffn.parameters()])
    torch._dynamo.reset()
    compiled = torch.autograd.grad((torch.compile(ffn, fullgraph=True)(x) * w).sum(), [x, *ffn.parameters()])
    for a, b in zip(compiled, eager):
        assert ((a - b).norm() / b.norm()).item() < 1e-4


# (T, N, K, skew, max_blocks): the counting-sort plan at the layer benchmark's sizes (base: two sub-blocks per
# block; 8B: eight), a skewed load, a tail block, and several sub-blocks per block at a small size
PLAN_SIZES = [(16384, 32, 6, False, 256), (16384, 64, 16, False, 256), (16384, 32, 6, True, 256),
              (5001, 16, 4, True, 256), (3000, 32, 6, False, 5)]


@pytest.mark.parametrize("size", PLAN_SIZES, ids=[f"T{s[0]}-N{s[1]}K{s[2]}{'-skew' * s[3]}-B{s[4]}" for s in PLAN_SIZES])
def test_counting_sort_plan_equals_torch_sort_on_cuda(size):
    """The two plan kernels (kernels/routing_plan.py) give torch's stable sort exactly, initialise the fused
    forward's output to the bias, and write the Gluon kernels' M-tile table as the table's own launch does; the
    token-window table's launch equals the torch-built table."""
    from ssd_megatron.ffn.backends.kernels.tile_order import expert_tiles, token_window_tiles, token_window_tiles_torch
    from ssd_megatron.ffn.backends.kernels.routing_plan import FILL_PLACES, TILE_BM, routing_plan
    from ssd_megatron.ffn.backends.routing import sort_plan
    T, N, K, skew, max_blocks = size
    g = torch.Generator(device="cuda").manual_seed(T)
    scores = torch.rand(T, N, generator=g, device="cuda")
    if skew:  # a few experts take most pairs; some take none
        scores = scores * torch.linspace(0.01, 3.0, N, device="cuda") ** 4
    idx = scores.topk(K, dim=-1).indices
    want = sort_plan(idx.reshape(-1), N, K)
    for place in FILL_PLACES:  # the output's initialisation in each kernel, or in programs of its own
        y, row = torch.full((T, 96), float("nan"), device="cuda", dtype=torch.bfloat16), torch.randn(96, device="cuda")
        got = routing_plan(idx.reshape(-1), N, K, fill=(y, row), max_blocks=max_blocks, tile_table=True, fill_in=place)
        for name, a, b in zip(("order", "token", "sorted expert", "offsets"), got, want):
            assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b), (name, place)
        assert torch.equal(y, row.to(y.dtype).expand(T, 96)), place
    assert torch.equal(got[4], expert_tiles(want[3], T * K, N, TILE_BM))
    for bm, group in ((128, 16), (128, 0), (64, 3)):  # the token-window table's launch, as the torch-built one
        assert torch.equal(token_window_tiles(want[3], T * K, N, bm, group),
                           token_window_tiles_torch(want[3], T * K, N, bm, group)), (bm, group)
