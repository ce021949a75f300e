"""Master weights in the triton backend: fp32 weights with fp16 tokens (as under autocast), cast inside the
custom op, weight gradients returned in fp32 straight from the wgrad kernel (no rounding to the tokens'
dtype, no split buffer to copy, no cast back by autograd).

Under TRITON_INTERPRET=1 on CPU (tests/interpreted.py: a fresh interpreter per function). fp16 stands in
for bf16: the interpreter computes fp16 tl.dot correctly, bf16 not (test_triton_interpret.py's note);
the code path is the same. The bf16 GPU check is test_backends_gpu.py's test_triton_master_weights_bf16.
"""
import json
import os
import sys

import pytest
import torch

from tests.interpreted import run_interpreted

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TINY = (16, 16, 16, 1, 1)
# (inputs, backend options, wgrad row chunk, fold the router): the split wgrad adding its fp32 atomics
# straight into the (strided) gradient, W_out's column view as w2, GLU with the pre-gathered wgrad, the
# torch._grouped_mm wgrad, and the router folded into the kernels
RUNS = [
    (dict(activation="relu", T=37, routing="empty"), {}, 32, False),
    (dict(activation="gelu_tanh", T=17, K=2), {"column_view_w2": True}, 32, False),
    (dict(activation="swiglu", T=19, bias=False, D=40), {"wgrad": "triton_mat"}, 0, False),
    (dict(activation="reglu", T=13, N=3, E=24, K=2), {"wgrad": "gmm"}, 0, False),
    (dict(activation="swiglu", T=21, K=2), {}, 32, True),
]
LOW = torch.float16


def _mixed(inp):
    """fp32 weights (leaves), fp16 tokens, gate and output gradient."""
    out = dict(inp)
    for k in ("x", "gate"):
        out[k] = inp[k].detach().to(LOW).requires_grad_()
    out["dy"] = inp["dy"].to(LOW)
    return out


class _CastOutside:
    """The backend called as before master weights: weights cast to the tokens' dtype by the caller, their
    gradients cast back by autograd (the output bias folded as the backend offers)."""

    def __init__(self, backend):
        self.backend, self.folds_output_bias = backend, backend.folds_output_bias

    def __call__(self, x, w1, b1, w2, *args, **kwargs):
        return self.backend(x, w1.to(x.dtype), None if b1 is None else b1.to(x.dtype), w2.to(x.dtype), *args,
                            **kwargs)


def backend_results():
    from backend_cases import compare, make_inputs, run, run_router, upcast, with_column_view_w2
    from ssd_megatron.ffn.backends import ReferenceBackend
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    out = []
    for case, opts, chunk, fold in RUNS:
        tc.force_config(up=TINY, up_glu=TINY, up_bwd=TINY, up_bwd_glu=TINY, down=TINY, wgrad=TINY + (chunk,))
        opts = dict(opts)
        inp = make_inputs(dtype=torch.float32, **case)
        if opts.pop("column_view_w2", False):
            inp = with_column_view_w2(inp)
        inp = _mixed(inp)
        be = TritonBackend(**opts)
        try:
            assert be.takes_master_weights(inp["x"])
            if fold:
                got = run_router(be, inp, fold=True)
                outside = run_router(_CastOutside(TritonBackend(master_weights=False, **opts)), inp, fold=True)
                want = run_router(ReferenceBackend(), upcast(inp), fold=False)
            else:
                got = run(be, inp)
                outside = run(_CastOutside(TritonBackend(master_weights=False, **opts)), inp)
                want = run(ReferenceBackend(), upcast(inp))
            # the gradients as the backend returned them (before accumulation into a leaf's .grad)
            y = be(inp["x"], inp["w1"], inp["b1"], inp["w2"], inp["topk_idx"], inp["gate"], inp["activation"])
            names = [k for k in ("x", "w1", "b1", "w2") if inp[k] is not None]
            grads = torch.autograd.grad(y, [inp[k] for k in names], inp["dy"])
            out.append({"vs_reference": compare(got, want, tol=float("inf")),
                        "vs_cast_outside": compare(got, outside, tol=float("inf")),
                        "y_dtype": str(got[0].dtype),
                        "grad_dtypes": {k: str(g.dtype) for k, g in zip(names, grads)},
                        # fp32 sums, not fp16 values: some entry differs from its own fp16 rounding
                        "unrounded": {k: bool((g.to(LOW).float() != g).any())
                                      for k, g in zip(names, grads) if k != "x"}})
        except Exception as exc:
            out.append({"exception": f"{type(exc).__name__}: {exc}"[:2000]})
    print(json.dumps(out))


