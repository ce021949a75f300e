"""Column sums of row segments in fp32: the output bias's gradient (dy.sum(0)) and the router's centroids (each
expert's mean over its gate rows of W1).

torch reduces a [T, D] matrix over its rows at ≈ 0.7 TB/s on an H100: dy.sum(0) of the base layer ([16384, 768] bf16,
25 MB) took 36 µs of its ≈ 0.79 ms fwd+bwd, where reading 25 MB takes ≈ 8 µs; the centroids' mean over [32, 192,
768] took 12 µs (docs/kernels.md v25). Here programs over (segment, row chunk, column block) each sum their rows of
one column block in fp32, keeping BR rows of partial sums in registers so that the loads of successive steps are
independent, and store one row; where a segment has several chunks, the same kernel then sums those partial rows.
The order of the additions is fixed: the result is deterministic, as torch's is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PROGRAMS = 512  # programs of the first pass over a long segment: about four per SM of an H100
BR, BC = 32, 256  # rows and columns of one step's tile


@triton.jit
def _segment_sums_kernel(X, OUT, stride_seg, stride_row, seg_rows, chunk_rows, D, stride_oseg, stride_ochunk, divisor,
                         BR: tl.constexpr, BC: tl.constexpr):
    """OUT[s, j, cols] = the fp32 sum of X's rows [j * chunk_rows, (j + 1) * chunk_rows) of segment s (rows
    s * stride_seg + r * stride_row, r < seg_rows) divided by `divisor` (as torch's mean divides), in OUT's dtype;
    program (s * chunks + j, column block)."""
    chunks = tl.cdiv(seg_rows, chunk_rows)
    s = tl.program_id(0) // chunks
    j = tl.program_id(0) % chunks
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < D
    start = j * chunk_rows
    end = tl.minimum(start + chunk_rows, seg_rows)
    base = X + s.to(tl.int64) * stride_seg + cols[None, :]
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        m = (rows < end)[:, None] & cmask[None, :]
        acc += tl.load(base + rows.to(tl.int64)[:, None] * stride_row, mask=m, other=0.0).to(tl.float32)
    out = OUT + s.to(tl.int64) * stride_oseg + j.to(tl.int64) * stride_ochunk + cols
    tl.store(out, (tl.sum(acc, 0) / divisor).to(OUT.dtype.element_ty), mask=cmask)


def _launch(x: torch.Tensor, segments: int, stride_seg: int, seg_rows: int, dtype: torch.dtype, divisor: float,
            chunks: int) -> torch.Tensor:
    """[segments, chunks, D] in `dtype`: each segment's rows summed per chunk (`_segment_sums_kernel`)."""
    D = x.shape[-1]
    rows = triton.cdiv(triton.cdiv(seg_rows, chunks), BR) * BR
    chunks = triton.cdiv(seg_rows, rows)  # every chunk holds rows
    out = torch.empty(segments, chunks, D, device=x.device, dtype=dtype)
    _segment_sums_kernel[(segments * chunks, triton.cdiv(D, BC))](
        x, out, stride_seg, x.stride(-2), seg_rows, rows, D, out.stride(0), out.stride(1), divisor, BR=BR, BC=BC,
        num_warps=4)
    return out


def column_sums(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.sum(0) in `dtype` for a [T, D] x with unit column stride, accumulated in fp32: partial rows over about
    PROGRAMS programs, then those rows summed by a second launch."""
    T, D = x.shape
    chunks = max(1, min(triton.cdiv(T, BR), PROGRAMS // triton.cdiv(D, BC)))
    part = _launch(x, 1, 0, T, torch.float32 if chunks > 1 else dtype, 1.0, chunks)
    if part.shape[1] == 1:
        return part.view(D).to(dtype)
    return _launch(part.view(-1, D), 1, 0, part.shape[1], dtype, 1.0, 1).view(D)


def segment_means(w: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, D] in `dtype`: the mean of w[n, :rows] for a [N, F, D] w with unit stride along D (the centroids)."""
    N, _, D = w.shape
    return _launch(w, N, w.stride(0), rows, dtype, float(rows), 1).view(N, D)


def serves(t: torch.Tensor) -> bool:
    """Whether these kernels take `t` (on a device our kernels run on: `triton_backend.triton_runs_on`): unit stride
    along its last dimension, rows to sum, and outside torch.compile's tracing (there inductor generates the
    reduction)."""
    return t.stride(-1) == 1 and t.shape[-2] > 0 and t.shape[-1] > 0 and not torch.compiler.is_compiling()
