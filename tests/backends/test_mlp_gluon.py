"""The warp-specialised Gluon fused forward (mlp variant 5, kernels/mlp_gluon.py) on a machine without a GPU: its
offline compile for sm_90 through the real launcher (where the installed Triton's Gluon builds it, >= 3.9), and the
launcher's choice, the Gluon kernel where it serves and kernels/mlp.py elsewhere. Gluon has no interpreter:
test_backends_gpu.py (`mlp_ws`) checks its results on the GPU."""
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
WS = (128, 64, 64, 2, 3, 5)  # BM, BN, BK, the weight ring's depth, the x ring's, variant 5
# name -> (activation, E, dtype, combine, W2 as W_out's column view, h saved): base's split E = 128 + 64 in the
# inference forward (bf16 adds, the layer's column view), a training forward storing h (gelu, the (t, k) rows),
# fp16 with fp32 adds, squared ReLU without a bias
LAUNCHES = {"base-inference": ("relu", 192, "bfloat16", "atomic16", True, False),
            "train-buffer": ("gelu", 64, "bfloat16", "buffer", False, True),
            "fp16-atomic32": ("relu", 192, "float16", "atomic32", True, True),
            "squared-relu-no-bias": ("squared_relu", 128, "bfloat16", "atomic16", False, False),
            "8b-train-two-boxes": ("relu", 256, "bfloat16", "atomic16", False, True)}  # E = 256 as 128 + 128


def _case(activation, E, dtype, column_view=False, T=100, D=128, N=8, K=2, bias=True):
    """(x, w1, b1, w2, plan, gate) on CPU: skewed loads, experts 6 and 7 empty."""
    from ssd_megatron.ffn.backends.routing import make_plan
    g = torch.Generator().manual_seed(0)
    idx = (torch.rand(T, N, generator=g)[:, :6] + torch.linspace(2, 0, 6)).topk(K, dim=1).indices
    x = torch.randn(T, D, generator=g).to(dtype)
    w1 = torch.randn(N, E, D, generator=g).to(dtype)
    b1 = torch.randn(N, E, generator=g).to(dtype) if bias else None
    w2 = torch.randn(N, E, D, generator=g).to(dtype)
    if column_view:  # W_out's [N, E, D] view of a [D, N * E] matrix (unit stride along E)
        w2 = w2.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    return x, w1, b1, w2, make_plan(idx, N), torch.rand(T * K, generator=g)


def _compile_main():  # in a subprocess: compile-only launches for sm_90 (tools/compile_report.py's driver)
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import compile_report as cr

    from ssd_megatron.ffn.backends.kernels import mlp_launch, tile_configs as tc
    cr.offline(90)
    tc.force_config(mlp=WS)

    def launch(name, act, E, dtype, combine, column_view, save_h):
        x, w1, b1, w2, plan, gate = _case(act, E, getattr(torch, dtype), column_view,
                                          bias=name != "squared-relu-no-bias")
        return lambda: mlp_launch.mlp_forward(x, w1, b1, w2, plan, gate, act, save_h, combine)
    print("MLPWS " + json.dumps(cr.compile_each({name: launch(name, *c) for name, c in LAUNCHES.items()})))


@pytest.fixture(scope="module")
def compiled():
    """{LAUNCHES name: [[kernel name, compile_report's resources], ...] or the compile error}."""
    _compile_env()
    from ssd_megatron.ffn.backends.kernels import mlp_gluon
    if mlp_gluon._build_once() is None:
        pytest.skip(f"this triton ({__import__('triton').__version__}) has no Gluon the WS fused forward builds with")
    return compiled_in_subprocess(os.path.abspath(__file__), "MLPWS", timeout=900)


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_ws_fused_forward_compiles_for_sm90(compiled, name):
    """Each specialisation (activation, split or single E tile, combine, W2 layout, h stored, bias, bf16 and fp16)
    compiles for sm_90 as one warp-specialised kernel: cp.async gathers of x, TMA loads of the weights, wgmma, and
    native vector atomics where it adds (no compare-and-swap loop); the launcher took it, not kernels/mlp.py."""
    res = compiled[name]
    assert not isinstance(res, str), res
    assert [kname for kname, _ in res] == ["mlp_ws_kernel"], res
    r = res[0][1]
    assert r["warps"] == 16 and r["ldgsts"] > 0 and r["utmaldg"] > 0 and r["mma"].startswith("64x"), r
    assert r["cas"] == 0 and (r["atom"] > 0) == (LAUNCHES[name][3] != "buffer"), r
    assert r["smem_kb"] * 1024 <= 227 * 1024, r


