"""The routing plan (the (token, k) pairs sorted by expert) as a stable counting sort in three small
kernels: per-block expert counts, one scan, a scatter by in-block rank. The first kernel can also
initialise the output a later launch adds into (the fused expert MLP's y: `common._fill_share`)."""
import torch
import triton
import triton.language as tl

from ..routing import initialise
from .common import _fill_share, fill_args


@triton.jit
def _block_onehot(IDX, b, M, BLK: tl.constexpr, NP2: tl.constexpr):
    """Pairs b*BLK.. of the flat expert ids: (pair ids, mask, expert ids, one-hot [BLK, NP2] int32)."""
    p = b * BLK + tl.arange(0, BLK)
    pm = p < M
    e = tl.load(IDX + p, mask=pm, other=0).to(tl.int32)
    onehot = ((e[:, None] == tl.arange(0, NP2)[None, :]) & pm[:, None]).to(tl.int32)
    return p, pm, e, onehot


@triton.jit
def _plan_count_kernel(IDX, COUNTS, M, FILL, FILL_ROW, fill_numel, fill_width, fill_chunk,
                       BLK: tl.constexpr, NP2: tl.constexpr, HAS_FILL: tl.constexpr, HAS_FILL_ROW: tl.constexpr,
                       FILL_BLOCK: tl.constexpr):
    """COUNTS[b, e] = pairs of block b routed to expert e."""
    if HAS_FILL:
        _fill_share(FILL, FILL_ROW, fill_numel, fill_width, fill_chunk, HAS_FILL_ROW, FILL_BLOCK)
    b = tl.program_id(0)
    _, _, _, onehot = _block_onehot(IDX, b, M, BLK, NP2)
    tl.store(COUNTS + b * NP2 + tl.arange(0, NP2), tl.sum(onehot, 0))


@triton.jit
def _plan_scan_kernel(COUNTS, BASE, OFFS, NB, N, CH: tl.constexpr, NP2: tl.constexpr):
    """One program: OFFS [N+1] = exclusive sums of the expert totals; BASE[b, e] = OFFS[e] + pairs of
    expert e in blocks before b (where block b's rows of expert e start in the sorted order)."""
    cols = tl.arange(0, NP2)
    chunk = tl.arange(0, CH)
    total = tl.zeros((NP2,), dtype=tl.int32)
    for b0 in range(0, NB, CH):
        m = (b0 + chunk) < NB
        c = tl.load(COUNTS + (b0 + chunk)[:, None] * NP2 + cols[None, :], mask=m[:, None], other=0)
        total += tl.sum(c, 0)
    start = tl.cumsum(total, 0) - total
    tl.store(OFFS + cols, start, mask=cols < N)
    tl.store(OFFS + N, tl.sum(total, 0))
    run = start
    for b0 in range(0, NB, CH):
        m = (b0 + chunk) < NB
        c = tl.load(COUNTS + (b0 + chunk)[:, None] * NP2 + cols[None, :], mask=m[:, None], other=0)
        tl.store(BASE + (b0 + chunk)[:, None] * NP2 + cols[None, :], run[None, :] + tl.cumsum(c, 0) - c,
                 mask=m[:, None])
        run += tl.sum(c, 0)


@triton.jit
def _plan_scatter_kernel(IDX, BASE, ORDER, TOK, SEXP, M, K, BLK: tl.constexpr, NP2: tl.constexpr):
    """Each pair's sorted row = its block's start for its expert + its rank among the block's pairs of
    that expert (a stable counting sort: within an expert, pairs keep increasing order)."""
    b = tl.program_id(0)
    p, pm, e, onehot = _block_onehot(IDX, b, M, BLK, NP2)
    rank = tl.sum(onehot * (tl.cumsum(onehot, 0) - 1), 1)
    row = tl.load(BASE + b * NP2 + e, mask=pm, other=0) + rank
    tl.store(ORDER + row, p, mask=pm)
    tl.store(TOK + row, p // K, mask=pm)
    tl.store(SEXP + row, e, mask=pm)


def routing_plan(flat_idx: torch.Tensor, num_experts: int, top_k: int, fill=None):
    """(order, token, sorted expert, offsets), all int32: the stable sort of the flat pairs by expert
    as three small kernels (counts per block, one scan, scatter) instead of a radix sort + searchsorted.
    fill = (out, row or None): the first kernel's programs also set the contiguous [T, W] `out` to `row`
    broadcast over its rows, or to zeros."""
    M, N = flat_idx.numel(), num_experts
    dev = flat_idx.device
    np2 = max(16, triton.next_power_of_2(N))
    blk = max(64, 8192 // np2)  # one-hot tile of 8192 entries per program
    nb = triton.cdiv(M, blk)
    counts = torch.empty(nb, np2, device=dev, dtype=torch.int32)
    base = torch.empty_like(counts)
    offsets = torch.empty(N + 1, device=dev, dtype=torch.int32)
    order, token, sexp = (torch.empty(M, device=dev, dtype=torch.int32) for _ in range(3))
    if M:
        fills, meta = fill_args(fill, nb, counts)
        _plan_count_kernel[(nb,)](flat_idx, counts, M, *fills, BLK=blk, NP2=np2, num_warps=4, **meta)
        _plan_scan_kernel[(1,)](counts, base, offsets, nb, N, CH=max(1, 4096 // np2), NP2=np2, num_warps=4)
        _plan_scatter_kernel[(nb,)](flat_idx, base, order, token, sexp, M, top_k, BLK=blk, NP2=np2, num_warps=4)
    else:
        offsets.zero_()
        if fill is not None:
            initialise(*fill)
    return order, token, sexp, offsets

