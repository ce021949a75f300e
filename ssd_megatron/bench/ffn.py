"""`ssd-bench ffn`: one FFN layer, dense vs the sparse (SSD) path on every available expert backend.

The timed sparse path is everything a training step pays for the layer (mirrors SwitchableFFN in an
SSD sparse phase): the expert weights, the centroids (mean of each expert's W_in gate rows), router
scores `x @ c.T`, top-k, the straight-through gate `(s - s.detach()) + 1` (with `triton`, its gradient
folded into the backend's kernels, as SwitchableFFN does; `--triton-variants fold_router=off` times the
router's own backward instead, `fold_router=rows` the other way to fold it), the backend, and the output
bias (with `triton`: y's initial value inside its kernels, its gradient from the backend, as
`TritonBackend(fold_output="auto")` does; `--triton-variants fold_output=false` adds it after, with a zero fill
before the combine). `--weight-gather` says where the expert
weights come from:
- `none` (default; what an SSD sparse phase runs since the parameters are stored expert-major there,
  ffn/expert_layout.py): views of parameters laid out in expert order, no gather;
- `permute`: `ffn.backends.weights.gather_expert_weights` through the clustering permutation from
  neuron-order parameters (a gather whose backward is a gather too; SwitchableFFN outside SSD's phases);
- `index_select`: `index_select` of W_in rows and W_out^T rows, whose backward is an atomic index_add
  (0.3 ms at base, 3.6 ms at 8b on H100; the first version).

Method (see the device tool's METHOD.md): bf16, CUDA events around each iteration, median of many,
warm-up first, inputs and weights rotated over several independent layers so that nothing is served
from L2 across iterations. `fwd` is forward-only under torch.no_grad() (inference with k = K);
`fwd_bwd` is a training forward + backward (grads for x and all weights). `--params fp32` holds the
parameters in fp32 under bf16 autocast, as a training step does: the dense path then pays autocast's
weight casts and their gradients' casts back, the sparse path whatever its backend needs (`triton` takes
the fp32 weights and writes fp32 gradients; the others get bf16 casts).

Dense baselines: `dense` is the plain layer (two linears and the activation, what the issue measured); for ReLU
also `fused_dense`, our fused dense FFN as the training step runs it (ffn/fused_relu_ffn.py), faster at base by a
quarter; every ReLU record carries the ratios against both (`speedup_*`, `speedup_*_vs_fused_dense`).

Routing: `realistic` = top-K of x . centroids over weights with cluster structure (neurons of an
expert share a direction; cluster scales vary, so expert loads are unbalanced as in a trained model);
`uniform` = the same computation with a large random term added to the scores (uniform random experts).

Output: a table, and with `--out F.json` the JSON and its figure F.png (bench/ffn_plot.py: each backend's speedup
against the issue's targets; `--no-plot` skips it, `ssd-bench plot F.json` draws it later).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..ffn.activations import ACTIVATIONS, apply_activation, is_glu
from ..ffn.backends import call_router_folded, expert_ffn, router_fold_offered, weights_for
from ..ffn.centroid_router import CentroidCache, centroid_topk, expert_centroids
from ..ffn.fused_relu_ffn import relu_ffn
from ..ffn.switchable_ffn import straight_through_gate
from . import timing
from .timing import capture_graph, time_calls

SHAPES = {  # name: (d_model, d_ff, num_experts, top_k)
    "base": (768, 6144, 32, 6),
    "8b": (4096, 16384, 64, 16),
    "tiny": (128, 512, 8, 2),  # smoke runs
}


# ----------------------------------------------------------------------------- the layer

class Layer:
    """One FFN's parameters (nn.Linear layout) plus its expert permutation. Leaves in `dtype`, the tokens'
    dtype; or, with `params=torch.float32` and bf16 tokens, fp32 leaves used under bf16 autocast (as a
    training step holds them: the dense path's GEMMs cast them, the sparse path as SwitchableFFN does)."""

    def __init__(self, shape, activation, device, dtype, seed, bias=True, params=None):
        D, d_ff, N, K = SHAPES[shape]
        self.D, self.d_ff, self.N, self.K, self.E = D, d_ff, N, K, d_ff // N
        self.activation, self.glu = activation, is_glu(activation)
        g = torch.Generator(device=device).manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
        perm = torch.randperm(d_ff, generator=g, device=device)
        labels = torch.empty_like(perm)
        labels[perm] = torch.arange(d_ff, device=device) // self.E
        # Clustered W_in rows: neuron j of expert n ~ scale_n * (0.5 mu_n + noise) / sqrt(D).
        mu, scale = rnd(N, D), torch.exp(0.4 * rnd(N))
        w_gate = (0.5 * mu[labels] + rnd(d_ff, D)) * scale[labels, None] / math.sqrt(D)
        w_in = torch.cat([w_gate, rnd(d_ff, D) / math.sqrt(D)]) if self.glu else w_gate
        f1 = w_in.shape[0]
        params = params or dtype
        self.autocast = dtype if params != dtype else None
        leaf = lambda t: t.to(params).contiguous().requires_grad_()  # noqa: E731
        self.w_in = leaf(w_in)
        self.b_in = leaf(0.02 * rnd(f1)) if bias else None
        self.w_out = leaf(rnd(D, d_ff) / math.sqrt(d_ff))
        self.b_out = leaf(0.02 * rnd(D)) if bias else None
        self.perm = perm
        blocks = perm.view(N, self.E)
        self.rows = torch.cat([blocks, blocks + d_ff], 1).reshape(-1) if self.glu else perm
        self.noise = None
        # The same parameters stored expert-major (w_in rows, b_in by `rows`, w_out columns by perm).
        self.em = (leaf(self.w_in.detach()[self.rows]),
                   None if self.b_in is None else leaf(self.b_in.detach()[self.rows]),
                   leaf(self.w_out.detach()[:, perm]))
        self.w2_mode = "none"
        self.centroid_cache = CentroidCache()

    def params(self):
        """Every leaf: the neuron-order parameters (dense path, gathers) and the expert-major copies."""
        return [p for p in (self.w_in, self.b_in, self.w_out, self.b_out) + self.em if p is not None]

    def _autocast(self):
        return torch.autocast(self.w_in.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def dense(self, x):
        with self._autocast():
            return F.linear(apply_activation(F.linear(x, self.w_in, self.b_in), self.activation), self.w_out,
                            self.b_out)

    def dense_fused(self, x):
        """The dense ReLU FFN as the training step runs it (ffn/fused_relu_ffn.py: bias and ReLU in the first GEMM's
        epilogue, ReLU's derivative and b_in's gradient in the dh GEMM's): our fastest dense FFN, `fused_dense`."""
        with self._autocast():
            return relu_ffn(x, self.w_in, self.b_in, self.w_out, self.b_out)

    def expert_weights(self):
        N, E, D = self.N, self.E, self.D
        if self.w2_mode == "none":
            from ..ffn.backends.weights import expert_views
            return expert_views(*self.em, N)
        if self.w2_mode == "permute":
            from ..ffn.backends.weights import gather_expert_weights
            return gather_expert_weights(self.w_in, self.b_in, self.w_out, self.perm, N, self.glu, rows=self.rows)
        # index_select: the first version (its backward is an atomic index_add)
        w1 = self.w_in.index_select(0, self.rows).view(N, -1, D)
        b1 = None if self.b_in is None else self.b_in.index_select(0, self.rows).view(N, -1)
        w2 = self.w_out.t().index_select(0, self.perm).view(N, E, D)
        return w1, b1, w2

    def select(self, x, c, k):
        """(top scores, expert ids) of the tokens x for centroids c."""
        if self.noise is None:  # SwitchableFFN's router
            return centroid_topk(x, c, k)
        return (x @ c.t() + self.noise).topk(k, dim=-1)

    def centroids(self, x, w1, inference=False):
        """In inference, as a sparsified SwitchableFFN's: once per version of w1 (CentroidCache); a training
        step's weights change every step, so its timing computes them every time."""
        if not inference:
            return expert_centroids(w1, self.E, x.dtype)
        key = (w1.data_ptr(), w1._version, w1.dtype, x.dtype)
        return self.centroid_cache.get(key, lambda: expert_centroids(w1, self.E, x.dtype))

    def route(self, x, w1, k):
        top, idx = self.select(x, self.centroids(x, w1, inference=not torch.is_grad_enabled()), k)
        return idx, straight_through_gate(top)

    def sparse(self, x, backend):
        # as SwitchableFFN: fp32 weights as they are to a backend that takes them, else cast
        w1, b1, w2 = weights_for(backend, x, *self.expert_weights())
        if torch.is_grad_enabled() and router_fold_offered(backend, x):
            # as SwitchableFFN: the router's gradient inside the backend's kernels
            with torch.no_grad():
                c = self.centroids(x, w1)
                idx = self.select(x, c, self.K)[1]
            return call_router_folded(backend, x, w1, b1, w2, idx, self.activation, c, self.b_out)
        idx, gate = self.route(x, w1, self.K)
        return expert_ffn(backend, x, w1, b1, w2, idx, gate, self.activation, self.b_out)


class Case:
    """Rotating layers + inputs for one (shape, activation)."""

    def __init__(self, shape, activation, tokens, rotations, device, dtype, seed=0, params=None):
        self.layers = [Layer(shape, activation, device, dtype, seed + 17 * r, params=params) for r in range(rotations)]
        D = self.layers[0].D
        g = torch.Generator(device=device).manual_seed(seed + 1)
        self.xs = [torch.randn(tokens, D, generator=g, device=device).to(dtype) for _ in range(rotations)]
        self.dys = [torch.randn(tokens, D, generator=g, device=device).to(dtype) for _ in range(rotations)]
        self.noises = [1e4 * torch.rand(tokens, self.layers[0].N, generator=g, device=device).to(dtype)
                       for _ in range(rotations)]
        self.R = rotations
        self.default_gather = "none"

    def set_w2_mode(self, mode):
        for layer in self.layers:
            layer.w2_mode = mode

    def set_routing(self, routing):
        for r, layer in enumerate(self.layers):
            layer.noise = self.noises[r] if routing == "uniform" else None

    def clear(self, i):
        r = i % self.R
        for p in self.layers[r].params():
            p.grad = None
        self.xs[r].grad = None

    def fwd(self, f):
        def run(i):
            r = i % self.R
            with torch.no_grad():
                f(self.layers[r], self.xs[r])
        return run

    def fwd_bwd(self, f):
        def run(i):
            r = i % self.R
            x = self.xs[r].requires_grad_()
            f(self.layers[r], x).backward(self.dys[r])
        return run


def graphed(case, f, n_iter, fwd_only):
    """Median ms of CUDA-graph replays of f (fwd, or fwd + autograd.grad): the GPU time without the
    host's launch overhead. Only for sync-free paths; raises otherwise (capture fails on a sync)."""
    graphs, keep = [], []
    for r in range(case.R):
        layer, x, dy = case.layers[r], case.xs[r], case.dys[r]
        params = layer.params() + [x.requires_grad_()]

        def step(layer=layer, x=x, dy=dy, params=params):
            if fwd_only:
                with torch.no_grad():
                    return f(layer, x)
            return torch.autograd.grad(f(layer, x), params, dy, allow_unused=True)
        g, out = capture_graph(step)
        keep.append(out)
        graphs.append(g)
    try:
        return time_calls(lambda i: graphs[i % case.R].replay(), n_iter, 3, groups=case.R)
    finally:
        del graphs, keep
        torch.cuda.empty_cache()


def _dense_times(case, f, n_iter, warmup, graphs: bool, errors: list, label: str) -> dict:
    """Medians (ms) of a dense layer function `f`: fwd and fwd_bwd called eagerly, and with `graphs` as CUDA-graph
    replays (None where not taken, or where capture failed: the failure goes to `errors`)."""
    t = {"fwd": time_calls(case.fwd(f), n_iter, warmup)["median"],
         "fwd_bwd": time_calls(case.fwd_bwd(f), n_iter, warmup, case.clear)["median"],
         "fwd_graph": None, "fwd_bwd_graph": None}
    if graphs:
        try:
            t["fwd_graph"] = graphed(case, f, n_iter, True)["median"]
            t["fwd_bwd_graph"] = graphed(case, f, n_iter, False)["median"]
        except Exception as exc:
            errors.append(f"{label} graph: {type(exc).__name__}: {str(exc)[:200]}")
    return t


def _against(times: dict, fwd_ms: float, fwd_bwd_ms: float, graph: bool = False, fused: bool = False) -> dict:
    """A record's entries for one dense baseline (`_dense_times`' result) against the sparse path's fwd and fwd_bwd
    ms: the baseline's times and the speedups, eager or graphed (`_graph` keys), of the plain dense layer or of the
    fused one (`fused_dense_*` and `*_vs_fused_dense` keys)."""
    g = "_graph" if graph else ""
    p, v = ("fused_", "_vs_fused_dense") if fused else ("", "")
    sparse = {"fwd": fwd_ms, "fwd_bwd": fwd_bwd_ms}
    return {**{f"{p}dense_{k}{g}_ms": times[k + g] for k in sparse},
            **{f"speedup_{k}{g}{v}": times[k + g] / ms for k, ms in sparse.items()}}


def _flops(shape, activation):
    D, d_ff, N, K = SHAPES[shape]
    f_in = 2 * d_ff if is_glu(activation) else d_ff
    dense_fwd = 2 * D * (f_in + d_ff)  # per token
    return {"dense_fwd_per_token": dense_fwd, "sparse_fwd_per_token": dense_fwd * K / N,
            "router_fwd_per_token": 2 * D * N}


def _routing_stats(layer, x):
    with torch.no_grad():
        w1, _, _ = layer.expert_weights()
        idx, _ = layer.route(x, w1, layer.K)
        counts = torch.bincount(idx.reshape(-1), minlength=layer.N).float()
    return {"max_over_mean": (counts.max() / counts.mean()).item(), "min_over_mean": (counts.min() / counts.mean()).item(),
            "empty_experts": int((counts == 0).sum().item())}


def _backend_only(case, backend, n_iter, n_warm):
    """fwd+bwd of the backend alone on precomputed routing (what the kernels cost)."""
    layer, x = case.layers[0], case.xs[0]
    with torch.no_grad():
        w1, b1, w2 = weights_for(backend, x, *layer.expert_weights())
        idx, gate = layer.route(x, w1, layer.K)
    ins = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w1, b1, w2, gate)]
    xs = [ins] + [[t.detach().clone().requires_grad_() if t is not None else None for t in ins] for _ in range(case.R - 1)]
    dy = case.dys[0]

    def pre(i):
        for t in xs[i % case.R]:
            if t is not None:
                t.grad = None

    def run(i):
        a = xs[i % case.R]
        backend(a[0], a[1], a[2], a[3], idx, a[4], layer.activation).backward(dy)
    return time_calls(run, n_iter, n_warm, pre)