# why the launcher does not take the Gluon kernel -> (activation, E, D, dtype, config)
NOT_SERVED = {"cpu": ("relu", 192, 128, torch.bfloat16, WS),
              "older-triton": ("relu", 192, 128, torch.bfloat16, WS),
              "glu": ("swiglu", 64, 128, torch.bfloat16, WS),
              "ragged-e": ("relu", 24, 128, torch.bfloat16, WS),       # 16 + 16 columns would reach the next expert
              "ragged-d": ("relu", 64, 96, torch.bfloat16, WS),        # D not a multiple of BK
              "fp32": ("relu", 64, 128, torch.float32, WS),
              "smem": ("relu", 192, 128, torch.bfloat16, (128, 64, 64, 8, 4, 5)),
              "bn-not-bk": ("relu", 64, 128, torch.bfloat16, (128, 128, 64, 2, 2, 5)),  # W1, W2 tiles share slots
              "wide-e": ("relu", 512, 128, torch.bfloat16, (128, 64, 64, 2, 2, 5)),  # more than two 128-column tiles
              "one-slot-ring": ("relu", 64, 128, torch.bfloat16, (128, 64, 64, 1, 3, 5)),
              "bm": ("relu", 64, 128, torch.bfloat16, (64, 64, 64, 2, 3, 5))}


@pytest.mark.parametrize("why", list(NOT_SERVED) + ["served"])
def test_ws_fused_forward_falls_back(monkeypatch, why):
    """mlp variant 5 launches the Gluon kernel over the M-tile table where it serves, with the tile, activation and
    combine asked for; kernels/mlp.py (pointer loads) otherwise: not sm_90 (here: CPU), a Triton without the Gluon
    it is written for, a gated activation, E not exactly one or two power-of-two tiles of at most 128 columns, D
    not a multiple of BK, fp32, too much shared memory, a weight ring of one slot, BN other than BK, BM other than
    128."""
    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends.kernels import mlp_launch, tile_configs as tc, tile_order
    from ssd_megatron.ffn.backends.kernels import mlp_gluon
    calls = []
    monkeypatch.setattr(mlp_launch, "_mlp_kernel", Recorder(calls, "triton"))
    monkeypatch.setattr(mlp_gluon, "launch", Recorder(calls, "ws"))
    gluon_stand_in(monkeypatch, mlp_gluon, why)
    act, E, D, dtype, cfg = NOT_SERVED.get(why, ("relu", 192, 128, torch.bfloat16, WS))
    x, w1, b1, w2, plan, gate = _case(act, E, dtype, D=D)
    if act == "swiglu":
        w1 = torch.cat([w1, w1], 1)
    tc.force_config(mlp_glu=cfg, mlp=cfg)
    try:
        mlp_launch.mlp_forward(x, w1, b1, w2, plan, gate, act, False, "atomic16")
    finally:
        tc.force_config()
    assert len(calls) == 1, calls
    name, args, kwargs = calls[0]
    if why == "served" and mlp_gluon._build_once() is not None:
        assert name == "ws", (name, kwargs)
        assert torch.equal(args[4], tile_order.expert_tiles(plan.offsets, plan.num_rows, plan.num_experts, 128))
        assert args[11:] == (0, True, 128, 64, 64, 2, 3, 128, 64), args[11:]  # relu, atomic, the tile, E's two tiles
    else:  # (served, but this Triton has no Gluon that builds it: kernels/mlp.py too)
        assert name == "triton" and kwargs["BM"] == cfg[0], (name, kwargs)


