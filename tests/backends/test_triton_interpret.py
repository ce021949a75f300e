"""The triton backend's kernels under TRITON_INTERPRET=1 on CPU, tiny shapes, fp32 (and its routing plan's
counting sort against torch's stable sort).

Runs in a subprocess: triton reads TRITON_INTERPRET when a @triton.jit function is defined, including
its own library functions (tl.cumsum...), so the variable must be set before triton is imported.
The interpreter (triton 3.9 seen) computes fp32 tl.dot correctly but not bf16/fp64 ones, so bf16 is
checked on the GPU only (test_backends_gpu.py). Tiles are forced to 16 so that tiny shapes still span
several tiles and experts per launch, with partial tiles and empty experts.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

CASES = [  # (inputs, TritonBackend options)
    (dict(activation="relu", T=37, routing="empty"), {"fold_output": True}),    # empty experts, partial tiles
    (dict(activation="gelu", T=21, K=1, routing="skewed"), {}),                 # K=1, unbalanced
    (dict(activation="squared_relu", T=9, N=4, K=4), {"combine": "atomic16", "fold_output": True}),  # K=N
    (dict(activation="swiglu", T=19, bias=False, D=40), {"wgrad": "triton_mat"}),  # GLU, D not a tile multiple
    (dict(activation="reglu", T=13, N=3, E=24, K=2), {"wgrad": "gmm", "combine": "atomic32"}),
    (dict(activation="gelu_tanh", T=17, K=2), {"column_view_w2": True, "fold_output": True}),  # W_out's view
    (dict(activation="relu", T=29, K=3), {}),  # default while training: fill launches, the bias added outside
    (dict(activation="relu", T=23, K=2), {"combine": "buffer"}),   # deterministic sums, the bias added after
    # the fused forward (up, activation and down in one kernel; y initialised by the routing plan)
    (dict(activation="relu", T=37, routing="empty"), {"fused_forward": True, "fold_output": True}),
    (dict(activation="gelu", T=21, K=1, routing="skewed"), {"fused_forward": True}),  # K = 1: rows stored
    (dict(activation="swiglu", T=19, bias=False, D=40), {"fused_forward": True, "fold_output": True}),  # GLU
    (dict(activation="reglu", T=13, N=3, E=24, K=2), {"fused_forward": True, "combine": "atomic32"}),  # 16 + 16
    (dict(activation="squared_relu", T=23, K=2), {"fused_forward": True, "combine": "buffer"}),
    (dict(activation="gelu_tanh", T=17, K=2), {"fused_forward": True, "column_view_w2": True, "fold_output": False}),
    (dict(activation="geglu", T=23, E=48, K=2), {"fused_forward": True, "fold_output": True}),  # E = 32 + 16
    (dict(activation="relu", T=31, E=48, K=3), {"fused_forward": True}),   # the same without GLU
    # w2_view on W_out's column view: the interpreter never takes the WS down kernel, so no copy is made and the
    # down reads the view (the WS kernel with the copy or by TMA: test_backends_gpu.py)
    (dict(activation="swiglu", T=19, K=2), {"column_view_w2": True, "w2_view": "copy", "fold_output": True}),
    (dict(activation="swiglu", T=17, K=3), {"column_view_w2": True, "w2_view": "tma"}),
]
# the same checks with the kernels' variants, as (down variant, wgrad row chunk, M-tile order, wgrad BP =
# up BN, up_bwd in two passes): wgrad reductions split into chunks of 32 rows (fp32 atomic sums; experts
# of 0, 1 and several chunks); the down GEMM as ROWLOOP (1: a program covers all output columns), with TMA
# descriptors (3) or STAGED (4: A rows loaded once); BP/BN 64 >= P, E: whole-P wgrad and whole-E up
# programs (case 4: widths 24 and 48 as 16 + 16 and 32 + 16); up_bwd as the GEMM, then its epilogue; and
# the up/down M-tiles in token-window order (SSD_TRITON_TILE_ORDER=token, and token:2 within groups of two
# experts; empty experts, K = N, GLU)
VARIANT_CASES = [0, 1, 2, 3, 5]
VARIANTS = [(1, 32, "auto", 16, 0), (3, 0, "auto", 16, 0), (0, 0, "token", 16, 0), (1, 0, "token", 16, 0),
            (3, 32, "token", 16, 0), (4, 0, "auto", 64, 0), (4, 32, "token", 64, 0), (0, 0, "auto", 16, 1),
            (1, 32, "token", 64, 1), (1, 0, "token:2", 16, 0)]
FUSED_TOKEN_ORDER = [8, 10]  # the fused forward's M-tiles from the token-window schedule
# the fused forward with its weights by TMA (mlp variant 3, with down's): E = 16 (one tile; empty experts), W_out's
# column view, E = 48 = 32 + 16; and a gated activation, which keeps the pointer loads
FUSED_TMA = [8, 13, 15, 11]
RUNS = ([(c, (0, 0, "auto", 16, 0)) for c in range(len(CASES))] + [(c, v) for v in VARIANTS for c in VARIANT_CASES]
        + [(c, (0, 0, "token", 16, 0)) for c in FUSED_TOKEN_ORDER]
        + [(4, (4, 0, "auto", 64, 0)), (4, (4, 32, "auto", 64, 1))]
        + [(c, (3, 0, "auto", 16, 0)) for c in FUSED_TMA])
TOL = 1e-5


def _main():  # runs in the subprocess, TRITON_INTERPRET=1 set before anything imports triton
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from backend_cases import compare, make_inputs, run, upcast, with_column_view_w2
    from ssd_megatron.ffn.backends import ReferenceBackend
    from ssd_megatron.ffn.backends.kernels import tile_configs as configs
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    tiny = (16, 16, 16, 1, 1)
    results = []
    for c, (down_variant, chunk, order, bp, two) in RUNS:
        os.environ["SSD_TRITON_TILE_ORDER"] = order
        case, opts = CASES[c]
        _force_variant(configs, tiny, down_variant, chunk, bp, two)
        opts = dict(opts)
        inp = make_inputs(dtype=torch.float32, **case)
        if opts.pop("column_view_w2", False):
            inp = with_column_view_w2(inp)
        try:
            errs = compare(run(TritonBackend(**opts), inp), run(ReferenceBackend(), upcast(inp)), tol=float("inf"))
            results.append({"errors": errs})
        except Exception as exc:  # reported per case by the parent
            results.append({"exception": f"{type(exc).__name__}: {exc}"[:2000]})
    os.environ.pop("SSD_TRITON_TILE_ORDER")
    print("RESULTS " + json.dumps(results))
    print("PLANS " + json.dumps(_plan_results()))
    print("COMPILE " + json.dumps(_compile_results(configs, tiny)))
    print("OPCHECK " + json.dumps(_opcheck_results()))
    print("FOLD " + json.dumps(_fold_results(configs, tiny)))
    print("ZEROS " + json.dumps(_zero_fills_in_backward(configs, tiny)))
    print("ORDERS " + json.dumps(_order_results(configs, tiny)))


# `auto`'s M-tile order per launch (SSD_TRITON_TILE_ORDER unset): (inputs, TritonBackend options, the
# launches' `auto` orders in call order); grouped windows for the fused forward without a gate where the
# rows are 2048 wide, expert order (None) for up_bwd, down for dx, the unfused forward and narrow rows
ORDER_CASES = [(dict(activation="relu", T=9, D=2048, N=4, K=2), {"fused_forward": True}, [16, None, None]),
               (dict(activation="relu", T=9, D=2048, N=4, K=2), {"fused_forward": False}, [None] * 4),
               (dict(activation="relu", T=9, D=64, N=4, K=2), {"fused_forward": True}, [None] * 3)]


def _order_results(configs, tiny):
    """Each ORDER_CASES run against the reference, with the orders the launches asked `tile_order.schedule` for."""
    from backend_cases import compare, make_inputs, run, upcast
    from ssd_megatron.ffn.backends import ReferenceBackend
    from ssd_megatron.ffn.backends.kernels import tile_order
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    _force_variant(configs, tiny, 0, 0, 16, 0)  # tiny tiles everywhere, no variant
    tiles, asked, out = tile_order.schedule, [], []

    def recording(plan, BM, auto=None):
        asked.append(auto)
        return tiles(plan, BM, auto)

    tile_order.schedule = recording
    try:
        for case, opts, _ in ORDER_CASES:
            asked.clear()
            inp = make_inputs(dtype=torch.float32, **case)
            try:
                errs = compare(run(TritonBackend(**opts), inp), run(ReferenceBackend(), upcast(inp)), tol=float("inf"))
                out.append({"errors": errs, "orders": list(asked)})
            except Exception as exc:
                out.append({"exception": f"{type(exc).__name__}: {exc}"[:2000]})
    finally:
        tile_order.schedule = tiles
    return out


def _force_variant(configs, tiny, down_variant, chunk, bp, two):
    """Tiny tiles with the given down variant and wgrad row chunk; wgrad BP and up/up_bwd BN = bp (whole P
    and E where bp >= them); up_bwd in two passes when `two`. With down's TMA variant, the up kernels' and the
    fused forward's weights and the wgrad's left operand come by TMA too."""
    tma = down_variant == configs.TMA
    up = (16, bp, 16, 1, 1) + ((0, 1) if tma else ())
    up_bwd = up[:5] + (configs.TWO_PASS if two else 0,) + up[6:] if two or tma else up
    configs.force_config(up=up, up_glu=up, up_bwd=up_bwd, up_bwd_glu=up_bwd, down=tiny + (down_variant,),
                         wgrad=(bp,) + tiny[1:] + (chunk, int(tma)), mlp=tiny + ((configs.TMA,) if tma else ()),
                         mlp_glu=tiny)


COMPILE_CASES = [0, 3]


def _compile_results(configs, tiny):
    """The backend inside torch.compile(fullgraph=True, backend="aot_eager") against eager, forward and
    every grad: the kernels sit in opaque custom ops, so nothing of triton is traced (traced as an
    autograd.Function, all grads came back zero on the GPU)."""
    from backend_cases import Compiled, compare, make_inputs, run, run_router
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    configs.force_config(up=tiny, up_glu=tiny, up_bwd=tiny, up_bwd_glu=tiny, down=tiny, wgrad=tiny)
    out = []
    for c in COMPILE_CASES:
        case, opts = CASES[c]
        inp = make_inputs(dtype=torch.float32, **case)
        be = TritonBackend(**opts)
        torch._dynamo.reset()
        try:
            got = run(Compiled(be, backend="aot_eager"), inp)
            out.append({"errors": compare(got, run(be, inp), tol=float("inf"))})
        except Exception as exc:
            out.append({"exception": f"{type(exc).__name__}: {exc}"[:2000]})
    # the router folded in (centroids through the custom ops)
    case, opts = CASES[3]
    inp = make_inputs(dtype=torch.float32, **case)
    be = TritonBackend(**opts)
    torch._dynamo.reset()
    try:
        got = run_router(Compiled(be, backend="aot_eager"), inp, True)
        out.append({"errors": compare(got, run_router(be, inp, True), tol=float("inf"))})
    except Exception as exc:
        out.append({"exception": f"{type(exc).__name__}: {exc}"[:2000]})
    return out


# (T, N, K, routing, max_blocks): the counting-sort plan kernels against torch's sort; M not a block multiple,
# N = 64 (wider one-hot, shorter blocks), empty experts, every pair on one expert, T = 0; a small max_blocks
# makes each block span several sub-blocks (and some blocks of the first kernel only initialise `fill`)
PLAN_CASES = [(1000, 32, 6, "random", 256), (333, 64, 16, "random", 256), (77, 3, 1, "random", 256),
              (500, 16, 4, "empty", 256), (129, 8, 2, "one", 256), (0, 8, 2, "random", 256),
              (1000, 32, 6, "random", 3), (333, 64, 16, "random", 7), (500, 16, 4, "empty", 2)]


def _plan_results():
    """Per case: the plan equals torch's sort; the M-tile table its scatter kernel writes (the Gluon kernels' work
    list at their tile height) and the table's own launch both equal the torch-built one in expert order (token
    windows of one expert each), the latter at three tile heights; where `plan_tiles_default` writes it (Triton >=
    3.9), `make_plan` carries the written table and the launchers take it from there; the token-window table's
    launch equals the torch-built one (groups of all experts and of three). The cases take the output's
    initialisation's places (FILL_PLACES) in turn."""
    from ssd_megatron.ffn.backends.kernels.tile_order import (expert_tiles, tile_list, token_window_tiles,
                                                              token_window_tiles_torch)
    from ssd_megatron.ffn.backends.kernels.routing_plan import FILL_PLACES, TILE_BM, plan_tiles_default, routing_plan
    from ssd_megatron.ffn.backends.routing import make_plan, sort_plan
    g = torch.Generator().manual_seed(0)
    out = []
    for T, N, K, routing, max_blocks in PLAN_CASES:
        if routing == "one":
            idx = torch.zeros(T, K, dtype=torch.long)
            idx[:, 1:] = torch.arange(1, K)
        else:
            n = N // 2 if routing == "empty" else N
            idx = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K).long()
        y, row = torch.full((T, 5), float("nan")), torch.randn(5, generator=g)  # the output the plan initialises
        got = routing_plan(idx.reshape(-1), N, K, fill=(y, row), max_blocks=max_blocks, tile_table=True,
                           fill_in=FILL_PLACES[len(out) % len(FILL_PLACES)])  # each place in turn
        want = sort_plan(idx.reshape(-1), N, K)
        offsets, M = got[3], T * K
        table = got[4]
        plan, written = make_plan(idx, N), plan_tiles_default(idx)
        carried = M == 0 or ((TILE_BM, None) in plan.tiles) == written and (
            not written or (tile_list(plan, TILE_BM, None) is plan.tiles[TILE_BM, None]
                            and torch.equal(plan.tiles[TILE_BM, None], table)))
        same = all(a.dtype == b.dtype == torch.int32 and torch.equal(a, b) for a, b in zip(got[:4], want))
        out.append(same and carried and torch.equal(y, row.expand(T, 5))
                   and (table is None if M == 0 else torch.equal(table, token_window_tiles(offsets, M, N, TILE_BM, 1)))
                   and all(torch.equal(expert_tiles(offsets, M, N, bm), token_window_tiles(offsets, M, N, bm, 1))
                           for bm in (16, 64, 128))
                   and all(torch.equal(token_window_tiles(offsets, M, N, 64, group),
                                       token_window_tiles_torch(offsets, M, N, 64, group)) for group in (0, 3)))
    return out


