"""`triton` expert backend: fused gather/scatter grouped GEMMs (our own kernels, ScatterMoE-style).

Forward: 1 routing sort + 2 kernels (+ the K-way sum of the scattered outputs). Backward: 4 kernels
(up_bwd: da -> dh, dgate, gate*a and db1; wgrad x2; down for dx) + the K-way sum. With the default
options no token copy is materialised, and nothing syncs with the host. Kernels and tile configs live in `_triton_kernels` (imported on first use,
so this module imports on machines without triton or CUDA).
"""
from __future__ import annotations

import os

import torch

from ...errors import UserError
from ..activations import ACTIVATIONS
from .grouped_mm import _grouped_mm
from .reference import ReferenceBackend
from .routing import make_plan

_K = None


def _kernels():
    global _K
    if _K is None:
        try:
            from . import _triton_kernels as k
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


class _TritonExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, gate, topk_idx, activation, combine, wgrad):
        k = _kernels()
        plan = make_plan(topk_idx, w1.shape[0])
        gate_flat = gate.reshape(-1).contiguous()
        a, h = k.up_forward(x, w1, b1, plan, activation, save_h=True)
        y = k.down_scatter(a, w2, plan, gate_flat, combine)
        ctx.save_for_backward(x, w1, w2, gate_flat, h, plan.order, plan.token, plan.offsets)
        T, K = topk_idx.shape
        ctx.meta = (T, K, w1.shape[0], activation, b1 is not None, combine, wgrad)
        return y

    @staticmethod
    def backward(ctx, dy):
        k = _kernels()
        x, w1, w2, gate_flat, h, order, token, offsets = ctx.saved_tensors
        T, K, N, activation, has_bias, combine, wgrad = ctx.meta
        plan = _Plan(N, K, T, order, token, offsets)
        dy = dy.to(x.dtype).contiguous()
        need_x, need_w1, need_b1, need_w2, need_gate = ctx.needs_input_grad[:5]
        dh, dgate, ga, db32 = k.up_backward(dy, w2, h, gate_flat, plan, activation,
                                            need_ga=need_w2, need_db=has_bias and need_b1)
        dw1 = dw2 = dx = None
        split = combine != "buffer"  # "buffer" = deterministic sums: no atomics in the weight grads either
        if need_w2:
            dw2 = _weight_grad(k, ga, dy, plan, w2, wgrad, split)
        if need_w1:
            dw1 = _weight_grad(k, dh, x, plan, w1, wgrad, split)
        if need_x:
            dx = k.down_scatter(dh, w1, plan, None, combine)
        db1 = db32.to(w1.dtype) if db32 is not None else None
        dg = dgate.view(T, K).to(gate_flat.dtype) if need_gate else None
        return dx, dw1, db1, dw2, dg, None, None, None, None


def _weight_grad(k, lhs, rhs_tokens, plan, weight, mode, split):
    """dW[e] = lhs[rows of e]^T @ rhs_tokens[token of each row] (see TritonBackend's `wgrad`)."""
    if mode == "triton":
        return k.wgrad(lhs, rhs_tokens, plan, weight, gathered=False, split=split)
    rhs = rhs_tokens.index_select(0, plan.token)
    if mode == "triton_mat":
        return k.wgrad(lhs, rhs, plan, weight, gathered=True, split=split)
    return _grouped_mm(lhs.t(), rhs, offs=plan.offsets[1:])


class _Plan:
    """The slice of RoutingPlan the kernels read (rebuilt in backward from saved tensors)."""

    def __init__(self, N, K, T, order, token, offsets):
        self.num_experts, self.top_k, self.num_tokens = N, K, T
        self.order, self.token, self.offsets = order, token, offsets
        self.num_rows = T * K


def _inner_contiguous(w: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides as long as one of the two inner dims is unit-stride."""
    return w if (w.stride(-1) == 1 or w.stride(-2) == 1) else w.contiguous()


COMBINES = ("buffer", "atomic32", "atomic16")
WGRADS = ("triton", "triton_mat", "gmm")


class TritonBackend:
    """combine: how the K expert outputs of a token are summed (see _triton_kernels.down_scatter);
    default: "atomic16" (fastest measured; bf16 adds in place, like the reference's index_add, so not
    bitwise reproducible), "buffer" when torch.are_deterministic_algorithms_enabled().
    wgrad: how the grouped weight gradients are computed: "triton" (our kernel gathers the token rows),
    "triton_mat" (rows pre-gathered by index_select, our kernel), "gmm" (pre-gathered, torch._grouped_mm).
    """

    name = "triton"

    def __init__(self, combine: str = None, wgrad: str = "triton"):
        if combine is not None and combine not in COMBINES:
            raise ValueError(f"combine={combine!r}; accepted: {', '.join(COMBINES)}")
        if wgrad not in WGRADS:
            raise ValueError(f"wgrad={wgrad!r}; accepted: {', '.join(WGRADS)}")
        self.combine, self.wgrad = combine, wgrad
        if os.environ.get("SSD_TRITON_CONFIG"):
            _kernels().env_configs()  # a malformed value fails here, not inside a compiled step

    def __call__(self, x, w1, b1, w2, topk_idx, gate, activation):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; accepted: {', '.join(ACTIVATIONS)}")
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            # tl.dot has no float64 path worth having; float64 is for reference checks only
            return ReferenceBackend()(x, w1, b1, w2, topk_idx, gate, activation)
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("ssd.backend: triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, for tests)")
        x, w1, w2 = x.contiguous(), _inner_contiguous(w1), _inner_contiguous(w2)
        b1 = None if b1 is None else b1.contiguous()
        gate = gate.to(x.dtype)
        tensors = (x, w1, b1, w2, gate)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return _TritonExperts.apply(x, w1, b1, w2, gate, topk_idx, activation, self._combine(), self.wgrad)
        # inference: no pre-activation saved
        k = _kernels()
        T, K = topk_idx.shape
        plan = make_plan(topk_idx, w1.shape[0])
        a, _ = k.up_forward(x, w1, b1, plan, activation, save_h=False)
        return k.down_scatter(a, w2, plan, gate.reshape(-1).contiguous(), self._combine())

    def _combine(self) -> str:
        if self.combine is not None:
            return self.combine
        return "buffer" if torch.are_deterministic_algorithms_enabled() else "atomic16"
