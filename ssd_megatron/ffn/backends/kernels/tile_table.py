"""The M-tile table in expert order, one small launch: (expert, first row) of every BM-row tile of the
expert-sorted rows, the work list that the persistent Gluon kernels walk (`mlp_gluon`, `down_gluon`).

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
    n = triton.cdiv(M, BM) + N
    tiles = torch.empty(n, 2, dtype=torch.int32, device=offsets.device)
    _expert_tiles_kernel[(n,)](offsets, tiles, M, N, BM=BM, NP2=max(16, triton.next_power_of_2(N)), num_warps=1)
    return tiles
