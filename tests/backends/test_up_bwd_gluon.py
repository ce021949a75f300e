"""The warp-specialised Gluon up_bwd (up_bwd variant 5, kernels/up_bwd_gluon.py) on a machine without a GPU: its
offline compile for sm_90 through the real launcher (where the installed Triton's Gluon builds it, >= 3.9), and the
launcher's choice, the Gluon kernel where it serves and kernels/up.py elsewhere. Gluon has no interpreter:
test_backends_gpu.py (`up_bwd_ws`) checks its results on the GPU."""
import json
import os
import sys

import pytest
import torch

try:
    from .backend_cases import Recorder, auto_stand_in, gluon_stand_in
    from .test_mlp_gluon import _case
    from .test_offline_compile import _compile_env, compiled_in_subprocess
except ImportError:  # run as a script: the compile subprocess
    Recorder = auto_stand_in = gluon_stand_in = _compile_env = compiled_in_subprocess = None
    from test_mlp_gluon import _case

WS = (128, 64, 64, 3, 4, 5)  # BM, BN (unused), BK, the W2 ring's depth, the dy ring's, variant 5
WS_8B = (128, 64, 64, 2, 3, 5)  # (rings whose buffers fit beside 8B's E = 256, as 128 + 128)
# name -> (activation, E, dtype, W2 as W_out's column view, the dx zeros, gate * a stored, db1 summed): base's
# training backward (E = 128 + 64, the layer's column view, every output), gelu without the dx zeros or gate * a,
# fp16 with tanh-GELU and contiguous W2, squared ReLU without a bias, base's with TMA stores, 8B's (E = 256 as two
# 128-column boxes, WS_8B) with TMA stores
LAUNCHES = {"base-train": ("relu", 192, "bfloat16", True, True, True, True),
            "gelu-e64-bare": ("gelu", 64, "bfloat16", False, False, False, True),
            "fp16-gelu-tanh": ("gelu_tanh", 128, "float16", False, True, True, True),
            "squared-relu-no-bias": ("squared_relu", 192, "bfloat16", True, True, True, False),
            "base-train-tma-stores": ("relu", 192, "bfloat16", True, True, True, True),  # (the switch set)
            "8b-train-tma-stores": ("relu", 256, "bfloat16", True, True, True, True)}


def _backward_case(activation, E, dtype, column_view=True, D=128, fill=True):
    """(dy, w2, h, gate, plan, fill) on CPU, from test_mlp_gluon's case (x as dy): skewed loads, experts 6 and 7
    empty."""
    dy, _, _, w2, plan, gate = _case(activation, E, dtype, column_view, D=D)
    h = torch.randn(plan.num_rows, E, generator=torch.Generator().manual_seed(1)).to(dtype)
    return dy, w2, h, gate, plan, ((torch.empty_like(dy), None) if fill else None)


def _compile_main():  # in a subprocess: compile-only launches for sm_90 (tools/compile_report.py's driver)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.join(root, "tools"))
    import compile_report as cr

    from ssd_megatron.ffn.backends.kernels import tile_configs as tc, up_launch
    cr.offline(90)

    def launch(name, act, E, dtype, column_view, fill, ga, db):
        dy, w2, h, gate, plan, f = _backward_case(act, E, getattr(torch, dtype), column_view, fill=fill)

        def run():
            tc.force_config(up_bwd=WS_8B if E == 256 else WS)
            os.environ["SSD_TRITON_UP_BWD_TMA_STORES"] = str(int(name.endswith("tma-stores")))
            up_launch.up_backward(dy, w2, h, gate, plan, act, ga, db, fill=f, partials=True)
        return run
    print("UPBWDWS " + json.dumps(cr.compile_each({name: launch(name, *c) for name, c in LAUNCHES.items()})))