def _opcheck_results():
    """torch.library.opcheck of the backend's two custom ops (schema, fake implementations' shapes and
    strides against the real ones, autograd registration), with W_out's strided column view as w2."""
    from backend_cases import make_inputs, with_column_view_w2
    out = []
    for c in COMPILE_CASES:
        case, _ = CASES[c]
        inp = with_column_view_w2(make_inputs(dtype=torch.float32, **case))
        x, w1, b1, w2, gate = (inp[k] for k in ("x", "w1", "b1", "w2", "gate"))
        gate_flat = gate.reshape(-1).contiguous()
        fwd = (x, w1, b1, w2, gate_flat, inp["topk_idx"], case["activation"], "atomic32", "triton", True)
        try:
            torch.library.opcheck(torch.ops.ssd_megatron.triton_experts.default, fwd)
            # with the output bias folded in (y's initial value, its gradient from the backward op)
            b2 = torch.randn(x.shape[1], requires_grad=True)
            torch.library.opcheck(torch.ops.ssd_megatron.triton_experts.default,
                                  fwd + (None, "epilogue", b2, True))
            # the fused forward (y initialised by the routing plan)
            torch.library.opcheck(torch.ops.ssd_megatron.triton_experts.default,
                                  fwd + (None, "epilogue", b2, True, True))
            y, h, order, token, offsets, _, _ = torch.ops.ssd_megatron.triton_experts(*fwd)
            bwd = (inp["dy"], x.detach(), w1.detach(), w2.detach(), gate_flat.detach(), h, order, token, offsets,
                   inp["topk_idx"], case["activation"], b1 is not None, "atomic32", "triton", [True] * 5 + [False])
            # (not differentiable itself: no double backward, so no aot_dispatch check)
            torch.library.opcheck(torch.ops.ssd_megatron.triton_experts_backward.default, bwd,
                                  test_utils=("test_schema", "test_faketensor"))
            # with the router folded in (centroids given)
            centroids = w1.detach()[:, : w2.shape[1]].mean(1)
            torch.library.opcheck(torch.ops.ssd_megatron.triton_experts_backward.default, bwd + (centroids,),
                                  test_utils=("test_schema", "test_faketensor"))
            # with the output bias's gradient
            bwd_b2 = bwd[:-1] + ([True] * 6, centroids, "epilogue", None, None, b2.detach(), True)
            torch.library.opcheck(torch.ops.ssd_megatron.triton_experts_backward.default, bwd_b2,
                                  test_utils=("test_schema", "test_faketensor"))
            out.append("ok")
        except Exception as exc:
            out.append(f"{type(exc).__name__}: {exc}"[:2000])
    return out


