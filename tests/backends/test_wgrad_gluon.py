"""The warp-specialised Gluon weight gradients (wgrad seventh entry 5, kernels/wgrad_gluon.py) on a machine without a
GPU: its offline compile for sm_90 through the real launcher (where the installed Triton's Gluon builds it, >= 3.9),
the launcher's choice (the Gluon kernel where it serves, kernels/wgrad.py with its left operand by TMA elsewhere),
and its config. Gluon has no interpreter: test_backends_gpu.py (`wgrad_ws`) checks its results on the GPU."""
import json
import os
import sys

import pytest
import torch

try:
    from .backend_cases import Recorder, auto_stand_in, gluon_stand_in
    from .test_offline_compile import _compile_env, compiled_in_subprocess
except ImportError:  # run as a script: the compile subprocess, which needs none of them
    Recorder = auto_stand_in = gluon_stand_in = _compile_env = compiled_in_subprocess = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WS = (64, 128, 64, 4, 4, 96, 5)  # BP (unused), BQ, BK, the L ring's depth, the R ring's, balanced (segments >= 96
# rows; 0: whole experts), variant 5
# name -> (P, Q, dtype, router term, dW's dtype, balanced items' least rows or 0, the epilogue expected, the rings'
# depths, dW as W_out's column view): base's P = 128 + 64 (dW1 with the router's term, bf16 weights: an fp32 buffer;
# four-slot rings leave no room for the TMA reduces' staging: atomics), 8B's P = 256 as two 128-column boxes (fp32
# master weights beside four-slot rings: atomics), whole experts stored into bf16, a thin fp16 expert with Q not a multiple of the column block
# (TMA reduces, Q contiguous), base's dW2 with three-slot rings (TMA reduces, P contiguous); with half sums (the last
# entry: SSD_WGRAD_HALF_SUMS=1) base's dW1 and dW2 and 8B's dW2 by TMA reduces into bf16 dW itself; 8B's two equal
# boxes share one staging buffer, so its dW2 in fp32 takes the reduces beside three-slot rings too (not four)
LAUNCHES = {"base-dw1-fold": (192, 256, "bfloat16", True, "bfloat16", 96, "atomic", 4, False, False),
            "8b-dw2-fp32-rings4": (256, 512, "bfloat16", False, "float32", 96, "atomic", 4, False, False),
            "whole-experts-bf16": (192, 256, "bfloat16", True, "bfloat16", 0, "store", 4, False, False),
            "fp16-ragged-q": (64, 208, "float16", False, "float32", 96, "reduce", 4, False, False),
            "base-dw2-column-view": (192, 768, "bfloat16", False, "float32", 96, "reduce", 3, True, False),
            "half-base-dw1-fold": (192, 256, "bfloat16", True, "bfloat16", 96, "reduce", 3, False, True),
            "half-base-dw2-column-view": (192, 768, "bfloat16", False, "bfloat16", 96, "reduce", 3, True, True),
            "half-8b-dw2": (256, 512, "bfloat16", False, "bfloat16", 96, "reduce", 3, False, True),
            # the router's term summed in the kernel (fold "pairs", FOLD 3: a third, 16-column wgmma per step): base's
            # dW1 by half-sum reduces, by fp32 atomics into master weights' dW, whole experts; 8B's dW1 by fp32 atomics
            # and by half-sum reduces
            "pairs-base-dw1-half": (192, 768, "bfloat16", "pairs", "bfloat16", 96, "reduce", 3, False, True),
            "pairs-base-dw1-fp32": (192, 768, "bfloat16", "pairs", "float32", 96, "atomic", 4, False, False),
            "pairs-whole-experts": (192, 256, "bfloat16", "pairs", "bfloat16", 0, "store", 4, False, False),
            "pairs-8b-dw1-fp32": (256, 512, "bfloat16", "pairs", "float32", 96, "atomic", 4, False, False),
            "pairs-8b-dw1-half": (256, 512, "bfloat16", "pairs", "bfloat16", 96, "reduce", 3, False, True),
            # SwiGLU 8B's dW1 (P = 2E = 512, the router's term on its first E columns): two slices of two boxes
            "pairs-swiglu-8b-dw1-half": (512, 512, "bfloat16", "pairs", "bfloat16", 96, "reduce", 3, False, True),
            # 8B with fp32 master weights: the fp32 staging of 256 columns fits beside BK = 32 rings (the last entry)
            "pairs-8b-dw1-fp32-bk32": (256, 512, "bfloat16", "pairs", "float32", 96, "reduce", 3, False, False, 32),
            "8b-dw2-fp32-bk32": (256, 512, "bfloat16", False, "float32", 96, "reduce", 3, False, False, 32),
            "8b-dw2-fp32": (256, 512, "bfloat16", False, "float32", 96, "reduce", 3, False, False),
            # auto's rings at 8B with half sums: an R ring of 4 (the rings' depths as (L, R))
            "pairs-8b-dw1-half-r4": (256, 512, "bfloat16", "pairs", "bfloat16", 96, "reduce", (3, 4), False, True)}


