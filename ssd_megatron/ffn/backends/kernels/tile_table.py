"""The M-tile tables, one small launch each: (expert, first row) of every BM-row tile of the expert-sorted rows,
in expert order (the work list that the persistent Gluon kernels walk: `mlp_gluon`, `down_gluon`) or in token-window
order (`token_window_table`: the schedule of the launches that take their tiles that way, at 8B the fused forward and
dx).

One program per table entry finds its tile as every expert kernel's program finds its own (`common._tile_of`).
The table has the host-side upper bound of cdiv(M, BM) + N entries; those past the real tiles get first row M
(empty). It replaced about twenty torch ops (a cumsum, a searchsorted, index and stack ops: ≈ 2 µs each under
CUDA graphs), which had cost the Gluon fused forward ≈ 45 µs of its 0.236 ms at base (H100, docs/kernels.md
v20). Since v24 the routing plan's scatter kernel writes the forward's table itself where the Gluon kernels run
(`routing_plan.plan_tiles_default`, TILE_BM); this launch serves every other case."""
import torch
import triton
import triton.language as tl

from .common import _tile_of


@triton.jit
def _expert_tiles_kernel(OFFS, TILES, M, N, BM: tl.constexpr, NP2: tl.constexpr):
    j = tl.program_id(0)
    e, row0, row_end = _tile_of(OFFS, j, N, BM, NP2)
    tl.store(TILES + 2 * j, tl.minimum(e, N - 1))  # past the real tiles e counts every expert
    tl.store(TILES + 2 * j + 1, tl.where(row0 < row_end, row0, M))


def expert_tile_table(offsets: torch.Tensor, M: int, N: int, BM: int) -> torch.Tensor:
    """[cdiv(M, BM) + N, 2] int32 (expert, first row) of every M-tile in expert order; the tail past the real
    tiles holds empty ones (expert N - 1, first row M). No host sync."""
    return _table(_expert_tiles_kernel, offsets, M, N, BM)


@triton.jit
def _token_window_tiles_kernel(OFFS, TILES, M, N, GROUP, BM: tl.constexpr, NP2: tl.constexpr):
    """Entry j of the expert-order table goes to its rank in token-window order: the tiles of the experts of earlier
    groups, then those of its group whose relative position (i' + 1/2) / nt' is smaller, or equal in an earlier
    expert (the stable sort's ties). Positions are compared exactly, as integers: (2i' + 1) nt < (2i + 1) nt'."""
    j = tl.program_id(0)
    ids = tl.arange(0, NP2)
    start = tl.load(OFFS + ids, mask=ids < N, other=0)
    nts = ((tl.load(OFFS + ids + 1, mask=ids < N, other=0) - start + BM - 1) // BM).to(tl.int64)
    cum = tl.cumsum(nts, 0)
    e = tl.sum((cum <= j).to(tl.int32), 0)    # (as `common._tile_of`; N past the real tiles)
    real = j < tl.sum(nts, 0)
    i = j - tl.sum(tl.where(ids == e, cum - nts, 0), 0)
    nt = tl.maximum(tl.sum(tl.where(ids == e, nts, 0), 0), 1)
    g0 = (e // GROUP) * GROUP
    q = (2 * i + 1) * nts                     # tile (e', i') is before iff (2i' + 1) nt < q (<= where e' < e)
    m = tl.where(ids < e, q, q - 1) // nt     # so 2i' + 1 <= m
    before = tl.where(ids == e, i, tl.minimum(tl.maximum((m + 1) // 2, 0), nts))
    rank = tl.sum(tl.where(ids < g0, nts, 0), 0) + tl.sum(tl.where((ids >= g0) & (ids < g0 + GROUP), before, 0), 0)
    rank = tl.where(real, rank, j)  # the empty tail keeps its place after every real tile
    tl.store(TILES + 2 * rank, tl.minimum(e, N - 1))
    tl.store(TILES + 2 * rank + 1, tl.where(real, tl.sum(tl.where(ids == e, start, 0), 0) + i * BM, M))


def _table(kernel, offsets: torch.Tensor, M: int, N: int, BM: int, *args) -> torch.Tensor:
    """A [cdiv(M, BM) + N, 2] int32 table written by `kernel`, one single-warp program per entry."""
    n = triton.cdiv(M, BM) + N
    tiles = torch.empty(n, 2, dtype=torch.int32, device=offsets.device)
    kernel[(n,)](offsets, tiles, M, N, *args, BM=BM, NP2=max(16, triton.next_power_of_2(N)), num_warps=1)
    return tiles


def token_window_table(offsets: torch.Tensor, M: int, N: int, BM: int, group: int) -> torch.Tensor:
    """`expert_tile_table`'s tiles in token-window order within groups of `group` experts (0: one group of all):
    `tile_order.token_window_tiles`' table, in one launch instead of about twenty torch ops and a sort (at 8B a
    2112-entry sort of 48 us, and each of the ops ≈ 3 us). No host sync."""
    return _table(_token_window_tiles_kernel, offsets, M, N, BM, group or N)