# SSD's router gradient folded into the kernels (router_centroids) against autograd through the router on
# the reference: (case index, down variant, wgrad row chunk, fold_router, wgrad BP = up BN, up_bwd in two
# passes); GLU, K = 1, K = N, empty experts, the gmm and pre-gathered weight gradients, ROWLOOP/TMA/STAGED
# dx and split dW1 (case 0: experts of 37 rows, so two chunks of 32), both ways to fold dW1's part, also
# into whole-P dW1 blocks of two tiles (case 12: P = 48 = 32 + 16, all gate rows; case 4: GLU, P = 48, the
# gate rows 0..23), and the dgate of a two-pass up_bwd
FOLD_RUNS = [(0, 0, 32, "epilogue", 16, 0), (1, 1, 32, "epilogue", 16, 0), (2, 3, 0, "epilogue", 16, 0),
             (3, 0, 32, "epilogue", 16, 0), (4, 0, 0, "epilogue", 16, 0), (5, 3, 32, "epilogue", 16, 0),
             (0, 0, 32, "rows", 16, 0), (1, 1, 32, "rows", 16, 0), (3, 0, 32, "rows", 16, 0),
             (4, 0, 0, "rows", 16, 0), (10, 0, 32, "epilogue", 16, 0), (2, 4, 0, "epilogue", 16, 0),
             (4, 4, 32, "rows", 64, 0), (12, 0, 32, "epilogue", 64, 0), (12, 4, 0, "rows", 64, 0),
             (3, 0, 32, "epilogue", 16, 1), (12, 4, 32, "rows", 64, 1)]