def _gather_only(case, mode, n_iter, n_warm):
    """fwd+bwd of the expert weight gather alone (index_select through the permutation)."""
    case.set_w2_mode(mode)
    grads = None

    def run(i):
        nonlocal grads
        layer = case.layers[i % case.R]
        outs = [t for t in layer.expert_weights() if t is not None]
        if grads is None:
            grads = [torch.randn_like(t) for t in outs]
        torch.autograd.backward(outs, grads)
    try:
        return time_calls(run, n_iter, n_warm, case.clear)
    finally:
        case.set_w2_mode(case.default_gather)


def _profile(case, backend, label, out):
    """torch.profiler over a few fwd+bwd iterations: where the GPU and the host spend their time."""
    from torch.profiler import ProfilerActivity, profile
    run = case.fwd_bwd(lambda layer, x: layer.sparse(x, backend))
    for i in range(3):
        case.clear(i)
        run(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for i in range(5):
            case.clear(i)
            run(i)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    gpu = ka.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    cpu = ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
    # the same ops split by their operands' shapes: names the small copies, fills and reductions
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=40,
                                                                  max_name_column_width=40, max_shapes_column_width=90)
    text = (f"\n#### {label}: 5 x fwd+bwd\n## by GPU time\n{gpu}\n## by GPU time and input shapes\n{shapes}\n"
            f"## by host time\n{cpu}\n")
    if out:
        with open(os.path.join(os.path.dirname(os.path.abspath(out)), "profile.txt"), "a") as fh:
            fh.write(text)
    print("\n".join(gpu.splitlines()[:22]), flush=True)


