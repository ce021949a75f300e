"""`triton` expert backend: fused gather/scatter grouped GEMMs (our own kernels, ScatterMoE-style).

Forward: 1 routing sort + 2 kernels (+ the K-way sum of the scattered outputs). Backward: 4 kernels
(up_bwd: da -> dh, dgate, gate*a and db1; wgrad x2; down for dx) + the K-way sum. With the default
options no token copy is materialised, and nothing syncs with the host. The kernels, their launchers and tile
configs live in `kernels/` (imported on first use, so this module imports on machines without triton or CUDA).

Router folding (`router_centroids=c`, SSD's router: c[n] = mean of expert n's first E rows of w1, the
gate rows for GLU; the gate passed is then 1 and takes no gradient): the gradient of the straight-through
gate (s - s.detach()) + 1 with s[t, k] = x[t] . c[e] is added inside the backward kernels instead of by
the router's own backward. Per (t, k) row with gate gradient dg: dx[t] += dg * c[e], an epilogue term of
the dx down kernel; dW1[e][j] += dg * x[t] / E for the E gate rows j, either as one [N, D] term
dc = dS^T x / E (dS: the gate gradients as a [T, N] matrix) added in the dW1 kernel's epilogue
(`fold_router="epilogue"`: summed by the Gluon dW1 kernel itself from the x rows it gathers, where it serves,
else one small GEMM; kernels/wgrad_gluon.py's FOLD 3), or as dg / E added to dh's gate columns while the dW1
kernel loads them (`"rows"`: no GEMM, but work and registers in its main loop). db1 stays dh's. That replaces the
router's backward: a [T, N] scatter, two small GEMMs, the centroid mean's backward and two gradient
additions ([T, D] and [N, F1, D]).

Master weights (`takes_master_weights`): under autocast the caller may pass the fp32 parameters (views)
with x in bf16/fp16. The forward op casts them to x's dtype (the copies the caller's own casts would
make, kept for the backward), and the weight gradients come back in fp32 straight from the wgrad kernel:
no rounding to bf16, no fp32 buffer to copy from when the reduction is split, and no cast back by autograd.
With bf16/fp16 weights instead, the Gluon wgrad's split sums add into their bf16/fp16 gradients themselves
(kernels/wgrad_gluon.py's half sums: no fp32 buffer either, at a few more roundings).

Output initialisation (`folds_output_bias`, option fold_output): the down kernel adds each token's K rows
into y (and, backward, into dx) with atomics, so y must first hold zeros, and the FFN then adds its output
bias: a fill launch and an add (a read and a write of y) per forward. Instead, the up kernel's programs,
which run just before, each initialise a slice of y to the output bias (of dx to zeros) as they start:
no launch of its own and no pass over y after. The bias's gradient is dy's column sum, as autograd's, by
kernels/column_sums.py (torch's reduction took 31 µs at base against 13, H100: with it the fold went from costing
the graphed GPT-base step 0.13 ms to saving 0.11 ms, docs/kernels.md v19, v25).

Fused forward (option fused_forward): one kernel per M-tile computes the up GEMM over all of the
expert's columns, the activation, and the down GEMM block by block into y, so `a` never goes to memory
and is not re-read once per output column block; y is then initialised by the routing plan's kernels
(`routing_plan.fill_place`). The backward is unchanged (it needs h, which the fused kernel saves).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ...errors import UserError
from ..activations import ACTIVATIONS, is_glu
from . import TUNING_PREFIXES
from .grouped_mm import _grouped_mm
from .reference import ReferenceBackend
from .routing import make_plan

_K = None


def _kernels():
    global _K
    if _K is None:
        try:
            from . import kernels as k
            from .kernels import descriptors, down_launch, mlp_launch, switches, up_launch, wgrad_launch  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise UserError(f"ssd.backend: triton needs the `triton` package ({exc}); pip install triton") from exc
        _K = k
    return _K


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether our Triton kernels can take `t`: a CUDA tensor (or any under TRITON_INTERPRET=1, for tests)."""
    return (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and triton_available()


# The expert computation is two opaque custom ops (forward; backward) joined by register_autograd.
# Why not an autograd.Function whose body torch.compile traces: traced that way (torch 2.11, fullgraph,
# backend aot_eager or inductor), every input gradient came back zero while the forward was right and
# each launcher traced alone was right (tools/check_compile.py, H200 2026-12-04), and the TMA launch's
# host-side descriptors graph-broke the block. Opaque ops keep the kernels out of the trace entirely.
@torch.library.custom_op("ssd_megatron::triton_experts", mutates_args=())
def _experts_op(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                gate_flat: torch.Tensor, topk_idx: torch.Tensor, activation: str, combine: str, wgrad: str,
                save: bool, centroids: Optional[torch.Tensor] = None, fold: str = "epilogue",
                b2: Optional[torch.Tensor] = None, init_in_up: bool = True, fused: bool = False,
                w2_view: str = "fallback"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor]:
    """(y, h or an empty tensor, the plan's order, token, offsets, w1 and w2 cast to x's dtype or empty
    tensors); `wgrad`, `centroids` and `fold` (router folding, see the module docstring) are only for the
    backward. Weights wider than x (master weights, module docstring) are cast here; the casts are
    returned for the backward only when `save` (an output may not alias an input, hence empty otherwise).
    b2: the output bias, y's initial value; `init_in_up`: y (when the combine adds into it) is initialised
    by the up kernel's programs (with `fused`, by the routing plan's) instead of by a fill launch of its
    own; `fused`: one launch for up, activation and down (module docstring); `w2_view`: how the unfused forward's
    down takes w2 where it is not row-major (TritonBackend's option)."""
    k = _kernels()
    w1c, w2c, b1c = _cast(w1, x.dtype), _cast(w2, x.dtype), _cast(b1, x.dtype)
    T, K = topk_idx.shape
    y0 = k.down_launch.atomic_output(x, T, K, w2.shape[2], combine) if init_in_up else None
    fill = None if y0 is None else (y0, b2)
    plan = make_plan(topk_idx, w1.shape[0], fill=fill if fused else None)
    if fused:
        y, h = k.mlp_launch.mlp_forward(x, w1c, b1c, w2c, plan, gate_flat, activation, save, combine, out=y0,
                                        out_bias=b2)
    else:
        a, h = k.up_launch.up_forward(x, w1c, b1c, plan, activation, save_h=save, fill=fill)
        y = k.down_launch.down_scatter(a, w2c, plan, gate_flat, combine, out=y0, out_bias=b2, view=w2_view)
    kept = [w if save and w is not v else x.new_empty(0) for w, v in ((w1c, w1), (w2c, w2))]  # no aliases
    return (y, (h if save else x.new_empty(0)), plan.order, plan.token, plan.offsets, *kept)


@_experts_op.register_fake
def _experts_fake(x, w1, b1, w2, gate_flat, topk_idx, activation, combine, wgrad, save, centroids=None,
                  fold="epilogue", b2=None, init_in_up=True, fused=False, w2_view="fallback"):
    T, K = topk_idx.shape
    rows = torch.empty(T * K, dtype=torch.int32, device=x.device)
    kept = [_empty_like_strided(w, x.dtype) if save and w.dtype != x.dtype else x.new_empty(0) for w in (w1, w2)]
    return (x.new_empty(T, w2.shape[2]), x.new_empty(T * K, w1.shape[1]) if save else x.new_empty(0),
            rows, torch.empty_like(rows), torch.empty(w1.shape[0] + 1, dtype=torch.int32, device=x.device), *kept)


@torch.library.custom_op("ssd_megatron::triton_experts_backward", mutates_args=())
def _experts_backward_op(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                         gate_flat: torch.Tensor, h: torch.Tensor, order: torch.Tensor, token: torch.Tensor,
                         offsets: torch.Tensor, topk_idx: torch.Tensor, activation: str, has_bias: bool, combine: str,
                         wgrad: str, needs: list[bool], centroids: Optional[torch.Tensor] = None,
                         fold: str = "epilogue", w1c: Optional[torch.Tensor] = None,
                         w2c: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None,
                         init_in_up: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor]:
    """(dx, dw1, db1, dw2, dgate flat, db2); a gradient not in `needs` (x, w1, b1, w2, gate, b2) is an empty
    tensor. With `centroids`, dx and dw1 include the folded router gradient (module docstring). w1c, w2c:
    the forward's casts of master weights w1, w2 (computed with; the weight grads keep w1's and w2's
    dtypes). b2: the output bias (its gradient takes its dtype); init_in_up: dx, when the combine adds into
    it, is zeroed by the up_bwd kernel's programs."""
    k = _kernels()
    need_x, need_w1, need_b1, need_w2, need_gate, need_b2 = needs
    dy = dy.to(x.dtype).contiguous()
    db2 = _bias_grad(dy, b2.dtype) if need_b2 else x.new_empty(0)
    if not any(needs[:5]):  # only the output bias trains (nothing saved for the rest: h may be empty)
        return (*(x.new_empty(0) for _ in range(5)), db2)
    top_k = topk_idx.shape[1]
    plan = _Plan(w1.shape[0], top_k, x.shape[0], order, token, offsets)
    w1c, w2c = (w1 if w1c is None else w1c), (w2 if w2c is None else w2c)
    dx0 = k.down_launch.atomic_output(x, x.shape[0], top_k, x.shape[1], combine) if need_x and init_in_up else None
    from .kernels import score_grad
    ds_kernel = centroids is not None and need_w1 and fold != "rows" and score_grad.enabled(w1.shape[0])
    dh, dgate, ga, db32 = k.up_launch.up_backward(dy, w2c, h, gate_flat, plan, activation,
                                                  need_ga=need_w2, need_db=has_bias and need_b1,
                                                  fill=None if dx0 is None else (dx0, None), partials=ds_kernel)
    ds = None
    if ds_kernel:  # the partials summed and dS built in one launch (kernels/score_grad.py)
        dgate, ds = score_grad.score_grad(dgate, topk_idx, w1.shape[0], x.dtype)
    split = combine != "buffer"  # "buffer" = deterministic sums: no atomics in the weight grads either
    rank1 = wfold = None
    if centroids is not None:
        E = w2.shape[1]
        rank1 = (dgate, centroids)
        if need_w1:
            # "pairs": the Gluon dW1 kernel sums dS^T x itself where it serves, else torch's GEMM
            # (`wgrad_launch.wgrad`)
            wfold = (("rows", (dgate / E).index_select(0, order.long()), E) if fold == "rows"
                     else ("pairs", (dgate, 1.0 / E,
                                     lambda: _router_centroid_grad(dgate, x, topk_idx, w1.shape[0], ds) / E), E))
    dx = k.down_launch.down_scatter(dh, w1c, plan, None, combine, rank1=rank1, out=dx0) if need_x else x.new_empty(0)
    return (dx,
            _weight_grad(k, dh, x, plan, w1, wgrad, split, wfold) if need_w1 else x.new_empty(0),
            db32.to(w1.dtype) if db32 is not None else x.new_empty(0),
            _weight_grad(k, ga, dy, plan, w2, wgrad, split) if need_w2 else x.new_empty(0),
            dgate.to(gate_flat.dtype) if need_gate else x.new_empty(0), db2)


@_experts_backward_op.register_fake
def _experts_backward_fake(dy, x, w1, w2, gate_flat, h, order, token, offsets, topk_idx, activation, has_bias,
                           combine, wgrad, needs, centroids=None, fold="epilogue", w1c=None, w2c=None, b2=None,
                           init_in_up=True):
    need_x, need_w1, need_b1, need_w2, need_gate, need_b2 = needs
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            _empty_like_strided(w1) if need_w1 else x.new_empty(0),
            w1.new_empty(w1.shape[:2]) if has_bias and need_b1 else x.new_empty(0),
            _empty_like_strided(w2) if need_w2 else x.new_empty(0),
            gate_flat.new_empty(gate_flat.shape) if need_gate else x.new_empty(0),
            b2.new_empty(b2.shape) if need_b2 else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, w1, b1, w2, gate_flat, topk_idx, activation, combine, wgrad, save, centroids, fold, b2, init_in_up, _, _ = inputs
    _, h, order, token, offsets, w1c, w2c = output
    # the casts of master weights (else empty): the backward computes with them; b2 for its dtype and shape
    ctx.save_for_backward(x, w1, w2, gate_flat, h, order, token, offsets, topk_idx, centroids,
                          w1c if w1c.numel() else None, w2c if w2c.numel() else None, b2)
    ctx.meta = (activation, b1 is not None, combine, wgrad, fold, init_in_up)
    # only y carries a gradient: no zero-filled gradients for h or the weight casts (h alone is [T*K, F1])
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, *_):
    if dy is None:  # y unused by the loss (gradients are not materialised, _setup)
        return (None,) * 16
    x, w1, w2, gate_flat, h, order, token, offsets, topk_idx, centroids, w1c, w2c, b2 = ctx.saved_tensors
    activation, has_bias, combine, wgrad, fold, init_in_up = ctx.meta
    # (trailing arguments left at their defaults are not counted in needs_input_grad: b2 may be missing)
    nig = tuple(ctx.needs_input_grad) + (False,) * 16
    needs = [bool(n) for n in nig[:5] + nig[12:13]]
    grads = _experts_backward_op(dy, x, w1, w2, gate_flat, h, order, token, offsets, topk_idx, activation, has_bias,
                                 combine, wgrad, needs, centroids, fold, w1c, w2c, b2, init_in_up)
    g = [gr if n else None for gr, n in zip(grads, needs)]
    return (*g[:5], None, None, None, None, None, None, None, g[5], None, None, None)