@pytest.fixture(scope="module")
def compiled():
    """{LAUNCHES name: [[kernel name, compile_report's resources], ...] or the compile error}."""
    _compile_env()
    from ssd_megatron.ffn.backends.kernels import up_bwd_gluon
    if up_bwd_gluon._build_once() is None:
        pytest.skip(f"this triton ({__import__('triton').__version__}) has no Gluon the WS up_bwd builds with")
    return compiled_in_subprocess(os.path.abspath(__file__), "UPBWDWS", timeout=900)


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_ws_up_bwd_compiles_for_sm90(compiled, name):
    """Each specialisation (activation, split or single E tile, W2 layout, the dx zeros, gate * a, db1's sums, bf16
    and fp16) compiles for sm_90 as one warp-specialised kernel: cp.async gathers of dy, TMA loads of W2 and h,
    wgmma, fp32 atomics only where db1 is summed, and at base (ReLU) at most the fused forward's 8 bytes of stack
    (the other activations' epilogues spill: module docstring); the launcher took it, not kernels/up.py."""
    res = compiled[name]
    assert not isinstance(res, str), res
    assert [kname for kname, _ in res] == ["up_bwd_ws_kernel"], res
    r = res[0][1]
    assert r["warps"] == 16 and r["ldgsts"] > 0 and r["utmaldg"] > 0 and r["mma"].startswith("64x"), r
    assert r["cas"] == 0 and (r["atom"] > 0) == LAUNCHES[name][6], r
    assert (name != "base-train" or r["stack"] <= 8) and r["smem_kb"] * 1024 <= 227 * 1024, r
    assert (r["utmastg"] > 0) == name.endswith("tma-stores"), r  # TMA stores of dh and gate * a


# why the launcher does not take the Gluon kernel -> (activation, E, D, dtype, config, fill with a bias row)
NOT_SERVED = {"cpu": ("relu", 192, 128, torch.bfloat16, WS, False),
              "older-triton": ("relu", 192, 128, torch.bfloat16, WS, False),
              "glu": ("swiglu", 64, 128, torch.bfloat16, WS, False),
              "ragged-e": ("relu", 24, 128, torch.bfloat16, WS, False),    # 16 + 16 columns would reach the next expert
              "ragged-d": ("relu", 64, 96, torch.bfloat16, WS, False),     # D not a multiple of BK
              "fp32": ("relu", 64, 128, torch.float32, WS, False),
              "smem": ("relu", 192, 128, torch.bfloat16, (128, 64, 64, 4, 4, 5), False),  # h beside two full rings
              "wide-e": ("relu", 512, 128, torch.bfloat16, (128, 64, 64, 2, 2, 5), False),  # over two 128-col tiles
              "one-slot-ring": ("relu", 64, 128, torch.bfloat16, (128, 64, 64, 1, 3, 5), False),
              "bm": ("relu", 64, 128, torch.bfloat16, (64, 64, 64, 2, 3, 5), False),
              "fill-row": ("relu", 64, 128, torch.bfloat16, WS, True)}  # the kernel writes zeros only


@pytest.mark.parametrize("why", list(NOT_SERVED) + ["served"])
def test_ws_up_bwd_falls_back(monkeypatch, why):
    """up_bwd variant 5 launches the Gluon kernel over the expert-order M-tile table where it serves, with the tile,
    activation and outputs asked for, and one row of gate-gradient partials; kernels/up.py's default tile otherwise:
    not sm_90 (here: CPU), a Triton without the Gluon it is written for, a gated activation, E not exactly one or
    two power-of-two tiles of at most 128 columns, D not a multiple of BK, fp32, too much shared memory, a
    ring of one slot, BM other than 128, a fill other than zeros."""
    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc, tile_order, up_bwd_gluon, up_launch
    calls = []
    monkeypatch.setattr(up_launch, "_up_kernel", Recorder(calls, "triton"))
    monkeypatch.setattr(up_bwd_gluon, "launch", Recorder(calls, "ws"))
    gluon_stand_in(monkeypatch, up_bwd_gluon, why)
    act, E, D, dtype, cfg, row = NOT_SERVED.get(why, ("relu", 192, 128, torch.bfloat16, WS, False))
    dy, w2, h, gate, plan, fill = _backward_case(act, E, dtype, D=D)
    if act == "swiglu":
        h = torch.cat([h, h], 1)
    if row:
        fill = (fill[0], torch.zeros(D, dtype=dtype))
    tc.force_config(up_bwd=cfg, up_bwd_glu=cfg)
    try:
        dh, dgate, ga, db = up_launch.up_backward(dy, w2, h, gate, plan, act, True, True, fill=fill, partials=True)
    finally:
        tc.force_config()
    default = tc.default_tile("up_bwd_glu" if act == "swiglu" else "up_bwd", (D, E, str(dtype)))
    assert len(calls) == (2 if default[5:6] == (tc.TWO_PASS,) else 1), calls  # (GLU's default: two passes)
    name, args, kwargs = calls[0]
    if why == "served" and up_bwd_gluon._build_once() is not None:
        assert name == "ws", (name, kwargs)
        assert torch.equal(args[3], tile_order.expert_tiles(plan.offsets, plan.num_rows, plan.num_experts, 128))
        assert args[8] is dh and args[9] is ga and args[11] is db and args[12] is fill[0], args[8:13]
        assert args[10] is dgate and dgate.shape == (1, plan.num_rows), dgate.shape  # one row of partials
        # relu, the tile, the rings, E's two tiles, TMA stores (SSD_TRITON_UP_BWD_TMA_STORES unset: the default)
        assert args[13:] == (0, 128, 64, 3, 4, 128, 64, True), args[13:]
    else:  # (served, but this Triton has no Gluon that builds it: kernels/up.py too)
        assert name == "triton" and kwargs["BM"] == default[0] and kwargs["BWD"], (name, kwargs)