def _err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- main

def _parse(argv):
    ap = argparse.ArgumentParser(prog="ssd-bench ffn", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="base,8b", help=f"comma list of {','.join(SHAPES)}")
    ap.add_argument("--activations", default="relu,swiglu", help=f"comma list of {','.join(ACTIVATIONS)}")
    ap.add_argument("--backends", default="all", help="comma list, or 'all' (every available backend)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per layer call (default: the issue's 16384)")
    ap.add_argument("--iters", type=int, default=40, help="timed iterations per measurement (8b: half)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed iterations before each measurement")
    ap.add_argument("--rotations", type=int, default=3, help="independent layers/inputs cycled through")
    ap.add_argument("--routing", default="realistic,uniform",
                    help="comma list of realistic,uniform (unbalanced loads as in a trained model; random experts)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip backend-only timings")
    ap.add_argument("--triton-variants", default="",
                    help="extra triton entries: comma list of option sets like combine=atomic16+wgrad=gmm "
                         "(combine: buffer|atomic32|atomic16; wgrad: triton|triton_mat|gmm; fold_router: "
                         "epilogue|rows|off, how SSD's router gradient is folded into the kernels, or not; "
                         "master_weights: true|false, fp32 weights taken by the backend with --params fp32; "
                         "fold_output: true|false|auto, the output bias and the atomic outputs' zeroing inside the "
                         "kernels, or a fill launch each and the bias added after; fused_forward: true|false|auto, "
                         "the expert forward as one kernel per M-tile, or the backend's choice; w2_view: "
                         "fallback|copy|tma, how the unfused forward's WS down takes W_out's column view: the "
                         "Triton kernel instead, a row-major copy, or the view by TMA)")
    ap.add_argument("--params", default="bf16", choices=("bf16", "fp32"),
                    help="the layer's parameters: bf16, or fp32 used under bf16 autocast as in a training step")
    ap.add_argument("--weight-gather", default="none", choices=("none", "permute", "index_select"),
                    help="expert weight gather in the timed path (see the module docstring)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph (GPU-only) timings")
    ap.add_argument("--profile", default="", help="comma list of backends to run under torch.profiler (fwd+bwd, "
                    "realistic routing) per shape/activation; tables go to OUT_DIR/profile.txt")
    ap.add_argument("--tune", action="store_true", help="time the triton tile candidates per shape (SSD_TRITON_TUNE=1)")
    ap.add_argument("--out", default=None, help="write the JSON results here, and their figure beside it (.png)")
    ap.add_argument("--no-plot", action="store_true",
                    help="no figure beside the JSON (`ssd-bench plot` draws it later)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # 'cpu': smoke test of this script
    return ap.parse_args(argv)


def _split(s, allowed, what):
    items = [v for v in s.split(",") if v]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise UserError(f"ssd-bench ffn: unknown {what} {bad}; accepted: {', '.join(allowed)}")
    return items


def _triton_variants(text: str) -> dict:
    """{"triton[OPTS]": TritonBackend(**OPTS)} for --triton-variants (comma list of +-joined key=value)."""
    return {f"triton[{v}]": triton_variant(v) for v in filter(None, text.split(","))}


def triton_variant(entry: str):
    """TritonBackend(**OPTS) for one --triton-variants entry (+-joined key=value; also the tools' options)."""
    from ..ffn.backends.triton_backend import TritonBackend
    try:
        opts = {k: {"true": True, "false": False}.get(val.lower(), val)
                for k, val in (kv.split("=", 1) for kv in entry.split("+"))}
        return TritonBackend(**opts)
    except (ValueError, TypeError) as exc:
        raise UserError(f"ssd-bench ffn: bad --triton-variants entry {entry!r}: {exc}") from exc


def main(argv=None) -> int:
    args = _parse(argv)
    shapes = _split(args.shapes, SHAPES, "shape")
    acts = _split(args.activations, ACTIVATIONS, "activation")
    routings = _split(args.routing, ("realistic", "uniform"), "routing")
    timing.CUDA = args.device == "cuda"
    if timing.CUDA and not torch.cuda.is_available():
        raise UserError("ssd-bench ffn: needs a CUDA GPU (timings use CUDA events)")
    if args.tune:
        os.environ["SSD_TRITON_TUNE"] = "1"
    backends = _backends(args)
    result = _result_header(args)
    print(f"# {result['gpu']}  torch {result['torch']}  triton {result['triton']}  backends {list(backends)}",
          flush=True)
    for shape in shapes:
        for act in acts:
            _bench_case(args, shape, act, routings, backends, result)
            _save(result, args.out)  # partial results survive a time limit
    _record_tile_configs(result)
    _save(result, args.out)
    print_table(result)
    if args.out and not args.no_plot and result["records"]:
        from .ffn_plot import plot_ffn, png_path
        plot_ffn(result, png_path(args.out))
        print(f"plot: {png_path(args.out)}")
    return 0


def _backends(args) -> dict:
    """{name: backend} of --backends (every available one for "all") and the --triton-variants (checked even where
    triton cannot run); a one-line UserError for a backend this machine lacks."""
    from ..ffn.backends import BACKEND_NAMES, available_backends, get_backend
    avail = available_backends(args.device)
    names = (avail if args.backends == "all"
             else _split(args.backends, [b for b in BACKEND_NAMES if b != "auto"], "backend"))
    missing = [n for n in names if n not in avail]
    if missing:
        raise UserError(f"ssd-bench ffn: backends not available here: {missing} (available: {avail})")
    backends = {n: get_backend(n) for n in names}
    variants = _triton_variants(args.triton_variants)
    if "triton" in avail:
        backends.update(variants)
    return backends


def _result_header(args) -> dict:
    """The JSON's run-level entries (machine, versions, method) and its empty record lists."""
    from ..ffn.backends import tuning_env
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name(0) if timing.CUDA else "cpu",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "cuda": torch.version.cuda, "tokens": args.tokens, "dtype": "bfloat16", "bias": True,
        "params": "fp32 under bf16 autocast" if _fp32_params(args) else "bf16",
        "method": "CUDA events per iteration, median; fwd = forward only under no_grad (inference, k=K); "
                  "fwd_bwd = forward+backward; inputs and weights rotated over %d layers" % args.rotations,
        "sparse_path": f"expert weights (gather: {args.weight_gather}) + centroids (fwd: computed once per "
                       "version of the weights, as a sparsified model's) + x@c.T + topk + gate trick "
                       "(its gradient folded into the kernels where the backend offers it: triton) + backend + b_out "
                       "(y's initial value where the backend offers it: triton)",
        "env": tuning_env(),
        "graph_note": "*_graph_ms: CUDA-graph replay of the same work (GPU time without host launch overhead); "
                      "null where the path syncs with the host (reference, megablocks)",
        "records": [], "uniform_records": [], "breakdown": [], "routing_stats": {}, "flops": {}, "errors": [],
    }