def test_ws_fused_forward_auto_under_capture(monkeypatch):
    """`auto` (no config forced) takes the Gluon forward at base-like shapes for an inference forward launched while
    a CUDA graph is captured, once an eager launch with the same launch key has loaded its module; it is that eager
    launch itself the first time (the warm-up before a capture), then kernels/mlp.py for later eager forwards and for a
    capture of a launch never run eagerly (CUDA refuses to load a module while capturing); training forwards (h
    saved) by the same rule, with keys of their own."""
    launcher, _, calls, state = auto_stand_in(monkeypatch, "mlp_gluon", "mlp_launch", "_mlp_kernel")
    from ssd_megatron.ffn.backends.kernels import auto_ws
    x, w1, b1, w2, plan, gate = _case("relu", 192, torch.bfloat16, column_view=True)
    x2, *_ = _case("relu", 192, torch.bfloat16, column_view=True, T=64)
    plan2 = _case("relu", 192, torch.bfloat16, T=64)[4]

    def forward(capturing, x=x, plan=plan, save_h=False):
        state["capturing"] = capturing
        calls.clear()
        launcher.mlp_forward(x, w1, b1, w2, plan, gate[:x.shape[0] * 2], "relu", save_h, "atomic16")
        (name, args, kwargs), = calls
        return name, (args[13:18] if name == "ws" else kwargs["BM"])

    assert forward(True) == ("triton", 128)          # captured before any eager launch: kernels/mlp.py
    assert forward(False) == ("ws", auto_ws.AUTO_MLP_WS[:5])  # the first eager launch loads the Gluon kernel
    assert forward(False)[0] == "triton"             # later eager forwards: less host time per launch
    assert forward(True) == ("ws", auto_ws.AUTO_MLP_WS[:5])   # captured: the loaded kernel
    assert forward(True, x2, plan2)[0] == "triton"   # another launch key (fewer tokens), never launched eagerly
    # training (h stored): its own keys, the same rule
    assert forward(True, save_h=True)[0] == "triton"
    assert forward(False, save_h=True) == ("ws", auto_ws.AUTO_MLP_WS[:5])
    assert forward(False, save_h=True)[0] == "triton"
    assert forward(True, save_h=True) == ("ws", auto_ws.AUTO_MLP_WS[:5])


def test_gluon_launch_records_are_bounded(monkeypatch):
    """Once kernels/gluon_launches.py's records hold MAX_KEYS entries (shapes that keep changing: a run no CUDA graph
    captures), eager forwards of new shapes keep kernels/mlp.py instead of paying the Gluon launch's host time, the
    records stop growing, and captures still take the Gluon kernel for the keys recorded before."""
    launcher, _, calls, state = auto_stand_in(monkeypatch, "mlp_gluon", "mlp_launch", "_mlp_kernel")
    from ssd_megatron.ffn.backends.kernels import gluon_launches
    monkeypatch.setattr(gluon_launches, "MAX_KEYS", 2)
    cases = [_case("relu", 192, torch.bfloat16, column_view=True, T=T) for T in (100, 64, 32)]

    def forward(capturing, i):
        x, w1, b1, w2, plan, gate = cases[i]
        state["capturing"] = capturing
        calls.clear()
        launcher.mlp_forward(x, w1, b1, w2, plan, gate, "relu", False, "atomic16")
        return calls[0][0]

    assert [forward(False, i) for i in range(3)] == ["ws", "ws", "triton"]  # the third shape finds the records full
    assert len(gluon_launches._EAGER) == len(gluon_launches._LAUNCHED) == 2
    assert [forward(True, i) for i in range(3)] == ["ws", "ws", "triton"]
    # the launch keys' record full alone (other launches of the same shapes: tiles, flags) also ends eager WS launches,
    # which could no longer make a capture take the kernel
    gluon_launches._EAGER.clear()
    assert forward(False, 2) == "triton"


def test_ws_fused_forward_config():
    """mlp=...,5 is accepted, its fourth entry (the weight ring's depth) need not be a power of two; for other kinds
    the fourth entry (warps) still must be."""
    pytest.importorskip("triton")
    from ssd_megatron.errors import UserError
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    assert tc.parse_configs("mlp=128,64,64,3,3,5") == {"mlp": (128, 64, 64, 3, 3, tc.WS)}
    with pytest.raises(UserError, match="powers of two"):
        tc.parse_configs("mlp=128,64,64,3,3")
    with pytest.raises(UserError, match="powers of two"):
        tc.parse_configs("down=128,64,64,3,3,5")


if __name__ == "__main__":
    _compile_main()


def test_probe_tool_substitutions_match_the_kernel_source():
    """tools/probe_mlp_ws.py removes parts of the kernel by replacing source lines: each must still be there."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import probe_mlp_ws

    from ssd_megatron.ffn.backends.kernels import mlp_gluon
    src = open(mlp_gluon.__file__).read()
    missing = [(name, old) for name, subs in probe_mlp_ws.PROBES.items() for old, _ in subs if old not in src]
    assert not missing, missing
