"""The dense ReLU FFN, W_o relu(W_i x + b_i) + b_o, with its elementwise work folded into the GEMMs.

Why: under torch.compile the FFN ran as cuBLAS GEMMs plus inductor kernels that re-read [tokens, d_ff]
tensors: bias + ReLU (and a mask) after the first GEMM, the ReLU derivative after dy W_o, a reduction for
b_i's gradient — ~5 ms of a 47.6 ms GPT-base step on an H100 (docs/performance.md). Here:

- forward: `torch._addmm_activation` asks cuBLASLt for its RELU_BIAS epilogue, so the first GEMM writes
  h = relu(x W_iᵀ + b_i) directly; the second is an ordinary addmm. No mask is stored: h > 0 is the mask.
- backward: g = (dy W_o) ⊙ (h > 0) in one GEMM with the mask in its epilogue (relu_mask_matmul.py), which
  also sums g's columns there: b_i's gradient without another pass over g (nor over an augmented copy
  of x, as an extra column of ones on the W_i-gradient GEMM had cost: 0.26 ms per step on an H200).
- mixed precision: under autocast the op computes on the bf16 copies of the parameters but also takes
  the fp32 parameters themselves (`masters`), and returns the parameter gradients for those, in fp32
  straight out of the GEMMs (`torch.mm(..., out_dtype=torch.float32)`): the casts' backward, a bf16
  gradient re-read and written as fp32 per weight, never runs (Megatron keeps fp32 main gradients for
  the same reason).

It is one custom op, opaque to inductor (whose decompositions would split `_addmm_activation` again);
the backward is plain torch ops plus the masked-GEMM op, traced and compiled with the rest.

Numerics: the epilogue applies bias and ReLU to the fp32 accumulator and rounds once (the unfused path
rounds the GEMM, adds the bias and rounds again); both are within bf16 tolerance of each other
(tests/ffn/test_fused_relu_ffn.py). On CPU every piece is the plain torch computation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .relu_mask_matmul import (colsum_dtype, relu_mask_matmul, relu_mask_matmul_colsum, relu_mask_matmul_torch,
                               use_mask_gemm)


@torch.library.custom_op("ssd_megatron::relu_ffn", mutates_args=())
def _relu_ffn(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
              w_in_master: Optional[torch.Tensor] = None, b_in_master: Optional[torch.Tensor] = None,
              w_out_master: Optional[torch.Tensor] = None, b_out_master: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch._addmm_activation(b_in, x.reshape(-1, x.shape[-1]), w_in.t())
    y = torch.addmm(b_out, h, w_out.t())
    return y.view(*x.shape[:-1], w_out.shape[0]), h


@_relu_ffn.register_fake
def _(x, w_in, b_in, w_out, b_out, *masters):
    tokens = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], w_out.shape[0]), x.new_empty(tokens, w_in.shape[0])


def _setup_context(ctx, inputs, output):
    x, w_in, _, w_out, _ = inputs[:5]
    ctx.master_dtypes = tuple(None if m is None else m.dtype for m in inputs[5:9])  # None: no master
    ctx.save_for_backward(x, w_in, w_out, output[1])
    # h is returned for the backward only: no zero-filled [tokens, d_ff] gradient for it
    ctx.set_materialize_grads(False)


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype`: half-precision operands on CUDA accumulate into an fp32 output directly."""
    if dtype == a.dtype:
        return a @ b
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def _masked_grad(dy, w_out, h, col_sum: bool):
    """d(pre-activation) = (dy W_o) * relu'(.), and with `col_sum` its column sums (b_i's gradient): the
    Triton/Gluon GEMM with the mask (and the sums) in its epilogue, or (no Triton, CPU) torch ops that
    inductor fuses with their neighbours (the custom ops would be opaque to it)."""
    if use_mask_gemm(dy):
        return relu_mask_matmul_colsum(dy, w_out, h) if col_sum else (relu_mask_matmul(dy, w_out, h), None)
    g = relu_mask_matmul_torch(dy, w_out, h)
    return g, (g.sum(0, dtype=colsum_dtype(g)) if col_sum else None)


def _backward(ctx, grad_y, _grad_h):
    if grad_y is None:
        return (None,) * 9  # x, the four parameters, their four masters
    x, w_in, w_out, h = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # Each parameter's gradient goes to its master when one was given (in the master's dtype), else to it.
    masters = [d is not None for d in ctx.master_dtypes]
    want = [needs[i + 5] if masters[i] else needs[i + 1] for i in range(4)]
    dtypes = [ctx.master_dtypes[i] or t.dtype for i, t in enumerate((w_in, w_in, w_out, w_out))]
    dy = grad_y.reshape(-1, grad_y.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_w_out = _mm(dy.t(), h, dtypes[2]) if want[2] else None
    grad_b_out = dy.sum(0, dtype=dtypes[3]) if want[3] else None
    g, grad_b_in = _masked_grad(dy, w_out, h, col_sum=want[1])
    grad_b_in = None if grad_b_in is None else grad_b_in.to(dtypes[1])
    grad_x = (g @ w_in).view(x.shape) if needs[0] else None
    grad_w_in = _mm(g.t(), x2, dtypes[0]) if want[0] else None
    grads = [grad_w_in, grad_b_in, grad_w_out, grad_b_out]
    own = [None if masters[i] else grads[i] for i in range(4)]
    to_master = [grads[i] if masters[i] else None for i in range(4)]
    return (grad_x, *own, *to_master)


_relu_ffn.register_autograd(_backward, setup_context=_setup_context)


def relu_ffn(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
             b_out: torch.Tensor) -> torch.Tensor:
    """W_o relu(W_i x + b_i) + b_o for x [..., D], w_in [F, D], w_out [D, F], autocast-aware.

    A custom op has no autocast rule, so the casts autocast would do for two linears are done here; the
    parameters themselves ride along as masters so that their gradients skip the casts' backward."""
    params = (w_in, b_in, w_out, b_out)
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        if any(p.dtype != dt for p in params):
            return _relu_ffn(x.to(dt), *(p.to(dt) for p in params), *params)[0]
        x = x.to(dt)
    return _relu_ffn(x, *params)[0]