def _fold_layer_result(configs, tiny):
    """SwitchableFFN (SwiGLU, expert-major) with the triton backend: the folded router against the same
    layer with folding switched off (the router's own backward), forward and every parameter's grad."""
    import copy

    from backend_cases import expert_major_sparse_ffn, rel_err
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    configs.force_config(up=tiny, up_glu=tiny, up_bwd=tiny, up_bwd_glu=tiny, down=tiny, wgrad=tiny)
    ffn = expert_major_sparse_ffn(24, 64, "swiglu", 4, 2)
    x = torch.randn(29, 24)
    res = {}
    try:
        for fold in ("epilogue", "rows", "off"):
            f = copy.deepcopy(ffn)
            f.set_backend(TritonBackend(fold_router=fold))
            xi = x.clone().requires_grad_()
            assert f._router_folded(xi) == (fold != "off")
            y = f(xi)
            y.square().sum().backward()
            res[fold] = [y.detach(), xi.grad] + [p.grad for p in f.parameters()]
        return {"errors": {f"{fold}{i}": rel_err(a, b) for fold in ("epilogue", "rows")
                           for i, (a, b) in enumerate(zip(res[fold], res["off"]))}}
    except Exception as exc:
        return {"exception": f"{type(exc).__name__}: {exc}"[:2000]}


