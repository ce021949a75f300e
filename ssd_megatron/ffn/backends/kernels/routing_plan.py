"""The routing plan (the (token, k) pairs sorted by expert) as a stable counting sort in two small
kernels: per-block expert counts, then a scatter by in-block rank whose programs each derive their own
starts from the whole (small) table of block counts. The scatter's programs also write the Gluon kernels' M-tile
table (`plan_tiles_default`; otherwise kernels/tile_table.py's launch does), and one of the two kernels initialises
the output that a later launch adds into (the fused expert MLP's y: `common._fill_share`, where `fill_place` says).

A block is STEPS consecutive sub-blocks of SUB pairs (a one-hot tile of SUB x NP2 entries each), so that
there are at most MAX_BLOCKS blocks and the count table stays a few kB. The scan over it, which every
scatter program repeats for its own block (a few hundred 16-wide rows from L2), replaced a one-program
scan launch between the two kernels (docs/kernels.md v17)."""
import os

import torch
import triton
import triton.language as tl

from ..routing import initialise
from .common import _fill_share, fill_args

MAX_BLOCKS = 256     # blocks of pairs (programs of each kernel)
FILL_PROGRAMS = 384  # programs of the kernel that initialises an output in its programs' shares
TILE_BM = 128        # the Gluon kernels' M-tile height: the scatter kernel also writes their tile table at it
TILE_CHUNK = 64      # table entries per program and step
# the one-hot tiles have the experts on their rows (the ranks' scans along the contiguous axis) up to this many
# experts (base, 32: 1.9 µs faster per plan on the H200), else the pairs (8B, 64: 17 µs faster), docs/kernels.md v24
EXPERT_ROWS_MAX = 32
# where the output's initialisation goes (`fill_place`): every count program's share; every scatter program's share,
# before its scatter work; or programs of their own beside the scatter's, APART_PROGRAMS of them, so that the
# bandwidth-bound fill runs under the latency-bound scatter (the shares in the scatter programs did not overlap it:
# 24.8 µs against 15.4 + 9.1 apart, v24; apart 23.4 µs, v25)
FILL_PLACES = ("count", "scatter", "apart")
APART_PROGRAMS = 256


@triton.jit
def _block_onehot(IDX, b, M, BLK: tl.constexpr, NP2: tl.constexpr, PAIR_AXIS: tl.constexpr):
    """Pairs b*BLK.. of the flat expert ids: (pair ids, mask, expert ids, one-hot int32 with the pairs along axis
    PAIR_AXIS: [NP2, BLK] when 1, [BLK, NP2] when 0). The scatter's in-block ranks are scans along that axis, and
    which is faster depends on the expert count (`EXPERT_ROWS_MAX`)."""
    p = b * BLK + tl.arange(0, BLK)
    pm = p < M
    e = tl.load(IDX + p, mask=pm, other=0).to(tl.int32)
    experts = tl.expand_dims(tl.arange(0, NP2), PAIR_AXIS)
    onehot = ((experts == tl.expand_dims(e, 1 - PAIR_AXIS)) & tl.expand_dims(pm, 1 - PAIR_AXIS)).to(tl.int32)
    return p, pm, e, onehot


@triton.jit
def _plan_count_kernel(IDX, COUNTS, M, NB, STEPS, FILL, FILL_ROW, fill_numel, fill_width, fill_chunk,
                       SUB: tl.constexpr, NP2: tl.constexpr, PAIR_AXIS: tl.constexpr, HAS_FILL: tl.constexpr,
                       HAS_FILL_ROW: tl.constexpr, FILL_BLOCK: tl.constexpr):
    """COUNTS[b, e] = pairs of block b routed to expert e (programs past NB only fill)."""
    b = tl.program_id(0)
    if HAS_FILL:
        _fill_share(FILL, FILL_ROW, fill_numel, fill_width, fill_chunk, b, HAS_FILL_ROW, FILL_BLOCK)
    if b < NB:
        total = tl.zeros((NP2,), dtype=tl.int32)
        for s in range(STEPS):
            _, _, _, onehot = _block_onehot(IDX, b * STEPS + s, M, SUB, NP2, PAIR_AXIS)
            total += tl.sum(onehot, PAIR_AXIS)
        tl.store(COUNTS + b * NP2 + tl.arange(0, NP2), total)


