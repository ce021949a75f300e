"""relu(x Wᵀ + b) as one GEMM with the bias and the ReLU in its epilogue (the dense FFN's first half).

Why: under torch.compile the dense FFN's first linear ran as a cuBLAS GEMM followed by an inductor
kernel that re-read the pre-activation and wrote the activation and a mask (2.0 ms per GPT-base step on
an H100, docs/performance.md). `torch._addmm_activation` asks cuBLASLt for its RELU_BIAS epilogue, so
the GEMM writes relu(x Wᵀ + b) directly. Inductor decomposes that op back into addmm + relu, so it is
wrapped in a custom op, which compiled graphs call as it is.

Backward (plain torch ops, traced and fused by inductor): the ReLU derivative comes from the output
itself (h > 0 ⇔ pre-activation > 0), so no mask is stored; h is the tensor the second linear saves
anyway.

Numerics: the epilogue adds the bias and applies ReLU to the fp32 accumulator before rounding once to
bf16; the unfused path rounds the GEMM output, adds the bias and rounds again. Both are within bf16
tolerance of each other (tests/ffn/test_fused_linear_relu.py); on CPU the op is exact addmm + relu.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("ssd_megatron::linear_relu", mutates_args=())
def _linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    h = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t())
    return h.view(*x.shape[:-1], weight.shape[0])


@_linear_relu.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output)


def _backward(ctx, grad_h):
    x, weight, h = ctx.saved_tensors
    g = torch.where(h > 0, grad_h, torch.zeros_like(grad_h)).reshape(-1, h.shape[-1])
    need_x, need_w, need_b = ctx.needs_input_grad
    grad_x = (g @ weight).view(x.shape) if need_x else None
    x2 = x.reshape(-1, x.shape[-1])
    grad_w = grad_b = None
    if need_w and need_b:
        # The bias gradient (column sums of g) rides on the weight-gradient GEMM as one extra column:
        # g^T [x | 1 | 0..] (padded to a multiple of 8 columns for the tensor cores). A separate
        # reduction would re-read all of g (0.07 ms per GPT-base layer on an H100); the extra
        # columns cost 1% of the GEMM.
        d = x2.shape[1]
        pad = (-(d + 1)) % 8
        ones = x2.new_ones(x2.shape[0], 1)
        x_aug = torch.cat([x2, ones, x2.new_zeros(x2.shape[0], pad)] if pad else [x2, ones], dim=1)
        gwb = g.t() @ x_aug
        grad_w, grad_b = gwb[:, :d], gwb[:, d]
    elif need_w:
        grad_w = g.t() @ x2
    elif need_b:
        grad_b = g.sum(0)
    return grad_x, grad_w, grad_b


_linear_relu.register_autograd(_backward, setup_context=_setup_context)


def linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """relu(x @ weight.T + bias) for x [..., in], weight [out, in], bias [out], autocast-aware.

    A custom op has no autocast rule, so the casts autocast would do for a linear are done here."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
    return _linear_relu(x, weight, bias)