def _fold_bench_result(configs, tiny):
    """ssd-bench ffn's timed sparse path folds like SwitchableFFN: equal to its fold_router=off variant."""
    from backend_cases import rel_err
    from ssd_megatron.bench.ffn import Layer
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    configs.force_config(up=tiny, up_glu=tiny, up_bwd=tiny, up_bwd_glu=tiny, down=tiny, wgrad=tiny)
    layer = Layer("tiny", "relu", torch.device("cpu"), torch.float32, seed=0)
    x = torch.randn(33, layer.D)
    res = {}
    try:
        for fold in ("epilogue", "off"):
            assert TritonBackend(fold_router=fold).folds_router(x) == (fold != "off")
            for p in layer.params():
                p.grad = None
            xi = x.clone().requires_grad_()
            y = layer.sparse(xi, TritonBackend(fold_router=fold))
            y.square().sum().backward()
            res[fold] = [y.detach(), xi.grad] + [p.grad for p in layer.params() if p.grad is not None]
        assert len(res["epilogue"]) == len(res["off"])
        return {"errors": {str(i): rel_err(a, b) for i, (a, b) in enumerate(zip(res["epilogue"], res["off"]))}}
    except Exception as exc:
        return {"exception": f"{type(exc).__name__}: {exc}"[:2000]}


