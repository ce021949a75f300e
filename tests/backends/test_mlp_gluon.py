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
    from .backend_cases import Recorder, capture_stand_in, gluon_stand_in
    from .test_offline_compile import _compile_env, compiled_in_subprocess
except ImportError:  # run as a script: the compile subprocess, which needs none of them
    Recorder = capture_stand_in = gluon_stand_in = _compile_env = compiled_in_subprocess = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WS = (128, 64, 64, 2, 3, 5)  # BM, BN, BK, the weight ring's depth, the x ring's, variant 5
# name -> (activation, E, dtype, combine, W2 as W_out's column view, h saved): base's split E = 128 + 64 in the
# inference forward (bf16 adds, the layer's column view), a training forward storing h (gelu, the (t, k) rows),
# fp16 with fp32 adds, squared ReLU without a bias
LAUNCHES = {"base-inference": ("relu", 192, "bfloat16", "atomic16", True, False),
            "train-buffer": ("gelu", 64, "bfloat16", "buffer", False, True),
            "fp16-atomic32": ("relu", 192, "float16", "atomic32", True, True),
            "squared-relu-no-bias": ("squared_relu", 128, "bfloat16", "atomic16", False, False)}


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


# the fused backward (mlp_bwd variant 5): name -> (activation, E, dtype, combine, W2 as W_out's column view, ga and
# db1 wanted, the router's term): base's as the layer runs it, GELU on one 128-column tile with fp32 adds and without
# the router, fp16 tanh-GELU without db1
BWD_LAUNCHES = {"bwd-base": ("relu", 192, "bfloat16", "atomic16", True, True, True),
                "bwd-gelu-atomic32": ("gelu", 128, "bfloat16", "atomic32", False, True, False),
                "bwd-fp16-gelu-tanh": ("gelu_tanh", 192, "float16", "atomic16", True, False, True)}


def _bwd_case(activation, E, dtype, column_view=False, T=100, D=128):
    """(dy, w1, w2, h, plan, gate, centroids) on CPU for mlp_backward, from `_case`."""
    x, w1, _, w2, plan, gate = _case(activation, E, dtype, column_view, T=T, D=D)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(plan.num_rows, E, generator=g).to(dtype)
    return torch.randn(x.shape, generator=g).to(dtype), w1, w2, h, plan, gate, w1.float().mean(1)


def _compile_main():  # in a subprocess: compile-only launches for sm_90 (tools/compile_report.py's driver)
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import compile_report as cr

    from ssd_megatron.ffn.backends import _triton_kernels as K
    cr.offline(90)
    K.force_config(mlp=WS, mlp_bwd=WS)

    def launch(name, act, E, dtype, combine, column_view, save_h):
        x, w1, b1, w2, plan, gate = _case(act, E, getattr(torch, dtype), column_view,
                                          bias=name != "squared-relu-no-bias")
        return lambda: K.mlp_forward(x, w1, b1, w2, plan, gate, act, save_h, combine)

    def backward(act, E, dtype, combine, column_view, grads, router):
        dy, w1, w2, h, plan, gate, c = _bwd_case(act, E, getattr(torch, dtype), column_view)
        return lambda: K.mlp_backward(dy, w1, w2, h, gate, plan, act, combine, grads, grads, c if router else None)
    launches = {name: launch(name, *c) for name, c in LAUNCHES.items()}
    launches.update({name: backward(*c) for name, c in BWD_LAUNCHES.items()})
    print("MLPWS " + json.dumps(cr.compile_each(launches)))


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


@pytest.mark.parametrize("name", list(BWD_LAUNCHES))
def test_fused_backward_compiles_for_sm90(compiled, name):
    """The fused backward's specialisations (activation, split or single E tile, bf16 adds or fp32, W2 as W_out's
    column view, gate * a and db1, the router's term) compile for sm_90 as the same warp-specialised kernel with
    its backward epilogue: cp.async gathers of dy, TMA loads of the weights, wgmma, native atomics into dx."""
    res = compiled[name]
    assert not isinstance(res, str), res
    assert [kname for kname, _ in res] == ["mlp_ws_kernel"], res
    r = res[0][1]
    assert r["warps"] == 16 and r["ldgsts"] > 0 and r["utmaldg"] > 0 and r["mma"].startswith("64x"), r
    assert r["cas"] == 0 and r["atom"] > 0 and r["smem_kb"] * 1024 <= 227 * 1024, r