def _bias_grad(dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The output bias's gradient dy.sum(0) in `dtype`: kernels/column_sums.py's where it serves (base, H100: 13.6
    against torch's 30.8 µs, docs/kernels.md v25), else torch's."""
    from .kernels import column_sums
    return column_sums.column_sums(dy, dtype) if column_sums.serves(dy) else dy.sum(0, dtype=dtype)


def _router_centroid_grad(dgate: torch.Tensor, x: torch.Tensor, topk_idx: torch.Tensor, N: int,
                          ds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, D] fp32: sum over the (t, k) pairs routed to expert e of dgate * x[t] (dS^T x, dS the gate
    gradients scattered into a [T, N] matrix in x's dtype, as the router's own backward has it; dgate is
    indexed by flat pair t * K + k, as topk_idx's entries); `ds`: that matrix, when kernels/score_grad.py built
    it. (A Triton kernel that built dS's rows in registers and multiplied them into x's tiles took 21 against
    these ops' 27 µs at base, and 260-770 against 67 µs at 8B, where building the rows of 64 experts from 16 ids
    each dominates: docs/kernels.md v25.)"""
    if ds is None:
        T, K = topk_idx.shape
        ds = x.new_zeros(T, N).scatter_(1, topk_idx, dgate.view(T, K).to(x.dtype))
    return (ds.t() @ x).float()


_experts_op.register_autograd(_backward, setup_context=_setup)


def _empty_like_strided(w: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return torch.empty_strided(w.shape, w.stride(), dtype=dtype or w.dtype, device=w.device)


def _cast(w: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """w in `dtype`, with w's strides (a copy only when the dtype differs)."""
    return w if w is None or w.dtype == dtype else _empty_like_strided(w, dtype).copy_(w)


def _weight_grad(k, lhs, rhs_tokens, plan, weight, mode, split, fold=None):
    """dW[e] = lhs[rows of e]^T @ rhs_tokens[token of each row] (see TritonBackend's `wgrad`), with the
    strides of `weight` (so its grad flows back to a strided view without a copy); `fold` adds the router's
    gradient to the first p rows of dW (`wgrad_launch.wgrad`). dW has `weight`'s dtype (fp32 for master
    weights: our kernel's sums as they are; "gmm" rounds them to lhs's dtype first, torch._grouped_mm's)."""
    if mode == "triton":
        return k.wgrad_launch.wgrad(lhs, rhs_tokens, plan, weight, gathered=False, split=split, fold=fold)
    rhs = rhs_tokens.index_select(0, plan.token)
    if mode == "triton_mat":
        return k.wgrad_launch.wgrad(lhs, rhs, plan, weight, gathered=True, split=split, fold=fold)
    kind, coef, p = k.wgrad_launch.expert_fold(fold) or (None, None, 0)
    if kind == "rows":
        lhs = lhs.clone()
        lhs[:, :p] += coef.to(lhs.dtype)[:, None]
    dw = _grouped_mm(lhs.t(), rhs, offs=plan.offsets[1:])
    if kind == "expert":
        dw[:, :p] += coef.to(dw.dtype)[:, None, :]
    return _empty_like_strided(weight).copy_(dw)


class _Plan:
    """The slice of RoutingPlan the kernels read (rebuilt in backward from saved tensors)."""

    def __init__(self, N, K, T, order, token, offsets):
        self.num_experts, self.top_k, self.num_tokens = N, K, T
        self.order, self.token, self.offsets = order, token, offsets
        self.num_rows = T * K
        self.tiles = {}  # M-tile tables, built on first use (`tile_order.tile_list`)


def _inner_contiguous(w: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides as long as one of the two inner dims is unit-stride."""
    return w if (w.stride(-1) == 1 or w.stride(-2) == 1) else w.contiguous()


COMBINES = ("buffer", "atomic32", "atomic16")
W2_VIEWS = ("fallback", "copy", "tma")  # TritonBackend's w2_view
WGRADS = ("triton", "triton_mat", "gmm")
FOLDS = ("epilogue", "rows", "off")


class TritonBackend:
    """combine: how the K expert outputs of a token are summed (see kernels/down_launch.py `down_scatter`);
    default (`down_launch.default_combine`): "atomic16" (fastest measured; bf16 adds in place, like the
    reference's index_add, so not bitwise reproducible; "atomic32" for bf16 before Hopper), "buffer" when
    torch.are_deterministic_algorithms_enabled().
    wgrad: how the grouped weight gradients are computed: "triton" (our kernel gathers the token rows),
    "triton_mat" (rows pre-gathered by index_select, our kernel), "gmm" (pre-gathered, torch._grouped_mm).
    fold_router: "epilogue" or "rows" (how dW1 takes SSD's router gradient when the caller folds it into
    the kernels, `folds_router`; module docstring), or "off" (not offered).
    master_weights: offer to take fp32 weights with bf16/fp16 x (`takes_master_weights`; module docstring).
    fold_output: offer to take the output bias (`folds_output_bias`), and initialise the outputs that the
    down kernel adds into (y with that bias, dx with zeros) inside the up kernels, not by fill launches
    (module docstring). False: the bias is the caller's, and each atomic output gets a fill launch. "auto"
    (default): folded (H200 GPT-base ReLU layer forward 0.251 -> 0.236 ms, v12; H100 base ReLU layer fwd+bwd
    0.775 -> 0.728 ms and the graphed sparse GPT-base step 32.43 -> 32.32 ms once its bias gradient was our column
    sums, v25: until then the step had been 0.04-0.35 ms faster without it in training, v12, v19).
    fused_forward: the forward's up GEMM, activation and down GEMM as one kernel per M-tile (`a` kept on
    chip; module docstring): True, False, or "auto" (default): fused for the activations without a gate on
    Hopper GPUs, where it was measured faster (H200: GPT-base ReLU layer forward 0.236 -> 0.196 ms, 8B
    3.03 -> 2.60 ms; the graphed sparse step 31.17 -> 30.98 ms; SwiGLU slower, 0.286 -> 0.396 ms at base
    and 4.58 -> 7.01 ms at 8B; docs/kernels.md v12). Not fused before Hopper (untimed there) nor in the
    interpreter.
    w2_view: where the unfused forward's down (SwiGLU's forward, or fused_forward=False) takes the
    warp-specialised kernel (`auto`'s at 8B, kernels/down_gluon.py) and w2 is W_out's column view ([N, E, D] with
    unit stride along E, `weights.expert_views`): "fallback" (default) runs the Triton kernel instead (as before
    docs/kernels.md v47), "copy" gives the WS kernel a row-major copy of w2 (2 * N * E * D bytes each way; made
    nowhere else), "tma" lets it read the view in place (W tiles loaded as [BN, E] boxes of W_out and transposed
    in shared memory, as the WS fused forward reads them). Neither is timed yet (docs/kernels.md v49), hence the
    default.
    """

    name = "triton"

    def __init__(self, combine: str = None, wgrad: str = "triton", fold_router: str = "epilogue",
                 master_weights: bool = True, fold_output="auto", fused_forward="auto", w2_view: str = "fallback"):
        if combine is not None and combine not in COMBINES:
            raise ValueError(f"combine={combine!r}; accepted: {', '.join(COMBINES)}")
        if wgrad not in WGRADS:
            raise ValueError(f"wgrad={wgrad!r}; accepted: {', '.join(WGRADS)}")
        if fold_router not in FOLDS:
            raise ValueError(f"fold_router={fold_router!r}; accepted: {', '.join(FOLDS)}")
        for key, val in (("fold_output", fold_output), ("fused_forward", fused_forward)):
            if not (isinstance(val, bool) or val == "auto"):
                raise ValueError(f"{key}={val!r}; accepted: True, False, 'auto'")
        if w2_view not in W2_VIEWS:
            raise ValueError(f"w2_view={w2_view!r}; accepted: {', '.join(W2_VIEWS)}")
        self.combine, self.wgrad, self.fold_router, self.master_weights = combine, wgrad, fold_router, master_weights
        self.fold_output, self.fused_forward, self.w2_view = fold_output, fused_forward, w2_view
        if any(k.startswith(TUNING_PREFIXES) for k in os.environ):
            _kernels().switches.check_switches()  # a malformed value fails here, not inside a compiled step

    def folds_router(self, x: torch.Tensor) -> bool:
        """Whether a call on `x` runs our kernels, which can take `router_centroids` (module docstring)."""
        return (self.fold_router != "off" and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and triton_runs_on(x))

    def takes_master_weights(self, x: torch.Tensor) -> bool:
        """Whether a call on `x` may pass fp32 weights while x is bf16/fp16 (module docstring)."""
        return self.master_weights and x.dtype in (torch.bfloat16, torch.float16) and triton_runs_on(x)

    def folds_output_bias(self, x: torch.Tensor) -> bool:
        """Whether a call on `x` may pass `out_bias` (the FFN's output bias, any float dtype; its gradient
        comes back in that dtype): y then starts as the bias instead of zeros (module docstring)."""
        return self._folds_output() and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and triton_runs_on(x)

    def _folds_output(self) -> bool:
        """fold_output for this call ("auto": folded, class docstring)."""
        return self.fold_output in ("auto", True)

    def __call__(self, x, w1, b1, w2, topk_idx, gate, activation, router_centroids=None, out_bias=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; accepted: {', '.join(ACTIVATIONS)}")
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            # tl.dot has no float64 path worth having; float64 is for reference checks only
            if router_centroids is not None or out_bias is not None:
                raise ValueError("router_centroids, out_bias: folding needs the kernels (bf16, fp16 or fp32 inputs)")
            return ReferenceBackend()(x, w1, b1, w2, topk_idx, gate, activation)
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("ssd.backend: triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, for tests)")
        wdt = {t.dtype for t in (w1, b1, w2) if t is not None}
        if wdt != {x.dtype} and not (wdt == {torch.float32} and self.takes_master_weights(x)):
            raise ValueError(f"weights in {sorted(map(str, wdt))} with x in {x.dtype}; accepted: the weights in x's "
                             "dtype, or all float32 (master weights) with bf16/fp16 x when master_weights=True")
        x, w1, w2 = x.contiguous(), _inner_contiguous(w1), _inner_contiguous(w2)
        b1 = None if b1 is None else b1.contiguous()
        gate_flat = gate.to(x.dtype).reshape(-1).contiguous()
        c = None if router_centroids is None else router_centroids.detach().to(x.dtype).contiguous()
        fold_output = self._folds_output()
        if out_bias is not None and not fold_output:
            raise ValueError("out_bias: not offered here (fold_output=False); the caller adds the bias")
        b2 = None if out_bias is None else out_bias.contiguous()
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, gate_flat))
        # inference (no grad): no pre-activation saved
        return _experts_op(x, w1, b1, w2, gate_flat, topk_idx, activation, self._combine(x), self.wgrad, save, c,
                           self.fold_router, b2, fold_output, self._fused(x, activation), self.w2_view)[0]

    def _fused(self, x: torch.Tensor, activation: str) -> bool:
        """Whether this call's forward is the fused kernel (fused_forward, class docstring)."""
        if self.fused_forward != "auto":
            return self.fused_forward
        return not is_glu(activation) and x.is_cuda and _kernels().descriptors.hopper(x)

    def _combine(self, x: torch.Tensor) -> str:
        return self.combine if self.combine is not None else _kernels().down_launch.default_combine(x)