def _fold_results(configs, tiny):
    from backend_cases import compare, make_inputs, run_router, upcast
    from ssd_megatron.ffn.backends import ReferenceBackend
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    out = [_fold_layer_result(configs, tiny), _fold_bench_result(configs, tiny)]
    for c, down_variant, chunk, mode, bp, two in FOLD_RUNS:
        case, opts = CASES[c]
        _force_variant(configs, tiny, down_variant, chunk, bp, two)
        opts = {k: v for k, v in opts.items() if k != "column_view_w2"}
        inp = make_inputs(dtype=torch.float32, **case)
        try:
            got = run_router(TritonBackend(fold_router=mode, **opts), inp, fold=True)
            out.append({"errors": compare(got, run_router(ReferenceBackend(), upcast(inp), fold=False),
                                          tol=float("inf"))})
        except Exception as exc:
            out.append({"exception": f"{type(exc).__name__}: {exc}"[:2000]})
    return out


def _zero_fills_in_backward(configs, tiny):
    """The aten.zeros calls of one backward through the backend's custom op, and through the router's
    (centroid_topk): autograd zero-fills the gradient of every output the loss does not use (h alone is
    [T*K, F1]) unless told not to."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from backend_cases import make_inputs
    from ssd_megatron.ffn.backends import expert_ffn
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    from ssd_megatron.ffn.centroid_router import centroid_topk

    class Ops(TorchDispatchMode):
        names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith("aten.zeros."):
                self.names.append(list(args[0]))
            return func(*args, **(kwargs or {}))

    configs.force_config(up=tiny, up_glu=tiny, up_bwd=tiny, up_bwd_glu=tiny, down=tiny, wgrad=tiny, mlp=tiny,
                         mlp_glu=tiny)
    inp = make_inputs(dtype=torch.float32)
    y = expert_ffn(TritonBackend(), inp["x"], inp["w1"], inp["b1"], inp["w2"], inp["topk_idx"], inp["gate"], "relu")
    scores, _ = centroid_topk(inp["x"], inp["w1"][:, 0], 2)
    with Ops() as ops:
        y.backward(inp["dy"])
        scores.sum().backward()
    return ops.names  # the shapes zero-filled


@pytest.fixture(scope="module")
def interpret_results():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the triton kernels are checked compiled (test_backends_gpu.py)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                         timeout=900)
    lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in out.stdout.splitlines() if " " in ln}
    keys = ("RESULTS", "PLANS", "COMPILE", "OPCHECK", "FOLD", "ZEROS", "ORDERS")
    assert out.returncode == 0 and set(keys) <= set(lines), out.stderr[-4000:] + out.stdout[-2000:]
    return tuple(json.loads(lines[k]) for k in keys)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c["activation"] for c, _ in CASES])
def test_triton_interpret_matches_reference(interpret_results, i):
    res = interpret_results[0][i]
    assert "exception" not in res, res.get("exception")
    bad = {k: v for k, v in res["errors"].items() if not v <= TOL}
    assert not bad, f"case {CASES[i]}: errors above {TOL}: {res['errors']}"


@pytest.mark.parametrize("i", range(len(CASES), len(RUNS)),
                         ids=[f"{CASES[c][0]['activation']}-{'fused' if CASES[c][1].get('fused_forward') else ''}"
                              f"down{v[0]}-chunk{v[1]}-{v[2]}-bp{v[3]}{'-2pass' * v[4]}" for c, v in RUNS[len(CASES):]])
def test_triton_interpret_kernel_variants(interpret_results, i):
    res = interpret_results[0][i]
    assert "exception" not in res, res.get("exception")
    bad = {k: v for k, v in res["errors"].items() if not v <= TOL}
    assert not bad, f"variant run {RUNS[i]}: errors above {TOL}: {res['errors']}"


@pytest.mark.parametrize("i", range(len(PLAN_CASES)), ids=[f"T{c[0]}-N{c[1]}-K{c[2]}-{c[3]}-B{c[4]}" for c in PLAN_CASES])
def test_counting_sort_plan_equals_torch_sort(interpret_results, i):
    assert interpret_results[1][i], PLAN_CASES[i]


def test_backward_zero_fills_no_unused_output_gradient(interpret_results):
    assert interpret_results[5] == [[37, 4]], interpret_results[5]  # the router's own [T, N] scatter target


@pytest.mark.parametrize("i", range(len(ORDER_CASES)),
                         ids=[f"{c['activation']}-D{c['D']}-{'fused' if o.get('fused_forward') else 'unfused'}"
                              for c, o, _ in ORDER_CASES])
def test_auto_tile_order_per_launch(interpret_results, i):
    res = interpret_results[6][i]
    assert "exception" not in res, res.get("exception")
    assert res["orders"] == ORDER_CASES[i][2]
    bad = {k: v for k, v in res["errors"].items() if not v <= TOL}
    assert not bad, f"auto tile orders, run {i}: errors above {TOL}: {res['errors']}"


if __name__ == "__main__":
    _main()


@pytest.mark.parametrize("i", range(len(COMPILE_CASES) + 1),
                         ids=[CASES[c][0]["activation"] for c in COMPILE_CASES] + ["swiglu-router-fold"])
def test_triton_backend_under_torch_compile(interpret_results, i):
    res = interpret_results[2][i]
    assert "exception" not in res, res.get("exception")
    bad = {k: v for k, v in res["errors"].items() if not v <= TOL}
    assert not bad, f"compiled vs eager, run {i}: errors above {TOL}: {res['errors']}"


@pytest.mark.parametrize("i", range(len(COMPILE_CASES)), ids=[CASES[c][0]["activation"] for c in COMPILE_CASES])
def test_triton_custom_ops_pass_opcheck(interpret_results, i):
    assert interpret_results[3][i] == "ok", interpret_results[3][i]


@pytest.mark.parametrize("i", range(len(FOLD_RUNS) + 2),
                         ids=["switchable-ffn", "bench-layer"]
                         + [f"{CASES[c][0]['activation']}-down{d}-chunk{ch}-{m}-bp{bp}{'-2pass' * two}"
                            for c, d, ch, m, bp, two in FOLD_RUNS])
def test_triton_router_fold_matches_autograd_router(interpret_results, i):
    res = interpret_results[4][i]
    assert "exception" not in res, res.get("exception")
    bad = {k: v for k, v in res["errors"].items() if not v <= TOL}
    assert not bad, f"router fold, run {i}: errors above {TOL}: {res['errors']}"
