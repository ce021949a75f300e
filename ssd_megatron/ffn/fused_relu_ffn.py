"""The dense ReLU FFN, W_o relu(W_i x + b_i) + b_o, with its elementwise work folded into the GEMMs.

Why: under torch.compile the FFN ran as cuBLAS GEMMs plus inductor kernels that re-read [tokens, d_ff]
tensors: bias + ReLU (and a mask) after the first GEMM, the ReLU derivative after dy W_o, a reduction for
b_i's gradient — ~5 ms of a 47.6 ms GPT-base step on an H100 (docs/performance.md). Here:

- forward: `torch._addmm_activation` asks cuBLASLt for its RELU_BIAS epilogue, so the first GEMM writes
  h = relu(x W_iᵀ + b_i) directly; the second is an ordinary addmm. No mask is stored: h > 0 is the mask.
- backward: g = (dy W_o) ⊙ (h > 0) in one Triton GEMM with the mask in its epilogue
  (relu_mask_matmul.py); b_i's gradient rides on the W_i-gradient GEMM as an extra column of ones
  (g^T [x | 1 | 0 …], padded to a multiple of 8 columns for the tensor cores; +1% of that GEMM instead
  of a pass over g).

It is one custom op, opaque to inductor (whose decompositions would split `_addmm_activation` again);
the backward is plain torch ops plus the masked-GEMM op, traced and compiled with the rest.

Numerics: the epilogue applies bias and ReLU to the fp32 accumulator and rounds once (the unfused path
rounds the GEMM, adds the bias and rounds again); both are within bf16 tolerance of each other
(tests/ffn/test_fused_relu_ffn.py). On CPU every piece is the plain torch computation.
"""
from __future__ import annotations

import torch

from .relu_mask_matmul import relu_mask_matmul, relu_mask_matmul_torch, use_mask_gemm


@torch.library.custom_op("ssd_megatron::relu_ffn", mutates_args=())
def _relu_ffn(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
              b_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch._addmm_activation(b_in, x.reshape(-1, x.shape[-1]), w_in.t())
    y = torch.addmm(b_out, h, w_out.t())
    return y.view(*x.shape[:-1], w_out.shape[0]), h


@_relu_ffn.register_fake
def _(x, w_in, b_in, w_out, b_out):
    tokens = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], w_out.shape[0]), x.new_empty(tokens, w_in.shape[0])


def _setup_context(ctx, inputs, output):
    x, w_in, _, w_out, _ = inputs
    ctx.save_for_backward(x, w_in, w_out, output[1])


def _backward(ctx, grad_y, _grad_h):
    x, w_in, w_out, h = ctx.saved_tensors
    need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad
    dy = grad_y.reshape(-1, grad_y.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_w_out = dy.t() @ h if need_w_out else None
    grad_b_out = dy.sum(0) if need_b_out else None
    # d(pre-activation) = (dy W_o) * relu'(.): the Triton GEMM with the mask in its epilogue, or (no
    # Triton, CPU) the GEMM and a `where` that inductor fuses with its neighbours.
    g = relu_mask_matmul(dy, w_out, h) if use_mask_gemm(dy) else relu_mask_matmul_torch(dy, w_out, h)
    grad_x = (g @ w_in).view(x.shape) if need_x else None
    grad_w_in = grad_b_in = None
    if need_w_in and need_b_in:
        d = x2.shape[1]
        pad = (-(d + 1)) % 8
        ones = x2.new_ones(x2.shape[0], 1)
        x_aug = torch.cat([x2, ones, x2.new_zeros(x2.shape[0], pad)] if pad else [x2, ones], dim=1)
        gwb = g.t() @ x_aug
        grad_w_in, grad_b_in = gwb[:, :d], gwb[:, d]
    elif need_w_in:
        grad_w_in = g.t() @ x2
    elif need_b_in:
        grad_b_in = g.sum(0)
    return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out


_relu_ffn.register_autograd(_backward, setup_context=_setup_context)


def relu_ffn(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
             b_out: torch.Tensor) -> torch.Tensor:
    """W_o relu(W_i x + b_i) + b_o for x [..., D], w_in [F, D], w_out [D, F], autocast-aware.

    A custom op has no autocast rule, so the casts autocast would do for two linears are done here."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w_in, b_in, w_out, b_out = (t.to(dt) for t in (x, w_in, b_in, w_out, b_out))
    return _relu_ffn(x, w_in, b_in, w_out, b_out)[0]