def _case(P, Q, dtype=torch.bfloat16, fold=False, dw_dtype=torch.float32, T=100, N=8, K=2, column_view=False):
    """(lhs [M, P], rhs [T, Q], plan, like, fold) on CPU: skewed loads, experts 6 and 7 empty; `like` [N, P, Q] with
    Q contiguous, or with `column_view` the [N, E, D] view of a [D, N * E] W_out (P contiguous)."""
    from ssd_megatron.ffn.backends.routing import make_plan
    g = torch.Generator().manual_seed(0)
    idx = (torch.rand(T, N, generator=g)[:, :6] + torch.linspace(2, 0, 6)).topk(K, dim=1).indices
    plan = make_plan(idx, N)
    lhs = torch.randn(plan.num_rows, P, generator=g).to(dtype)
    rhs = torch.randn(T, Q, generator=g).to(dtype)
    like = torch.empty(N, P, Q, dtype=dw_dtype) if not column_view else \
        torch.empty(Q, N * P, dtype=dw_dtype).as_strided((N, P, Q), (P, 1, N * P))
    v = torch.randn(N, Q, generator=g)
    if fold == "pairs":  # the router's term from per-pair gradients (FOLD 3 where the Gluon kernel serves)
        return lhs, rhs, plan, like, ("pairs", (torch.randn(T * K, generator=g), 0.5, lambda: v), P // 2)
    return lhs, rhs, plan, like, (("expert", v, P // 2) if fold else None)


def _compile_main():  # in a subprocess: compile-only launches for sm_90 (tools/compile_report.py's driver)
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import compile_report as cr

    from ssd_megatron.ffn.backends.kernels import tile_configs as tc, wgrad_launch
    cr.offline(90)

    def launch(P, Q, dtype, fold, dw_dtype, chunk, epilogue, rings, column_view, half, BK=WS[2]):
        lhs, rhs, plan, like, f = _case(P, Q, getattr(torch, dtype), fold, getattr(torch, dw_dtype),
                                        column_view=column_view)

        def run():
            ls, rs = rings if isinstance(rings, tuple) else (rings, rings)
            tc.force_config(wgrad=WS[:2] + (BK, ls, rs, chunk, 5))
            os.environ["SSD_WGRAD_HALF_SUMS"] = str(int(half))
            wgrad_launch.wgrad(lhs, rhs, plan, like, gathered=False, fold=f)
        return run
    print("WGRADWS " + json.dumps(cr.compile_each({name: launch(*c) for name, c in LAUNCHES.items()})))


@pytest.fixture(scope="module")
def compiled():
    """{LAUNCHES name: [[kernel name, compile_report's resources], ...] or the compile error}."""
    _compile_env()
    from ssd_megatron.ffn.backends.kernels import wgrad_gluon
    if wgrad_gluon._build_once() is None:
        pytest.skip(f"this triton ({__import__('triton').__version__}) has no Gluon the WS wgrad builds with")
    return compiled_in_subprocess(os.path.abspath(__file__), "WGRADWS", timeout=900)


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_ws_wgrad_compiles_for_sm90(compiled, name):
    """Each specialisation (P as two boxes or one, at most 128 columns each, the router's term per expert or summed in
    the kernel, bf16 and fp16, Q ragged, row chunks or whole experts, dW's two layouts) compiles for sm_90 as one
    warp-specialised kernel of 16 warps: cp.async gathers of R, TMA loads of L, wgmma (a 16-column one more for the
    summed term, after the small kernel that writes its gradient matrix), for balanced items TMA reduces where their
    staging fits in shared memory, else fp32 atomic adds (no compare-and-swap loop), stores for whole experts; the
    launcher took it, not kernels/wgrad.py."""
    res = compiled[name]
    assert not isinstance(res, str), res
    pairs = LAUNCHES[name][3] == "pairs"  # (the gradient matrix's own small kernel first)
    assert [kname for kname, _ in res] == ["_row_matrix_kernel"] * pairs + ["wgrad_ws_kernel"], res
    r = res[-1][1]
    assert r["warps"] == 16, r
    assert r["ldgsts"] > 0 and r["utmaldg"] > 0 and r["mma"].startswith("64x"), r
    assert ("64x16x16" in r["mma"].split(",")) == pairs, r  # FOLD 3's third product
    epilogue = LAUNCHES[name][6]
    assert r["cas"] == 0 and (r["atom"] > 0) == (epilogue == "atomic"), r
    assert (r["utmaredg"] > 0) == (epilogue == "reduce"), r
    # (8B's two boxes, and their slices, by TMA reduces: two m64n128 accumulators, no spills; the atomics' spill)
    assert LAUNCHES[name][0] < 256 or epilogue != "reduce" or r["stack"] == 0, r
    assert r["smem_kb"] * 1024 <= 227 * 1024, r


# why the launcher does not take the Gluon kernel -> (P, Q, dtype, fold kind, config, gathered)
NOT_SERVED = {"cpu": (192, 256, torch.bfloat16, None, WS, False),
              "older-triton": (192, 256, torch.bfloat16, None, WS, False),
              "rows-fold": (192, 256, torch.bfloat16, "rows", WS, False),  # adds to L as it is loaded
              "pre-gathered": (192, 256, torch.bfloat16, None, WS, True),
              # (three-slot rings: the L ring's depth, 3, must not become kernels/wgrad.py's warp count)
              "pre-gathered-three-slots": (192, 256, torch.bfloat16, None, (64, 128, 64, 3, 3, 512, 5), True),
              "fp32": (64, 256, torch.float32, None, WS, False),
              "odd-q": (64, 200, torch.bfloat16, None, WS, False),         # Q not a multiple of 16
              "bq": (64, 256, torch.bfloat16, None, (64, 64, 64, 4, 4, 96, 5), False),  # one 64-row wgmma each
              "one-slot-ring": (64, 256, torch.bfloat16, None, (64, 128, 64, 1, 4, 96, 5), False),
              "smem": (256, 256, torch.bfloat16, None, (64, 128, 128, 4, 4, 96, 5), False)}


@pytest.mark.parametrize("why", list(NOT_SERVED) + ["served", "served-whole-experts", "served-wide-p"])
def test_ws_wgrad_falls_back(monkeypatch, why):
    """wgrad's seventh entry 5 launches the Gluon kernel where it serves, over balanced row segments (atomic adds
    into an fp32 buffer) or, without chunks or split (deterministic sums), over whole experts (stores into dW), with
    the tile asked for; kernels/wgrad.py with its left operand by TMA otherwise: not sm_90 (here: CPU), a Triton
    without the Gluon it is written for, the router's term folded into L's rows, R pre-gathered, fp32, Q not a
    multiple of 16, a column block other than 128, a ring of one slot, too much shared memory; P wider than 256 in
    slices of two 128-column boxes."""
    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends.kernels import descriptors, tile_configs as tc, wgrad_gluon, wgrad_launch
    calls = []
    monkeypatch.setattr(wgrad_launch, "_wgrad_kernel", Recorder(calls, "triton"))
    monkeypatch.setattr(wgrad_gluon, "launch", Recorder(calls, "ws"))
    # (CPU tensors: no real descriptors)
    monkeypatch.setattr(descriptors, "tma_descriptors", lambda t, boxes: ("L", "L2"))
    gluon_stand_in(monkeypatch, wgrad_gluon, why)
    wide = why == "served-wide-p"  # SwiGLU 8B's dW1 (P = 2E = 512): two slices of two 128-column boxes
    P, Q, dtype, fold_kind, cfg, gathered = NOT_SERVED.get(why, (512 if wide else 192, 256, torch.bfloat16, None, WS,
                                                                 False))
    split = why != "served-whole-experts"
    lhs, rhs, plan, like, _ = _case(P, Q, dtype)
    fold = None if fold_kind is None else (fold_kind, torch.zeros(plan.num_rows), P)
    if gathered:
        rhs = rhs.index_select(0, plan.token)
    tc.force_config(wgrad=cfg, wgrad_mat=cfg)
    try:
        wgrad_launch.wgrad(lhs, rhs, plan, like, gathered=gathered, split=split, fold=fold)
    finally:
        tc.force_config()
    assert len(calls) == 1, calls
    name, args, kwargs = calls[0]
    if why.startswith("served") and wgrad_gluon._build_once() is not None:
        assert name == "ws", (name, kwargs)
        # (fold, the balanced segments' least rows (0: whole experts, stored into dW), BK, ring depths, P's boxes,
        # TMA reduces: off unless asked for)
        boxes = (128, 128) if wide else (128, 64)
        assert args[2] is plan.offsets and args[7:] == (0, 96 if split else 0, 64, 4, 4, *boxes, False), args[7:]
        assert args[6] is not like and args[6].shape == like.shape and args[6].dtype == torch.float32
    else:  # (served, but this Triton has no Gluon that builds it: kernels/wgrad.py too)
        assert name == "triton" and kwargs["LTMA"] == (fold_kind != "rows"), (name, kwargs)
        assert kwargs["num_warps"] == 4 and kwargs["num_stages"] == cfg[4], kwargs


@pytest.mark.parametrize("how", ["served", "switched-off", "not-served"])
def test_pairs_term_summed_in_the_kernel(monkeypatch, how):
    """The router's term from per-pair gradients ("pairs"): where the Gluon kernel serves, it takes FOLD 3 with the
    gradient matrix of the sorted rows (kernels/score_grad.row_matrix: in lhs's dtype, by the plan's order) and the
    scale, and torch's term() never runs; with SSD_WGRAD_ROUTER_SUMS=0 it adds term() per expert (FOLD 2), as
    kernels/wgrad.py does elsewhere (here: a Triton without the Gluon it needs), computed once. A malformed switch
    is a one-line error."""
    served = how != "not-served"
    pytest.importorskip("triton")
    from ssd_megatron.errors import UserError
    from ssd_megatron.ffn.backends.kernels import descriptors, score_grad, switches, tile_configs as tc
    from ssd_megatron.ffn.backends.kernels import wgrad_gluon, wgrad_launch
    if served and wgrad_gluon._build_once() is None:
        pytest.skip("this Triton's Gluon does not build the WS wgrad")
    calls, terms = [], []
    monkeypatch.setattr(wgrad_launch, "_wgrad_kernel", Recorder(calls, "triton"))
    monkeypatch.setattr(wgrad_gluon, "launch", Recorder(calls, "ws"))
    monkeypatch.setattr(descriptors, "tma_descriptors", lambda t, boxes: ("L", "L2"))
    monkeypatch.setattr(score_grad, "row_matrix", lambda g, order, dtype: ("matrix", g, order, dtype))
    gluon_stand_in(monkeypatch, wgrad_gluon, "served" if served else "older-triton")
    monkeypatch.setenv("SSD_WGRAD_ROUTER_SUMS", "0" if how == "switched-off" else "1")
    lhs, rhs, plan, like, (kind, (g, scale, _), p) = _case(192, 256, fold="pairs")
    v = torch.randn(8, 256)
    tc.force_config(wgrad=WS)
    try:
        wgrad_launch.wgrad(lhs, rhs, plan, like, gathered=False,
                           fold=(kind, (g, scale, lambda: terms.append(1) or v), p))
    finally:
        tc.force_config()
    (name, args, kwargs), = calls
    if how == "served":
        assert name == "ws" and args[5] == p and args[7] == 3 and kwargs["scale"] == scale and not terms, args[5:8]
        assert kwargs["rows"][0] == "matrix" and kwargs["rows"][1] is g and kwargs["rows"][2] is plan.order
        assert kwargs["rows"][3] == lhs.dtype
    elif how == "switched-off":
        assert name == "ws" and args[4] is v and args[5:8] == (p, args[6], 2) and "rows" not in kwargs, args[4:8]
        assert terms == [1]
        monkeypatch.setenv("SSD_WGRAD_ROUTER_SUMS", "yes")
        with pytest.raises(UserError, match="SSD_WGRAD_ROUTER_SUMS='yes': accepted: 1"):
            switches.router_sums()
    else:
        assert name == "triton" and kwargs["FOLD"] == 2 and args[6] is v and args[7] == p and terms == [1], kwargs


@pytest.mark.parametrize("dw_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("reduces", [True, False])
def test_half_sums_add_into_dw_itself(monkeypatch, dw_dtype, reduces):
    """SSD_WGRAD_HALF_SUMS=1: the balanced items' TMA reduces add into a bf16 dW itself (zeroed; no fp32 buffer, no
    copy after); fp32 master weights' dW is the target either way; without TMA reduces (SSD_WGRAD_TMA_OUT=0) the
    relaxed atomics keep their fp32 buffer. A malformed value is a one-line error."""
    pytest.importorskip("triton")
    from ssd_megatron.errors import UserError
    from ssd_megatron.ffn.backends.kernels import switches, tile_configs as tc, wgrad_gluon, wgrad_launch
    if wgrad_gluon._build_once() is None:
        pytest.skip("this Triton's Gluon does not build the WS wgrad")
    calls = []
    monkeypatch.setattr(wgrad_gluon, "launch", Recorder(calls, "ws"))
    gluon_stand_in(monkeypatch, wgrad_gluon, "served")
    monkeypatch.setenv("SSD_WGRAD_HALF_SUMS", "1")
    monkeypatch.setenv("SSD_WGRAD_TMA_OUT", str(int(reduces)))
    lhs, rhs, plan, like, _ = _case(192, 256, dw_dtype=getattr(torch, dw_dtype))
    tc.force_config(wgrad=WS[:3] + (3, 3, 96, 5))
    try:
        dw = wgrad_launch.wgrad(lhs, rhs, plan, like, gathered=False)
    finally:
        tc.force_config()
    (name, args, _), = calls
    out, tma_out = args[6], args[14]
    assert name == "ws" and tma_out == reduces, (name, tma_out)
    assert (out is dw) == (reduces or dw_dtype == "float32"), (out.dtype, dw.dtype)
    assert out.dtype == (dw.dtype if reduces else torch.float32) and not out.any()
    monkeypatch.setenv("SSD_WGRAD_HALF_SUMS", "bf16")
    with pytest.raises(UserError, match="SSD_WGRAD_HALF_SUMS='bf16': accepted: 1"):
        switches.half_sums()


def test_auto_takes_the_balanced_ws_wgrad_with_tma_reduces(monkeypatch):
    """`auto` (no config forced) takes the Gluon wgrad with balanced items and TMA reduces at base's P = 128 + 64, by
    kernels/gluon_launches.py's rule: not in a capture before an eager launch with the same launch key (which would load
    its module there), the first eager launch of a shape, not later eager ones (host time), then in a capture; the same
    at 8B's P = 256 (two 128-column boxes sharing one staging buffer) and SwiGLU's P = 512 (two slices of those) into
    a bf16 dW (half sums: an R ring of 4) and an fp32 one (master weights: fp32 staging, an R ring of 3), heavy
    launches (8B's) in every eager call, but kernels/wgrad.py for deterministic sums (split=False), pre-gathered R,
    and a dW layout the reduces cannot address; a switch of the kernel's specialisation is a new eager key."""
    launcher, _, calls, state = auto_stand_in(monkeypatch, "wgrad_gluon", "wgrad_launch", "_wgrad_kernel")
    from ssd_megatron.ffn.backends.kernels import auto_ws, descriptors
    monkeypatch.setattr(descriptors, "tma_descriptors", lambda t, boxes: ("L", "L2"))

    def grad(capturing, P=192, T=100, split=True, gathered=False, like=None):
        state["capturing"] = capturing
        calls.clear()
        lhs, rhs, plan, like0, _ = _case(P, 768, torch.bfloat16, T=T)
        if gathered:
            rhs = rhs.index_select(0, plan.token)
        launcher.wgrad(lhs, rhs, plan, like0 if like is None else like, gathered=gathered, split=split)
        (name, args, kwargs), = calls
        return name, (args[8:] if name == "ws" else None)

    ws = ("ws", (auto_ws.AUTO_WGRAD_WS[5], auto_ws.AUTO_WGRAD_WS[2], *auto_ws.AUTO_WGRAD_WS[3:5], 128, 64, True))
    assert grad(True)[0] == "triton"     # captured before any eager launch: kernels/wgrad.py
    assert grad(False) == ws             # the first eager launch loads the Gluon kernel: balanced, TMA reduces
    assert grad(False)[0] == "triton"    # later eager launches: less host time
    assert grad(True) == ws              # captured: the loaded kernel
    assert grad(True, T=64)[0] == "triton"  # another launch key (fewer rows), never launched eagerly
    assert grad(False, split=False)[0] == grad(False, gathered=True)[0] == "triton"
    r4 = ws[1][:3] + (auto_ws.AUTO_WGRAD_WS_R4[4], 128, 128, True)
    assert r4[3] == 4 and grad(False, P=256) == ("ws", ws[1][:4] + (128, 128, True))  # fp32 dW: R 3
    wide = torch.empty(8, 256, 768, dtype=torch.bfloat16)
    assert grad(False, P=256, like=wide) == ("ws", r4)
    assert grad(True, P=256, like=wide) == ("ws", r4)  # captured: the tile whose launch key the eager launch recorded
    wider = torch.empty(8, 512, 768, dtype=torch.bfloat16)  # SwiGLU 8B's dW1: P in two slices of 256 columns
    assert grad(False, P=512, like=wider) == ("ws", r4)
    odd = torch.empty(8, 200, 768)[:, :192]  # experts 200 rows apart: no 2-D view for the reduces
    assert grad(False, T=80, like=odd)[0] == "triton"
    # a switch that picks another specialisation (an A/B arm): its own first eager launch loads it, then captures
    monkeypatch.setenv("SSD_WGRAD_HALF_SUMS", "0")
    assert grad(False)[0] == grad(True)[0] == "ws"
    # a heavy launch (8B's weight gradients: 2 x rows x P x Q >= HEAVY_FLOPS) takes it in every eager call, and in a
    # capture only once an eager launch loaded it
    from ssd_megatron.ffn.backends.kernels import gluon_launches
    monkeypatch.setattr(gluon_launches, "HEAVY_FLOPS", 2 * 64 * 192 * 768)
    assert grad(True, T=40)[0] == "triton"
    assert [grad(False, T=40)[0] for _ in range(3)] == ["ws"] * 3
    assert grad(True, T=40)[0] == "ws"


def test_balanced_segments():
    """The balanced items' row segments: one item per SM at base (22 segments x 6 column blocks on 132 SMs), fewer
    where segments would be shorter than the least rows asked for, at least one, and S * M within int32."""
    from ssd_megatron.ffn.backends.kernels.wgrad_gluon import segments
    assert segments(16384 * 6, 6, 512, 132) == 22
    assert segments(16384 * 16, 32, 512, 132) == 4      # 8B: 4 x 32 = 128 programs
    assert segments(900, 1, 96, 132) == 9 and segments(50, 1, 96, 132) == 1
    M = 2 ** 28
    assert segments(M, 1, 1, 132) == 7 and 7 * M < 2 ** 31


def test_ws_wgrad_config():
    """wgrad=...,5 in the seventh entry is accepted, its fourth entry (the L ring's depth) need not be a power of two;
    the seventh entry of other kinds stays 0 or 1."""
    pytest.importorskip("triton")
    from ssd_megatron.errors import UserError
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    assert tc.parse_configs("wgrad=64,128,64,3,4,2048,5") == {"wgrad": (64, 128, 64, 3, 4, 2048, tc.WS)}
    with pytest.raises(UserError, match="powers of two"):
        tc.parse_configs("wgrad=64,128,64,3,4,2048,1")
    with pytest.raises(UserError, match="seventh value"):
        tc.parse_configs("up=128,128,64,8,3,0,5")


if __name__ == "__main__":
    _compile_main()