# why the launcher does not take the Gluon kernel -> (activation, E, D, dtype, config)
NOT_SERVED = {"cpu": ("relu", 192, 128, torch.bfloat16, WS),
              "older-triton": ("relu", 192, 128, torch.bfloat16, WS),
              "glu": ("swiglu", 64, 128, torch.bfloat16, WS),
              "ragged-e": ("relu", 24, 128, torch.bfloat16, WS),       # 16 + 16 columns would reach the next expert
              "ragged-d": ("relu", 64, 96, torch.bfloat16, WS),        # D not a multiple of BK
              "fp32": ("relu", 64, 128, torch.float32, WS),
              "smem": ("relu", 192, 128, torch.bfloat16, (128, 64, 64, 8, 4, 5)),
              "bn-not-bk": ("relu", 64, 128, torch.bfloat16, (128, 128, 64, 2, 2, 5)),  # W1, W2 tiles share slots
              "wide-e": ("relu", 256, 128, torch.bfloat16, (128, 64, 64, 2, 2, 5)),  # one 256-column tile
              "one-slot-ring": ("relu", 64, 128, torch.bfloat16, (128, 64, 64, 1, 3, 5)),
              "bm": ("relu", 64, 128, torch.bfloat16, (64, 64, 64, 2, 3, 5))}


@pytest.mark.parametrize("why", list(NOT_SERVED) + ["served"])
def test_ws_fused_forward_falls_back(monkeypatch, why):
    """mlp variant 5 launches the Gluon kernel over the M-tile table where it serves, with the tile, activation and
    combine asked for; kernels/mlp.py (pointer loads) otherwise: not sm_90 (here: CPU), a Triton without the Gluon
    it is written for, a gated activation, E not exactly one or two power-of-two tiles or a first tile wider than
    128, D not a multiple of BK, fp32, too much shared memory, a weight ring of one slot, BN other than BK, BM other
    than 128."""
    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends import _triton_kernels as K
    from ssd_megatron.ffn.backends.kernels import mlp_gluon
    calls = []
    monkeypatch.setattr(K, "_mlp_kernel", Recorder(calls, "triton"))
    monkeypatch.setattr(mlp_gluon, "launch", Recorder(calls, "ws"))
    gluon_stand_in(monkeypatch, mlp_gluon, why)
    act, E, D, dtype, cfg = NOT_SERVED.get(why, ("relu", 192, 128, torch.bfloat16, WS))
    x, w1, b1, w2, plan, gate = _case(act, E, dtype, D=D)
    if act == "swiglu":
        w1 = torch.cat([w1, w1], 1)
    K.force_config(mlp_glu=cfg, mlp=cfg)
    try:
        K.mlp_forward(x, w1, b1, w2, plan, gate, act, False, "atomic16")
    finally:
        K.force_config()
    assert len(calls) == 1, calls
    name, args, kwargs = calls[0]
    if why == "served" and mlp_gluon._build_once() is not None:
        assert name == "ws", (name, kwargs)
        assert torch.equal(args[4], K.expert_tiles(plan.offsets, plan.num_rows, plan.num_experts, 128))
        assert args[11:] == (0, True, 128, 64, 64, 2, 3, 128, 64), args[11:]  # relu, atomic, the tile, E's two tiles
    else:  # (served, but this Triton has no Gluon that builds it: kernels/mlp.py too)
        assert name == "triton" and kwargs["BM"] == cfg[0], (name, kwargs)