def test_ws_up_bwd_auto_under_capture(monkeypatch):
    """`auto` (no config forced) takes the Gluon up_bwd with TMA stores for ReLU at base-like shapes by
    kernels/gluon_launches.py's rule: the first eager launch of a shape (which loads its module), then kernels/up.py
    for later eager launches and for a capture of a launch key never run eagerly, the Gluon kernel in a capture after
    the eager launch; not for GELU (its epilogue spills, untimed) nor where the TMA-store switch is off without an
    eager launch of its own key."""
    launcher, _, calls, state = auto_stand_in(monkeypatch, "up_bwd_gluon", "up_launch", "_up_kernel")
    from ssd_megatron.ffn.backends.kernels import auto_ws, tile_configs as tc

    def backward(capturing, act="relu", D=128):
        dy, w2, h, gate, plan, fill = _backward_case(act, 192, torch.bfloat16, D=D)
        state["capturing"] = capturing
        calls.clear()
        launcher.up_backward(dy, w2, h, gate, plan, act, True, True, fill=fill, partials=True)
        name, args, kwargs = calls[0]
        return name, (args[14:19] if name == "ws" else kwargs["BM"])

    ws = ("ws", (auto_ws.AUTO_UP_BWD_WS[0], auto_ws.AUTO_UP_BWD_WS[2], *auto_ws.AUTO_UP_BWD_WS[3:5], 128))
    default = tc.default_tile("up_bwd", (128, 192, "torch.bfloat16"))[0]
    assert backward(True) == ("triton", default)  # captured before any eager launch: kernels/up.py
    assert backward(False) == ws                  # the first eager launch loads the Gluon kernel
    assert backward(False)[0] == "triton"         # later eager launches: less host time per launch
    assert backward(True) == ws                   # captured: the loaded kernel
    assert backward(True, D=256)[0] == "triton"   # another launch key, never launched eagerly
    assert backward(False, act="gelu")[0] == "triton"  # GELU: not taken
    monkeypatch.setenv("SSD_TRITON_UP_BWD_TMA_STORES", "0")
    assert backward(True)[0] == "triton"          # the switch is part of the keys: this one never ran eagerly


def test_ws_up_bwd_config():
    """up_bwd=...,5 is accepted, its fourth entry (the W2 ring's depth) need not be a power of two; up_bwd_glu does
    not take variant 5 (the kernel has no gate)."""
    pytest.importorskip("triton")
    from ssd_megatron.errors import UserError
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    assert tc.parse_configs("up_bwd=128,64,64,3,4,5") == {"up_bwd": (128, 64, 64, 3, 4, tc.WS)}
    with pytest.raises(UserError, match="VARIANT"):
        tc.parse_configs("up_bwd_glu=128,64,64,4,4,5")


if __name__ == "__main__":
    _compile_main()


def test_probe_tool_substitutions_match_the_kernel_sources():
    """tools/probe_up_bwd.py removes parts of the kernel by replacing source lines: each must still be there, and
    each variant must still build where this Triton's Gluon builds the kernel."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                    "tools"))
    import probe_up_bwd as probe

    from ssd_megatron.ffn.backends.kernels import mlp_gluon, up_bwd_gluon
    sources = {mlp_gluon: open(mlp_gluon.__file__).read(), up_bwd_gluon: open(up_bwd_gluon.__file__).read()}
    for name, (msubs, usubs, _) in probe.PROBES.items():
        for module, subs in ((mlp_gluon, msubs), (up_bwd_gluon, probe.substitutions(usubs, sources[up_bwd_gluon]))):
            assert all(old in sources[module] for old, _ in subs), (name, module.__name__)
    if up_bwd_gluon._build_once() is None:
        return
    real = mlp_gluon._STATE["build"]
    try:
        for name, (msubs, usubs, _) in probe.PROBES.items():
            mlp_gluon._STATE["build"] = probe.load_variant(mlp_gluon, msubs, name)._build()
            variant = probe.load_variant(up_bwd_gluon, probe.substitutions(usubs, sources[up_bwd_gluon]), name)
            assert variant._build() is not None, name
    finally:
        mlp_gluon._STATE["build"] = real
