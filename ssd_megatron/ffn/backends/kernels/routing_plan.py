"""The routing plan (the (token, k) pairs sorted by expert) as a stable counting sort in two small
kernels: per-block expert counts, then a scatter by in-block rank whose programs each derive their own
starts from the whole (small) table of block counts. The first kernel can also initialise the output a
later launch adds into (the fused expert MLP's y: `common._fill_share`).

A block is STEPS consecutive sub-blocks of SUB pairs (a one-hot tile of SUB x NP2 entries each), so that
there are at most MAX_BLOCKS blocks and the count table stays a few kB. The scan over it, which every
scatter program repeats for its own block (a few hundred 16-wide rows from L2), replaced a one-program
scan launch between the two kernels (docs/kernels.md v17)."""
import torch
import triton
import triton.language as tl

from ..routing import initialise
from .common import _fill_share, fill_args

MAX_BLOCKS = 256     # blocks of pairs (programs of each kernel)
FILL_PROGRAMS = 384  # programs of the first kernel when it also initialises an output


@triton.jit
def _block_onehot(IDX, b, M, BLK: tl.constexpr, NP2: tl.constexpr):
    """Pairs b*BLK.. of the flat expert ids: (pair ids, mask, expert ids, one-hot [BLK, NP2] int32)."""
    p = b * BLK + tl.arange(0, BLK)
    pm = p < M
    e = tl.load(IDX + p, mask=pm, other=0).to(tl.int32)
    onehot = ((e[:, None] == tl.arange(0, NP2)[None, :]) & pm[:, None]).to(tl.int32)
    return p, pm, e, onehot


@triton.jit
def _plan_count_kernel(IDX, COUNTS, M, NB, STEPS, FILL, FILL_ROW, fill_numel, fill_width, fill_chunk,
                       SUB: tl.constexpr, NP2: tl.constexpr, HAS_FILL: tl.constexpr, HAS_FILL_ROW: tl.constexpr,
                       FILL_BLOCK: tl.constexpr):
    """COUNTS[b, e] = pairs of block b routed to expert e (programs past NB only fill)."""
    if HAS_FILL:
        _fill_share(FILL, FILL_ROW, fill_numel, fill_width, fill_chunk, HAS_FILL_ROW, FILL_BLOCK)
    b = tl.program_id(0)
    if b < NB:
        total = tl.zeros((NP2,), dtype=tl.int32)
        for s in range(STEPS):
            _, _, _, onehot = _block_onehot(IDX, b * STEPS + s, M, SUB, NP2)
            total += tl.sum(onehot, 0)
        tl.store(COUNTS + b * NP2 + tl.arange(0, NP2), total)


@triton.jit
def _plan_scatter_kernel(IDX, COUNTS, OFFS, ORDER, TOK, SEXP, M, K, N, NB, STEPS,
                         SUB: tl.constexpr, NP2: tl.constexpr, CH: tl.constexpr):
    """Each pair's sorted row = where its expert's rows start (the experts' exclusive total sums, OFFS) +
    its expert's pairs in blocks before this one + its rank among this block's pairs of that expert: a
    stable counting sort (within an expert, pairs keep increasing order). Program 0 stores OFFS [N+1]."""
    b = tl.program_id(0)
    cols = tl.arange(0, NP2)
    chunk = tl.arange(0, CH)
    total = tl.zeros((NP2,), dtype=tl.int32)
    before = tl.zeros((NP2,), dtype=tl.int32)
    for b0 in range(0, NB, CH):
        r = b0 + chunk
        c = tl.load(COUNTS + r[:, None] * NP2 + cols[None, :], mask=(r < NB)[:, None], other=0)
        total += tl.sum(c, 0)
        before += tl.sum(tl.where((r < b)[:, None], c, 0), 0)
    start = tl.cumsum(total, 0) - total
    if b == 0:
        tl.store(OFFS + cols, start, mask=cols < N)
        tl.store(OFFS + N, tl.sum(total, 0))
    base = start + before
    for s in range(STEPS):
        p, pm, e, onehot = _block_onehot(IDX, b * STEPS + s, M, SUB, NP2)
        rank = tl.sum(onehot * (tl.cumsum(onehot, 0) - 1), 1)
        row = tl.sum(onehot * base[None, :], 1) + rank
        tl.store(ORDER + row, p, mask=pm)
        tl.store(TOK + row, p // K, mask=pm)
        tl.store(SEXP + row, e, mask=pm)
        base += tl.sum(onehot, 0)


def routing_plan(flat_idx: torch.Tensor, num_experts: int, top_k: int, fill=None, max_blocks: int = MAX_BLOCKS):
    """(order, token, sorted expert, offsets), all int32: the stable sort of the flat pairs by expert
    as two small kernels (counts per block; starts and scatter) instead of a radix sort + searchsorted.
    fill = (out, row or None): the first kernel's programs also set the contiguous [T, W] `out` to `row`
    broadcast over its rows, or to zeros. max_blocks: at most this many blocks (tests make it small, so
    that a block spans several sub-blocks)."""
    M, N = flat_idx.numel(), num_experts
    dev = flat_idx.device
    np2 = max(16, triton.next_power_of_2(N))
    sub = max(64, 8192 // np2)  # one-hot tile of 8192 entries per step
    nsub = triton.cdiv(M, sub)
    steps = max(1, triton.cdiv(nsub, max_blocks))
    nb = triton.cdiv(nsub, steps)  # every block holds pairs
    counts = torch.empty(max(nb, 1), np2, device=dev, dtype=torch.int32)
    offsets = torch.empty(N + 1, device=dev, dtype=torch.int32)
    order, token, sexp = (torch.empty(M, device=dev, dtype=torch.int32) for _ in range(3))
    if M:
        grid = nb if fill is None else max(nb, FILL_PROGRAMS)
        fills, meta = fill_args(fill, grid, counts)
        _plan_count_kernel[(grid,)](flat_idx, counts, M, nb, steps, *fills, SUB=sub, NP2=np2, num_warps=4, **meta)
        ch = min(triton.next_power_of_2(nb), max(1, 4096 // np2))
        _plan_scatter_kernel[(nb,)](flat_idx, counts, offsets, order, token, sexp, M, top_k, N, nb, steps,
                                    SUB=sub, NP2=np2, CH=ch, num_warps=4)
    else:
        offsets.zero_()
        if fill is not None:
            initialise(*fill)
    return order, token, sexp, offsets
