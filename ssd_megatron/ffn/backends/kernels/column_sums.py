"""The output bias's gradient, db2 = dy.sum(0), as column sums in two launches: programs over (row chunk, column
block) each sum their [rows, BC] block in fp32 into a row of partial sums, then torch sums the few partial rows.

Why: torch's reduction over dim 0 of the base layer's dy ([16384, 768] bf16, 25 MB) took 36 µs in the H100 profile
of docs/kernels.md (session 21), ≈ 0.7 TB/s and 4% of the sparse layer's fwd+bwd; a read of 25 MB at the H100's
bandwidth is ≈ 8 µs. The partial rows are summed in a fixed order: the result is deterministic, as torch's is.
Opt-in (SSD_TRITON_BIAS_GRAD=triton; the default, torch, is `dy.sum(0)`): built without a GPU (session 25) and
untimed (docs/kernels.md v19)."""
import os

import torch
import triton
import triton.language as tl

PROGRAMS = 512  # about four per SM of an H100: every SM streams
BR, BC = 32, 256  # rows and columns of one step's tile


@triton.jit
def _column_sums_kernel(X, PART, T, D, stride_x, rows_per_program, BR: tl.constexpr, BC: tl.constexpr):
    """PART[p, cols] = the fp32 sums over rows [p * rows_per_program, ...) of X[:, cols], cols the program's block."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < D
    start = p * rows_per_program
    end = tl.minimum(start + rows_per_program, T)
    acc = tl.zeros((BR, BC), dtype=tl.float32)  # summed over rows at the end: the steps' loads are independent
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        m = (rows < end)[:, None] & cmask[None, :]
        acc += tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(PART + p.to(tl.int64) * D + cols, tl.sum(acc, 0), mask=cmask)


def column_sums(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.sum(0) in `dtype` for a [T, D] x with unit column stride, accumulated in fp32."""
    T, D = x.shape
    if T == 0 or x.stride(1) != 1:
        return x.sum(0, dtype=dtype)
    col_blocks = triton.cdiv(D, BC)
    chunks = max(1, min(triton.cdiv(T, BR), PROGRAMS // col_blocks))
    rows = triton.cdiv(triton.cdiv(T, chunks), BR) * BR
    chunks = triton.cdiv(T, rows)  # every chunk holds rows
    part = torch.empty(chunks, D, device=x.device, dtype=torch.float32)
    _column_sums_kernel[(chunks, col_blocks)](x, part, T, D, x.stride(0), rows, BR=BR, BC=BC, num_warps=4)
    return part.sum(0).to(dtype)


def bias_grad_mode() -> str:
    """SSD_TRITON_BIAS_GRAD: how the triton backend sums the output bias's gradient, torch (default) or triton."""
    mode = os.environ.get("SSD_TRITON_BIAS_GRAD", "torch").strip()
    if mode not in ("torch", "triton"):
        from ....errors import UserError
        raise UserError(f"SSD_TRITON_BIAS_GRAD={mode!r}; accepted: torch (dy.sum(0), the default), triton "
                        f"(kernels/column_sums.py)")
    return mode