def test_ws_fused_forward_auto_in_captured_inference(monkeypatch):
    """`auto` (no config forced) takes the Gluon forward at base-like shapes for an inference forward launched while
    a CUDA graph is captured, once an eager launch with the same launch key has loaded its module; it is that eager
    launch itself the first time (the warm-up before a capture), then kernels/mlp.py for later eager forwards, for a
    capture of a launch never run eagerly (CUDA refuses to load a module while capturing), and for every training
    forward (h saved)."""
    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends import _triton_kernels as K
    from ssd_megatron.ffn.backends.kernels import mlp_gluon
    if mlp_gluon._build_once() is None:
        pytest.skip(f"this triton ({__import__('triton').__version__}) has no Gluon the WS fused forward builds with")
    calls, state = [], capture_stand_in(monkeypatch)
    monkeypatch.setattr(K, "_mlp_kernel", Recorder(calls, "triton"))
    monkeypatch.setattr(mlp_gluon, "launch", Recorder(calls, "ws"))
    gluon_stand_in(monkeypatch, mlp_gluon, "served")
    x, w1, b1, w2, plan, gate = _case("relu", 192, torch.bfloat16, column_view=True)
    x2, *_ = _case("relu", 192, torch.bfloat16, column_view=True, T=64)
    plan2 = _case("relu", 192, torch.bfloat16, T=64)[4]

    def forward(capturing, x=x, plan=plan, save_h=False):
        state["capturing"] = capturing
        calls.clear()
        K.mlp_forward(x, w1, b1, w2, plan, gate[:x.shape[0] * 2], "relu", save_h, "atomic16")
        (name, args, kwargs), = calls
        return name, (args[13:18] if name == "ws" else kwargs["BM"])

    assert forward(True) == ("triton", 128)          # captured before any eager launch: kernels/mlp.py
    assert forward(False) == ("ws", K.AUTO_MLP_WS[:5])  # the first eager launch loads the Gluon kernel
    assert forward(False)[0] == "triton"             # later eager forwards: less host time per launch
    assert forward(True) == ("ws", K.AUTO_MLP_WS[:5])   # captured: the loaded kernel
    assert forward(True, x2, plan2)[0] == "triton"   # another launch key (fewer tokens), never launched eagerly
    assert forward(False, save_h=True)[0] == forward(True, save_h=True)[0] == "triton"  # training: kernels/mlp.py


# why the fused backward is not taken -> (activation, E, combine, K)
BWD_NOT_SERVED = {"cpu": ("relu", 192, "atomic16", 2), "older-triton": ("relu", 192, "atomic16", 2),
                  "glu": ("swiglu", 64, "atomic16", 2), "buffer": ("relu", 192, "buffer", 2),
                  "one-expert-per-token": ("relu", 192, "atomic16", 1), "wide-e": ("relu", 256, "atomic16", 2)}