def opcheck_results():
    """opcheck of both custom ops with master weights: the fake implementations' extra outputs (the casts
    kept for the backward) and fp32 weight gradients must match the real ones."""
    from backend_cases import make_inputs, with_column_view_w2
    inp = _mixed(with_column_view_w2(make_inputs(dtype=torch.float32, activation="swiglu", T=19)))
    x, w1, b1, w2, gate = (inp[k] for k in ("x", "w1", "b1", "w2", "gate"))
    gate_flat = gate.reshape(-1).contiguous()
    fwd = (x, w1, b1, w2, gate_flat, inp["topk_idx"], "swiglu", "atomic32", "triton", True)
    out = []
    try:
        torch.library.opcheck(torch.ops.ssd_megatron.triton_experts.default, fwd)
        y, h, order, token, offsets, w1c, w2c = torch.ops.ssd_megatron.triton_experts(*fwd)
        out.append([str(w1c.dtype), list(w1c.shape), str(w2c.dtype), list(w2c.stride()) == list(w2.stride())])
        bwd = (inp["dy"], x.detach(), w1.detach(), w2.detach(), gate_flat.detach(), h, order, token, offsets,
               inp["topk_idx"], "swiglu", True, "atomic32", "triton", [True] * 6, None, "epilogue", w1c, w2c,
               inp["b2"].detach())
        torch.library.opcheck(torch.ops.ssd_megatron.triton_experts_backward.default, bwd,
                              test_utils=("test_schema", "test_faketensor"))
        grads = torch.ops.ssd_megatron.triton_experts_backward(*bwd)
        out.append([str(g.dtype) for g in grads])
    except Exception as exc:
        out.append(f"{type(exc).__name__}: {exc}"[:2000])
    print(json.dumps(out))


