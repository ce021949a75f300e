"""The M-tile table in expert order, one small launch: (expert, first row) of every BM-row tile of the
expert-sorted rows, the work list that the persistent Gluon kernels walk (`mlp_gluon`, `down_gluon`).

Each program takes BLOCK table entries j and finds their expert as `common._tile_of` does for one tile (the
number of experts whose cumulative tile count is <= j), all BLOCK at once. The table has the host-side upper
bound of cdiv(M, BM) + N entries; those past the real tiles get first row M (empty). It replaced about twenty
torch ops (a cumsum, a searchsorted, index and stack ops: ≈ 2 µs each under CUDA graphs), which had cost the
Gluon fused forward ≈ 45 µs of its 0.236 ms at base (H100, docs/kernels.md v20)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _expert_tiles_kernel(OFFS, TILES, M, N, n, BM: tl.constexpr, NP2: tl.constexpr, BLOCK: tl.constexpr):
    ids = tl.arange(0, NP2)
    valid = ids < N
    start = tl.load(OFFS + ids, mask=valid, other=0)
    ntiles = (tl.load(OFFS + ids + 1, mask=valid, other=0) - start + BM - 1) // BM
    cum = tl.cumsum(ntiles, 0)
    cum = tl.where(valid, cum, 2147483647)  # lanes past N never count as "before j"
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.sum((cum[None, :] <= j[:, None]).to(tl.int32), 1)
    sel = ids[None, :] == e[:, None]
    row0 = tl.sum(tl.where(sel, start[None, :] + (j[:, None] - (cum - ntiles)[None, :]) * BM, 0), 1)
    live = e < N
    jm = j < n
    tl.store(TILES + 2 * j, tl.minimum(e, N - 1), mask=jm)
    tl.store(TILES + 2 * j + 1, tl.where(live, row0, M), mask=jm)


def expert_tile_table(offsets: torch.Tensor, M: int, N: int, BM: int) -> torch.Tensor:
    """[cdiv(M, BM) + N, 2] int32 (expert, first row) of every M-tile in expert order; the tail past the real
    tiles holds empty ones (expert N - 1, first row M). No host sync."""
    n = triton.cdiv(M, BM) + N
    tiles = torch.empty(n, 2, dtype=torch.int32, device=offsets.device)
    np2 = max(16, triton.next_power_of_2(N))
    block = max(16, min(256, 8192 // np2))
    _expert_tiles_kernel[(triton.cdiv(n, block),)](offsets, tiles, M, N, n, BM=BM, NP2=np2, BLOCK=block,
                                                    num_warps=4)
    return tiles
