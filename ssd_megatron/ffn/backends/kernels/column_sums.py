"""Column sums of row segments in fp32: the output bias's gradient (dy.sum(0)) and the router's centroids (each
expert's mean over its gate rows of W1).

torch reduces a [T, D] matrix over its rows at ≈ 0.7 TB/s on an H100: dy.sum(0) of the base layer ([16384, 768] bf16,
25 MB) took 36 µs of its ≈ 0.79 ms eager fwd+bwd, where reading 25 MB takes ≈ 8 µs; the centroids' mean over [32,
192, 768] took 12 µs (docs/kernels.md v25). Timed alone under CUDA graphs (tools/bench_reductions.py): 30.8 -> 13.6
and 9.2 -> 6.2 µs. Here each program loads one tile of up to BR_MAX rows and BC columns of one
segment at once and stores its fp32 column sums; where a segment spans several tiles, the same kernel then sums
those partial rows. The order of the additions is fixed: the result is deterministic, as torch's is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BR_MAX, BC, WARPS = 256, 128, 8  # rows (at most) and columns of a program's one tile; warps per program


@triton.jit
def _segment_sums_kernel(X, OUT, stride_seg, stride_row, seg_rows, D, stride_oseg, stride_ochunk, divisor,
                         BR: tl.constexpr, BC: tl.constexpr):
    """OUT[s, j, cols] = the fp32 sum of rows [j * BR, (j + 1) * BR) of X's segment s (rows s * stride_seg +
    r * stride_row, r < seg_rows) divided by `divisor` (as torch's mean divides), in OUT's dtype; program
    (s * chunks + j, column block). One tile per program, loaded at once: no loop whose loads wait on each other."""
    chunks = tl.cdiv(seg_rows, BR)
    s = tl.program_id(0) // chunks
    j = tl.program_id(0) % chunks
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < D
    rows = j * BR + tl.arange(0, BR)
    m = (rows < seg_rows)[:, None] & cmask[None, :]
    tile = tl.load(X + s.to(tl.int64) * stride_seg + rows.to(tl.int64)[:, None] * stride_row + cols[None, :], mask=m,
                   other=0.0)
    out = OUT + s.to(tl.int64) * stride_oseg + j.to(tl.int64) * stride_ochunk + cols
    tl.store(out, (tl.sum(tile.to(tl.float32), 0) / divisor).to(OUT.dtype.element_ty), mask=cmask)


def _sums(x: torch.Tensor, segments: int, stride_seg: int, seg_rows: int, dtype: torch.dtype,
          divisor: float = 1.0) -> torch.Tensor:
    """[segments, D] in `dtype`: each segment's rows summed (then divided by `divisor`): one pass of BR-row tiles,
    and while a segment spans several tiles, the same over their fp32 partial rows."""
    D = x.shape[-1]
    BR = min(BR_MAX, max(16, triton.next_power_of_2(seg_rows)))
    chunks = triton.cdiv(seg_rows, BR)
    out = torch.empty(segments, chunks, D, device=x.device, dtype=dtype if chunks == 1 else torch.float32)
    _segment_sums_kernel[(segments * chunks, triton.cdiv(D, BC))](
        x, out, stride_seg, x.stride(-2), seg_rows, D, out.stride(0), out.stride(1), divisor if chunks == 1 else 1.0,
        BR=BR, BC=BC, num_warps=WARPS)
    if chunks == 1:
        return out.view(segments, D)
    return _sums(out, segments, out.stride(0), chunks, dtype, divisor)


def column_sums(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.sum(0) in `dtype` for a [T, D] x with unit column stride, accumulated in fp32."""
    return _sums(x, 1, 0, x.shape[0], dtype).view(x.shape[1])


def segment_means(w: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, D] in `dtype`: the mean of w[n, :rows] for a [N, F, D] w with unit stride along D (the centroids)."""
    return _sums(w, w.shape[0], w.stride(0), rows, dtype, float(rows))


def serves(t: torch.Tensor) -> bool:
    """Whether these kernels take `t` (on a device our kernels run on: `triton_backend.triton_runs_on`): unit stride
    along its last dimension, rows to sum, and outside torch.compile's tracing (there inductor generates the
    reduction)."""
    return t.stride(-1) == 1 and t.shape[-2] > 0 and t.shape[-1] > 0 and not torch.compiler.is_compiling()