def layer_results():
    """SwitchableFFN (expert-major, router folded) under CPU autocast to fp16: the layer hands the backend its
    fp32 parameters, and its backward casts no weight-sized tensor (with master_weights=False it casts
    W_i's and W_o's gradients back to fp32). Same function and gradients either way."""
    import copy

    from backend_cases import expert_major_sparse_ffn, rel_err
    from torch.utils._python_dispatch import TorchDispatchMode

    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend

    class Casts(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.ops = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            src = args[0] if args else None
            if (torch.is_tensor(out) and torch.is_tensor(src) and out.numel() >= self.numel
                    and out.dtype != src.dtype):
                self.ops.append(f"{func} {src.dtype}->{out.dtype}")
            return out

    tc.force_config(up=TINY, up_glu=TINY, up_bwd=TINY, up_bwd_glu=TINY, down=TINY, wgrad=TINY + (32,))
    ffn = expert_major_sparse_ffn(32, 64, "relu", 4, 2)
    x = torch.randn(45, 32)
    res, casts = {}, {}
    for master in (True, False):
        f = copy.deepcopy(ffn)
        f.set_backend(TritonBackend(master_weights=master))
        with torch.autocast("cpu", dtype=LOW):
            y = f(x.clone().requires_grad_())
        with Casts(32 * 64) as mode:
            y.float().square().sum().backward()
        casts[master] = mode.ops
        res[master] = [y.detach()] + [p.grad for p in f.parameters()]
    print(json.dumps({"casts": {str(k): v for k, v in casts.items()},
                      "errors": [rel_err(a, b) for a, b in zip(res[True], res[False])],
                      "grad_dtypes": [str(g.dtype) for g in res[True][1:]]}))


def bench_layer_results():
    """ssd-bench ffn's layer with fp32 parameters under autocast (--params fp32), fp16 tokens: its sparse
    path hands the triton backend the fp32 weights (fp32 grads), equal to the same layer with the offer
    off (the weights cast to the tokens' dtype) up to the weight grads' rounding; its dense path runs under
    autocast."""
    from backend_cases import rel_err

    from ssd_megatron.bench.ffn import Layer
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    tc.force_config(up=TINY, up_glu=TINY, up_bwd=TINY, up_bwd_glu=TINY, down=TINY, wgrad=TINY + (32,))
    layer = Layer("tiny", "relu", torch.device("cpu"), LOW, seed=0, params=torch.float32)
    # seeded: the router's scores come from fp32 centroids in one run and fp16 ones in the other, so an
    # unseeded x could put two experts within rounding of a tie and route a token differently (seen once)
    x = torch.randn(33, layer.D, generator=torch.Generator().manual_seed(0)).to(LOW)
    res = {}
    for master in (True, False):
        for p in layer.params():
            p.grad = None
        xi = x.clone().requires_grad_()
        y = layer.sparse(xi, TritonBackend(master_weights=master))
        y.float().square().sum().backward()
        res[master] = [y.detach(), xi.grad] + [p.grad for p in layer.params() if p.grad is not None]
    yd = layer.dense(x)
    print(json.dumps({"errors": [rel_err(a, b) for a, b in zip(res[True], res[False])],
                      "dtypes": [str(t.dtype) for t in res[True]], "dense_dtype": str(yd.dtype)}))


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: checked compiled in bf16 (test_backends_gpu.py)")
    return {f: run_interpreted(__file__, f)
            for f in ("backend_results", "opcheck_results", "layer_results", "bench_layer_results")}


@pytest.mark.parametrize("i", range(len(RUNS)), ids=[f"{c['activation']}-{'-'.join(o) or 'default'}-chunk{ch}"
                                                      + ("-fold" if f else "") for c, o, ch, f in RUNS])
def test_master_weights_match_reference_with_fp32_grads(interpreted, i):
    res = interpreted["backend_results"][i]
    assert "exception" not in res, res["exception"]
    assert res["y_dtype"] == "torch.float16"
    assert res["grad_dtypes"] == {k: ("torch.float16" if k == "x" else "torch.float32") for k in res["grad_dtypes"]}
    if RUNS[i][1].get("wgrad") != "gmm":  # torch._grouped_mm's output has its inputs' dtype, then widened
        assert all(res["unrounded"].values()), res["unrounded"]
    # the same computation as casting outside: the same output and token/gate grads, bit for bit; the weight
    # grads differ from it by their rounding to fp16 only
    assert all(res["vs_cast_outside"].get(k, 0) == 0 for k in ("y", "x", "gate")), res["vs_cast_outside"]
    bad = {k: v for k, v in {**res["vs_reference"], **res["vs_cast_outside"]}.items() if not v <= 2e-3}
    assert not bad, res


def test_master_weights_custom_ops_pass_opcheck(interpreted):
    casts, grads = interpreted["opcheck_results"]
    assert casts[0] == "torch.float16" and casts[2] == "torch.float16" and casts[3], casts
    # dx, dw1, db1, dw2, dgate, and the fp32 output bias's gradient
    assert grads == ["torch.float16", "torch.float32", "torch.float32", "torch.float32", "torch.float16",
                     "torch.float32"], grads


def test_switchable_ffn_backward_casts_no_weights(interpreted):
    res = interpreted["layer_results"]
    assert res["casts"]["True"] == [], res["casts"]
    assert len(res["casts"]["False"]) >= 2, res["casts"]  # the control: W_i's and W_o's gradients cast back
    assert all(d == "torch.float32" for d in res["grad_dtypes"])
    assert max(res["errors"]) <= 5e-3, res["errors"]


def test_bench_layer_with_fp32_params(interpreted):
    res = interpreted["bench_layer_results"]
    assert res["dtypes"][:2] == ["torch.float16", "torch.float16"], res["dtypes"]  # y, x's grad
    assert set(res["dtypes"][2:]) == {"torch.float32"}, res["dtypes"]  # the fp32 leaves' grads
    assert res["dense_dtype"] == "torch.float16"
    # the same output; x's grad takes the router's term c_e, a mean of fp32 rather than of fp16 rows
    assert res["errors"][0] == 0 and max(res["errors"]) <= 2e-3, res["errors"]
