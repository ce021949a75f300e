"""Initialisation fills on a side stream (SSD_TRITON_SIDE_FILL=P, P > 0; off by default): an output that a later launch
adds into with atomics is set to its bias (or zeros) by P programs on a second stream, beside latency-bound launches
that do not touch it, and the caller's stream waits for that stream before the launch that adds.

Where: y of the fused forward, beside the routing plan's two kernels (kernels/routing_plan.py; else the plan's count
kernel fills it: 25 MB at base, ≈ 7 of that kernel's 9.3 µs, H100, docs/kernels.md v17), and dx in the backward,
beside the up_bwd launch (triton_backend; else a fill launch of its own right before the dx launch, in training).
P is a share of the SMs, so that the other launches' programs keep the rest. A tensor filled here is allocated on
the caller's stream and used there after the wait, so no record_stream is needed. Built without a GPU (session 25),
untimed (docs/kernels.md v19)."""
import os

import torch
import triton
import triton.language as tl

_SIDE: dict = {}  # device index -> its side stream


@triton.jit
def _fill_rows_kernel(OUT, ROW, T, W, HAS_ROW: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """OUT [T, W] (rows contiguous) := ROW [W] broadcast over its rows, or zeros: each program takes every
    num_programs-th block of BR rows, column block by column block (the row's block loaded once)."""
    rows = tl.arange(0, BR)
    for c0 in range(0, W, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < W
        if HAS_ROW:
            v = tl.load(ROW + cols, mask=cm, other=0.0).to(OUT.dtype.element_ty)
        else:
            v = tl.zeros((BC,), dtype=OUT.dtype.element_ty)
        tile = tl.broadcast_to(v[None, :], (BR, BC))
        for r0 in range(tl.program_id(0) * BR, T, tl.num_programs(0) * BR):
            r = r0 + rows
            tl.store(OUT + r.to(tl.int64)[:, None] * W + cols[None, :], tile, mask=(r < T)[:, None] & cm[None, :])


def side_fill_programs() -> int:
    """SSD_TRITON_SIDE_FILL: the programs of the initialisation fills on the side stream (0, the default: none
    there; module docstring)."""
    text = os.environ.get("SSD_TRITON_SIDE_FILL", "0").strip()
    if not text.isdigit():
        from ....errors import UserError
        raise UserError(f"SSD_TRITON_SIDE_FILL={text!r}: expected an integer >= 0, the side stream fill's programs "
                        f"(0: the fills inside other kernels or launches of their own)")
    return int(text)


def side_fill(fill, programs: int):
    """Launch the initialisation fill = (out [T, W] with contiguous rows, row [W] or None) by `programs` programs on
    the device's side stream, after the work queued so far on the current stream; returns the side stream, which
    the caller's stream must wait for before using `out`."""
    out = fill[0]
    dev = out.device
    side = _SIDE.get(dev.index)
    if side is None:
        side = _SIDE[dev.index] = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    row = fill[1]
    T, W = out.shape
    with torch.cuda.stream(side):
        _fill_rows_kernel[(programs,)](out, out if row is None else row, T, W, HAS_ROW=row is not None,
                                       BR=32, BC=256, num_warps=8)
    return side