@triton.jit
def _tile_table_share(TILES, n_tiles, start, total, cols, b, NB, M, N, TBM: tl.constexpr, TCH: tl.constexpr):
    """Program b's entries of the expert-order M-tile table at height TBM (kernels/tile_table.py's, from the
    experts' starts and row counts this program already holds): (expert, first row); past the real tiles
    (expert N - 1, first row M)."""
    nt = (total + TBM - 1) // TBM
    cum = tl.cumsum(nt, 0)
    for j0 in range(b * TCH, n_tiles, NB * TCH):
        j = j0 + tl.arange(0, TCH)
        e = tl.sum((cum[None, :] <= j[:, None]).to(tl.int32), 1)  # experts whose tiles all come before tile j
        sel = cols[None, :] == e[:, None]
        row0 = tl.sum(tl.where(sel, start[None, :] - (cum - nt)[None, :] * TBM, 0), 1) + j * TBM
        jm = j < n_tiles
        tl.store(TILES + 2 * j, tl.minimum(e, N - 1), mask=jm)
        tl.store(TILES + 2 * j + 1, tl.where(e < N, row0, M), mask=jm)


@triton.jit
def _plan_scatter_kernel(IDX, COUNTS, OFFS, ORDER, TOK, SEXP, TILES, n_tiles, M, K, N, NB, STEPS,
                         FILL, FILL_ROW, fill_numel, fill_width, fill_chunk,
                         SUB: tl.constexpr, NP2: tl.constexpr, PAIR_AXIS: tl.constexpr, CH: tl.constexpr,
                         HAS_TILES: tl.constexpr,
                         TBM: tl.constexpr, TCH: tl.constexpr, HAS_FILL: tl.constexpr, HAS_FILL_ROW: tl.constexpr,
                         FILL_BLOCK: tl.constexpr, FILL_APART: tl.constexpr):
    """Each pair's sorted row = where its expert's rows start (the experts' exclusive total sums, OFFS) +
    its expert's pairs in blocks before this one + its rank among this block's pairs of that expert: a
    stable counting sort (within an expert, pairs keep increasing order). Program 0 stores OFFS [N+1]; with
    HAS_TILES the programs also write the M-tile table TILES (`_tile_table_share`). HAS_FILL: the programs also
    initialise the output (those past NB only that): every program a share before its scatter work, or with
    FILL_APART only the programs past NB, which then run beside the scatter's (`FILL_PLACES`)."""
    b = tl.program_id(0)
    if HAS_FILL:
        if not FILL_APART:
            _fill_share(FILL, FILL_ROW, fill_numel, fill_width, fill_chunk, b, HAS_FILL_ROW, FILL_BLOCK)
        elif b >= NB:
            _fill_share(FILL, FILL_ROW, fill_numel, fill_width, fill_chunk, b - NB, HAS_FILL_ROW, FILL_BLOCK)
    if b >= NB:
        return
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
    if HAS_TILES:
        _tile_table_share(TILES, n_tiles, start, total, cols, b, NB, M, N, TBM, TCH)
    base = start + before
    for s in range(STEPS):
        p, pm, e, onehot = _block_onehot(IDX, b * STEPS + s, M, SUB, NP2, PAIR_AXIS)
        rank = tl.sum(onehot * tl.cumsum(onehot, PAIR_AXIS), 1 - PAIR_AXIS) - 1
        row = tl.sum(onehot * tl.expand_dims(base, PAIR_AXIS), 1 - PAIR_AXIS) + rank
        tl.store(ORDER + row, p, mask=pm)
        tl.store(TOK + row, p // K, mask=pm)
        tl.store(SEXP + row, e, mask=pm)
        base += tl.sum(onehot, PAIR_AXIS)


def fill_place(np2: int) -> str:
    """Which kernel initialises the output, one of FILL_PLACES: "apart" up to EXPERT_ROWS_MAX experts, programs of
    the scatter launch's own beside its scatter programs (base inference forward, H100, four rounds: 0.1779–0.1813
    against 0.1823–0.1871 ms with the fill in each scatter program, v25; that had been −3.7 µs against the count
    kernel, v24); "count" beyond (8B: the 134 MB fill took 16 µs longer in the scatter kernel, whose 212-register
    programs keep fill-only ones queued); SSD_PLAN_FILL names one (docs/kernels.md v24, v25)."""
    forced = os.environ.get("SSD_PLAN_FILL")
    if forced and forced not in FILL_PLACES:
        from ....errors import UserError
        raise UserError(f"SSD_PLAN_FILL={forced!r}: accepted: {', '.join(FILL_PLACES)}")
    return forced or ("apart" if np2 <= EXPERT_ROWS_MAX else "count")


def plan_tiles_default(t: torch.Tensor) -> bool:
    """Whether routing plans of `t`'s device write the Gluon kernels' tile table: where those kernels can run
    (Hopper, Triton >= 3.9), unless SSD_PLAN_TILES=0 leaves it to a launch of its own. With the fill in the scatter
    kernel, 1.8 µs more off the base inference forward (mean of three rounds, H100, docs/kernels.md v24)."""
    from .descriptors import hopper
    from .down_gluon import new_enough_triton

    return os.environ.get("SSD_PLAN_TILES", "1") != "0" and new_enough_triton() and hopper(t)


def routing_plan(flat_idx: torch.Tensor, num_experts: int, top_k: int, fill=None, max_blocks: int = MAX_BLOCKS,
                 tile_table=None, fill_in=None):
    """(order, token, sorted expert, offsets), all int32, and the expert-order M-tile table at TILE_BM rows
    (`tile_order.expert_tiles`'s) where `tile_table` (default `plan_tiles_default`), else None (also
    without pairs): the stable sort of the flat pairs by expert as two small kernels (counts per block; starts
    and scatter) instead of a radix sort + searchsorted. The table, the Gluon kernels' work list, then comes out
    of the second kernel rather than a launch of its own.
    fill = (out, row or None): the plan's kernels also set the contiguous [T, W] `out` to `row` broadcast over its
    rows, or to zeros, where `fill_in` (one of FILL_PLACES; default `fill_place`) says. max_blocks: at most this
    many blocks (tests make it small, so that a block spans several sub-blocks)."""
    M, N = flat_idx.numel(), num_experts
    dev = flat_idx.device
    np2 = max(16, triton.next_power_of_2(N))
    sub = max(64, 8192 // max(np2, 64))  # pairs per one-hot tile: 128 up to 64 experts (base: 128 beat 256, v24)
    nsub = triton.cdiv(M, sub)
    steps = max(1, triton.cdiv(nsub, max_blocks))
    nb = triton.cdiv(nsub, steps)  # every block holds pairs
    counts = torch.empty(max(nb, 1), np2, device=dev, dtype=torch.int32)
    offsets = torch.empty(N + 1, device=dev, dtype=torch.int32)
    order, token, sexp = (torch.empty(M, device=dev, dtype=torch.int32) for _ in range(3))
    tiles = None
    if M:
        place = None if fill is None else fill_place(np2) if fill_in is None else fill_in
        axis = 1 if np2 <= EXPERT_ROWS_MAX else 0
        count_grid = max(nb, FILL_PROGRAMS) if place == "count" else nb
        fills, meta = fill_args(fill if place == "count" else None, count_grid, counts)
        _plan_count_kernel[(count_grid,)](flat_idx, counts, M, nb, steps, *fills, SUB=sub, NP2=np2, PAIR_AXIS=axis,
                                          num_warps=4, **meta)
        ch = min(triton.next_power_of_2(nb), max(1, 4096 // np2))
        if (plan_tiles_default(flat_idx) if tile_table is None else tile_table):
            tiles = torch.empty(triton.cdiv(M, TILE_BM) + N, 2, device=dev, dtype=torch.int32)
        n_tiles = 0 if tiles is None else tiles.shape[0]
        grid = {"scatter": max(nb, FILL_PROGRAMS), "apart": nb + APART_PROGRAMS}.get(place, nb)
        fills, meta = fill_args(fill if place in ("scatter", "apart") else None,
                                APART_PROGRAMS if place == "apart" else grid, counts)
        _plan_scatter_kernel[(grid,)](flat_idx, counts, offsets, order, token, sexp, tiles, n_tiles, M, top_k, N, nb,
                                      steps, *fills, SUB=sub, NP2=np2, PAIR_AXIS=axis, CH=ch,
                                      HAS_TILES=tiles is not None, TBM=TILE_BM, TCH=TILE_CHUNK, num_warps=4,
                                      FILL_APART=place == "apart", **meta)
    else:
        offsets.zero_()
        if fill is not None:
            initialise(*fill)
    return order, token, sexp, offsets, tiles