def _fp32_params(args) -> bool:
    """--params fp32 where the layer computes in bf16 (on CPU everything is fp32 already)."""
    return args.params == "fp32" and timing.CUDA


def _bench_case(args, shape: str, act: str, routings: list, backends: dict, result: dict) -> None:
    """One (shape, activation): the dense baselines, then every backend under each routing, the profiles asked for
    and the breakdown, into `result`."""
    from ..ffn.backends import get_backend
    n_iter = args.iters if shape != "8b" else max(10, args.iters // 2)
    key = f"{shape}/{act}"
    result["flops"][key] = _flops(shape, act)
    dtype = torch.bfloat16 if timing.CUDA else torch.float32
    case = Case(shape, act, args.tokens, args.rotations, torch.device(args.device), dtype,
                params=torch.float32 if _fp32_params(args) else None)
    case.default_gather = args.weight_gather
    case.set_w2_mode(args.weight_gather)
    case.set_routing("realistic")
    per_layer = [_routing_stats(lay, x) for lay, x in zip(case.layers, case.xs)]
    result["routing_stats"][key] = dict(per_layer[0], per_rotation=per_layer)  # (the first layer's on top)
    graphs = timing.CUDA and not args.no_graphs
    dense = _dense_times(case, Layer.dense, n_iter, args.warmup, graphs, result["errors"], f"{key} dense")
    # our fused dense ReLU FFN (the training step's), a second baseline beside the plain one the issue names
    fused = (_dense_times(case, Layer.dense_fused, n_iter, args.warmup, graphs, result["errors"],
                          f"{key} fused dense") if act == "relu" else None)
    for name, t in (("dense", dense), ("fused dense", fused)):
        if t is not None:
            print(f"{key:16s} {name:11s} fwd {t['fwd']:8.3f}  fwd+bwd {t['fwd_bwd']:8.3f} ms  "
                  f"(graphs: {t['fwd_graph']} / {t['fwd_bwd_graph']})", flush=True)
    with torch.no_grad():
        y_ref = case.layers[0].sparse(case.xs[0], get_backend("reference"))
    for routing in routings:
        case.set_routing(routing)
        for name, be in backends.items():
            rec = _bench_backend(case, name, be, (dense, fused), n_iter, args.warmup,
                                 y_ref if routing == "realistic" else None, result["errors"], f"{key} {routing}")
            if rec is not None:
                rec = {"shape": shape, "backend": name, "activation": act, "routing": routing, **rec}
                (result["records"] if routing == "realistic" else result["uniform_records"]).append(rec)
                _print_record(key, routing, name, rec)
    case.set_routing("realistic")
    for name in [n for n in args.profile.split(",") if n]:
        if name in backends and timing.CUDA:
            _profile(case, backends[name], f"{key} {name}", args.out)
    if not args.no_breakdown:
        _breakdown(case, shape, act, backends, n_iter, args, result)
    del case
    if timing.CUDA:
        torch.cuda.empty_cache()


def _bench_backend(case, name: str, be, baselines: tuple, n_iter: int, warmup: int, y_ref, errors: list,
                   label: str):
    """One backend's record under the case's current routing: eager fwd and fwd+bwd medians, their ratios against
    the dense baselines (dense, fused dense or None), the forward's error against `y_ref` (where given), and the
    CUDA-graph replays where the dense layer's were taken and the path is sync-free; None (the failure in
    `errors`) where the backend fails."""
    dense, fused = baselines
    it = n_iter if name not in ("reference", "megablocks") else max(5, n_iter // 4)
    f = lambda layer, x, be=be: layer.sparse(x, be)  # noqa: E731
    try:
        tf = time_calls(case.fwd(f), it, warmup, groups=case.R)
        tfb = time_calls(case.fwd_bwd(f), it, warmup, case.clear, groups=case.R)
    except Exception as exc:  # a backend that fails is reported, not fatal
        msg = f"{label} {name}: {type(exc).__name__}: {str(exc)[:300]}"
        print("ERROR", msg, flush=True)
        errors.append(msg)
        return None
    rec = {"fwd_ms": tf["median"], "fwd_bwd_ms": tfb["median"], **_against(dense, tf["median"], tfb["median"]),
           "fwd_stats": tf, "fwd_bwd_stats": tfb}
    if fused is not None:
        rec.update(_against(fused, tf["median"], tfb["median"], fused=True))
    if y_ref is not None:
        with torch.no_grad():
            rec["fwd_rel_err_vs_reference"] = _err(case.layers[0].sparse(case.xs[0], be), y_ref)
    if dense["fwd_graph"] is not None and name not in ("reference", "megablocks"):
        try:
            sf, sfb = graphed(case, f, n_iter, True), graphed(case, f, n_iter, False)
            gf, gfb = sf["median"], sfb["median"]
            rec.update({"fwd_graph_ms": gf, "fwd_bwd_graph_ms": gfb, "fwd_graph_stats": sf, "fwd_bwd_graph_stats": sfb,
                        **_against(dense, gf, gfb, graph=True)})
            if fused is not None and fused["fwd_graph"] is not None:
                rec.update(_against(fused, gf, gfb, graph=True, fused=True))
        except Exception as exc:
            errors.append(f"{label} {name} graph: {type(exc).__name__}: {str(exc)[:200]}")
    return rec


def _print_record(key: str, routing: str, name: str, rec: dict) -> None:
    """A record's line: eager medians and ratios, host times, and the graphed ones where taken."""
    gs = ""
    if "fwd_graph_ms" in rec:
        layers = rec["fwd_bwd_graph_stats"].get("group_medians")  # (none with one rotation)
        by_layer = "; by layer " + "/".join(f"{m:.3f}" for m in layers) if layers else ""
        gs = (f"  graphs fwd {rec['fwd_graph_ms']:.3f} ({rec['speedup_fwd_graph']:.2f}x) fwd+bwd "
              f"{rec['fwd_bwd_graph_ms']:.3f} ({rec['speedup_fwd_bwd_graph']:.2f}x{by_layer})")
    host = f"{rec['fwd_stats']['host_median']:.3f}/{rec['fwd_bwd_stats']['host_median']:.3f}"
    print(f"{key:16s} {routing[:4]} {name:10s} fwd {rec['fwd_ms']:8.3f} ({rec['speedup_fwd']:.2f}x)  "
          f"fwd+bwd {rec['fwd_bwd_ms']:8.3f} ({rec['speedup_fwd_bwd']:.2f}x) host {host}{gs}", flush=True)


def _breakdown(case, shape: str, act: str, backends: dict, n_iter: int, args, result: dict) -> None:
    """The weight gathers alone and each backend alone on precomputed routing (what its kernels cost, and their
    rate on the expert GEMMs), into result["breakdown"]."""
    key = f"{shape}/{act}"
    for mode in ("index_select", "permute"):
        t = _gather_only(case, mode, n_iter, args.warmup)
        result["breakdown"].append({"shape": shape, "activation": act, "part": f"weight_gather[{mode}]",
                                    "fwd_bwd_ms": t["median"]})
        print(f"{key:16s} weight gather {mode:15s} fwd+bwd {t['median']:8.3f} ms", flush=True)
    for name in [n for n in backends if n != "reference"]:
        try:
            t = _backend_only(case, backends[name], n_iter, args.warmup)
        except Exception as exc:
            result["errors"].append(f"{key} breakdown {name}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        tflops = 3 * result["flops"][key]["sparse_fwd_per_token"] * args.tokens / t["median"] / 1e9
        result["breakdown"].append({"shape": shape, "activation": act, "part": "backend_only", "backend": name,
                                    "backend_only_fwd_bwd_ms": t["median"], "expert_gemm_tflops": tflops})
        print(f"{key:16s} backend-only {name:10s} fwd+bwd {t['median']:8.3f} ms ({tflops:.0f} TFLOP/s on the expert "
              f"GEMMs)", flush=True)


def _record_tile_configs(result: dict) -> None:
    """The triton backend's default tiles and what SSD_TRITON_TUNE timed and chose (where triton imports)."""
    try:
        from ..ffn.backends.kernels import tile_configs as tc
    except ImportError:
        return
    result["tuning"] = tc.TUNE_LOG
    tuned = {"|".join(map(str, k)): v for k, v in tc.TUNED.items()}
    result["triton_configs"] = {"defaults": tc.DEFAULTS, "tuned": tuned}


def _save(result, path):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(path + ".tmp", path)


def print_table(result, file=sys.stdout):
    print(f"\n== FFN layer, {result['tokens']} tokens, bf16, {result['gpu']}, {result['date']} "
          f"(ms, median; ratio = dense / sparse; realistic routing; 'unif' = uniform routing fwd+bwd)", file=file)
    print(f"{'shape':5s} {'act':7s} {'backend':24s} {'fwd':>8s} {'x':>6s} {'fwd+bwd':>8s} {'x':>6s} {'unif':>6s} | "
          f"{'graph fwd':>9s} {'x':>6s} {'fwd+bwd':>8s} {'x':>6s}", file=file)
    uni = {(r["shape"], r["activation"], r["backend"]): r for r in result["uniform_records"]}
    last = None
    for r in result["records"]:
        k = (r["shape"], r["activation"])
        if k != last:
            dg = ""
            if r.get("dense_fwd_graph_ms") is not None:
                dg = f" | {r['dense_fwd_graph_ms']:9.3f} {'':6s} {r['dense_fwd_bwd_graph_ms']:8.3f}"
            print(f"{r['shape']:5s} {r['activation']:7s} {'dense':24s} {r['dense_fwd_ms']:8.3f} {'':6s} "
                  f"{r['dense_fwd_bwd_ms']:8.3f} {'':6s} {'':6s}{dg}", file=file)
            if "fused_dense_fwd_ms" in r:
                fg = ""
                if r.get("fused_dense_fwd_graph_ms") is not None:
                    fg = f" | {r['fused_dense_fwd_graph_ms']:9.3f} {'':6s} {r['fused_dense_fwd_bwd_graph_ms']:8.3f}"
                print(f"{'':5s} {'':7s} {'dense, fused (step)':24s} {r['fused_dense_fwd_ms']:8.3f} {'':6s} "
                      f"{r['fused_dense_fwd_bwd_ms']:8.3f} {'':6s} {'':6s}{fg}", file=file)
            last = k
        u = uni.get(k + (r["backend"],))
        us = f"{u['speedup_fwd_bwd']:5.2f}x" if u else ""
        g = ""
        if "fwd_graph_ms" in r:
            g = (f" | {r['fwd_graph_ms']:9.3f} {r['speedup_fwd_graph']:5.2f}x {r['fwd_bwd_graph_ms']:8.3f} "
                 f"{r['speedup_fwd_bwd_graph']:5.2f}x")
        vs = ""
        if "speedup_fwd_bwd_vs_fused_dense" in r:  # the ratios against the fused dense FFN, graphed where taken
            gr = "_graph" if "speedup_fwd_bwd_graph_vs_fused_dense" in r else ""
            vs = (f"  vs fused: {r[f'speedup_fwd{gr}_vs_fused_dense']:.2f}x / "
                  f"{r[f'speedup_fwd_bwd{gr}_vs_fused_dense']:.2f}x{' (graphs)' if gr else ''}")
        print(f"{'':5s} {'':7s} {r['backend']:24s} {r['fwd_ms']:8.3f} {r['speedup_fwd']:5.2f}x "
              f"{r['fwd_bwd_ms']:8.3f} {r['speedup_fwd_bwd']:5.2f}x {us:>6s}{g}{vs}", file=file)
    for e in result["errors"]:
        print("error:", e, file=file)


if __name__ == "__main__":
    sys.exit(main())