@pytest.mark.parametrize("why", list(BWD_NOT_SERVED) + ["served"])
def test_fused_backward_falls_back(monkeypatch, why):
    """mlp_bwd=...,5 launches the fused backward where it serves, with dy as the tokens, W2 as the up GEMM's
    weight and W1 as the down GEMM's, the saved h, a zeroed dx and every output; elsewhere mlp_backward returns
    None and the backend launches up_bwd and down for dx: not sm_90, no Gluon that builds it, a gated activation,
    deterministic sums ("buffer"), one expert per token (no K-way adds), a first E tile wider than 128."""
    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends import _triton_kernels as K
    from ssd_megatron.ffn.backends.kernels import mlp_gluon
    calls = []
    monkeypatch.setattr(mlp_gluon, "launch_backward", Recorder(calls, "ws"))
    gluon_stand_in(monkeypatch, mlp_gluon, why)
    act, E, combine, K_ = BWD_NOT_SERVED.get(why, ("relu", 192, "atomic16", 2))
    dy, w1, w2, h, plan, gate, c = _bwd_case(act, E, torch.bfloat16, column_view=True)
    if K_ == 1:  # 200 tokens routed to one expert each: as many rows as the K = 2 case's 100 tokens
        from ssd_megatron.ffn.backends.routing import make_plan
        plan = make_plan(torch.arange(200).remainder(8)[:, None], 8)
        dy = dy.repeat(2, 1)
    if act == "swiglu":
        h = torch.cat([h, h], 1)
    K.force_config(mlp_bwd=WS)
    try:
        out = K.mlp_backward(dy, w1, w2, h, gate, plan, act, combine, True, True, c)
    finally:
        K.force_config()
    if why == "served" and mlp_gluon._build_once() is not None:
        (name, args, kwargs), = calls
        dx, dh, dgate, ga, db = out
        assert dx.shape == dy.shape and dh.shape == ga.shape == h.shape and dgate.shape == (plan.num_rows,)
        assert args[0] is dy and args[1] is w1 and args[2] is w2 and args[8] is h and args[9].abs().sum() == 0
        assert torch.equal(args[3], K.expert_tiles(plan.offsets, plan.num_rows, plan.num_experts, 128))
        assert torch.equal(args[14], c.to(dy.dtype)) and db.dtype == torch.float32 and not db.any()
        assert args[15:] == (0, 128, 64, 64, 2, 3, 128, 64), args[15:]  # relu, the tile (WS), E's two tiles
    else:
        assert out is None and calls == [], (out, calls)


def test_fused_backward_auto_in_captured_training(monkeypatch):
    """`auto` (no config forced) takes the fused backward at base-like shapes by kernels/gluon_launches.py's rule:
    the first eager backward of a shape (its module loads), then up_bwd and down for dx for later eager ones, the
    fused kernel in a capture once an eager launch with the same launch key ran, and not for a capture of a key
    never launched eagerly."""
    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends import _triton_kernels as K
    from ssd_megatron.ffn.backends.kernels import mlp_gluon
    if mlp_gluon._build_once() is None:
        pytest.skip(f"this triton ({__import__('triton').__version__}) has no Gluon the fused backward builds with")
    calls, state = [], capture_stand_in(monkeypatch)
    monkeypatch.setattr(K, "AUTO_FUSED_BACKWARD", True)
    monkeypatch.setattr(mlp_gluon, "launch_backward", Recorder(calls, "ws"))
    gluon_stand_in(monkeypatch, mlp_gluon, "served")
    big = _bwd_case("relu", 192, torch.bfloat16, column_view=True)
    small = _bwd_case("relu", 192, torch.bfloat16, column_view=True, T=64)

    def backward(capturing, case=big):
        dy, w1, w2, h, plan, gate, c = case
        state["capturing"] = capturing
        calls.clear()
        out = K.mlp_backward(dy, w1, w2, h, gate, plan, "relu", "atomic16", True, True, c)
        assert (out is None) == (calls == []), (out, calls)
        return out is not None

    assert not backward(True)              # captured before any eager launch: up_bwd and down
    assert backward(False)                 # the first eager launch loads the fused kernel
    assert not backward(False)             # later eager backwards: less host time per launch
    assert backward(True)                  # captured: the loaded kernel
    assert not backward(True, small)       # another launch key, never launched eagerly


def test_ws_fused_forward_config():
    """mlp=...,5 is accepted, its fourth entry (the weight ring's depth) need not be a power of two; for other kinds
    the fourth entry (warps) still must be."""
    pytest.importorskip("triton")
    from ssd_megatron.errors import UserError
    from ssd_megatron.ffn.backends import _triton_kernels as K
    assert K._parse_configs("mlp=128,64,64,3,3,5") == {"mlp": (128, 64, 64, 3, 3, K.WS)}
    assert K._parse_configs("mlp_bwd=128,64,64,6,4,5") == {"mlp_bwd": (128, 64, 64, 6, 4, K.WS)}
    with pytest.raises(UserError, match="powers of two"):
        K._parse_configs("mlp=128,64,64,3,3")
    with pytest.raises(UserError, match="powers of two"):
        K._parse_configs("down=128,64,64,3,3,5")


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
