"""Routing metadata shared by the fast backends: the (token, k) pairs sorted by expert, with no host sync.

The caller has already chosen `topk_idx [T, K]`. Flattened, pair p = t*K + k goes to expert
topk_idx[t, k]. A stable sort by expert gives `order` (sorted position r -> pair p), so the rows of
expert e are the contiguous range offsets[e]:offsets[e+1] of the sorted order, and within an expert
the tokens stay in increasing order (good for the gathers' locality and deterministic sums).

Everything here is a handful of device ops (sort, searchsorted, casts; on CUDA a counting sort in two
Triton kernels): no `.item()`, `.tolist()` or `bincount` (which syncs to size its output), so a training
step never waits on the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .weights import inverse_permutation


@dataclass
class RoutingPlan:
    num_experts: int
    top_k: int
    num_tokens: int
    order: torch.Tensor          # [M] int32: sorted row r -> flat pair index p = t*K + k
    token: torch.Tensor          # [M] int32: sorted row r -> token t
    sorted_expert32: torch.Tensor  # [M] int32: expert of sorted row r (non-decreasing)
    offsets: torch.Tensor        # [N+1] int32: expert e owns sorted rows offsets[e]:offsets[e+1]
    # M-tile tables by (tile height, order): the Gluon kernels' work lists (`tile_order.tile_list`), built on
    # first use, except the expert-order one at their height where the counting sort writes it (`plan_tiles_default`)
    tiles: dict = field(default_factory=dict)

    @property
    def sorted_expert(self) -> torch.Tensor:
        return self.sorted_expert32.long()

    @property
    def num_rows(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def ends(self) -> torch.Tensor:
        """[N] int32 cumulative group ends: the `offs` argument of torch._grouped_mm."""
        return self.offsets[1:]


def make_plan(topk_idx: torch.Tensor, num_experts: int, fill=None) -> RoutingPlan:
    """The plan of `topk_idx`; fill = (out, row or None): also set `out` [T', W] to `row` broadcast over its
    rows (or zeros), inside the counting sort's kernels where they run (the fused expert MLP's y)."""
    T, K = topk_idx.shape
    flat = topk_idx.reshape(-1)
    from .triton_backend import triton_runs_on  # (triton_backend imports this module)

    if triton_runs_on(flat):  # a counting sort in two small Triton kernels (the same result)
        from .kernels.routing_plan import TILE_BM, routing_plan

        order, token, sorted_expert, offsets, table = routing_plan(flat.contiguous(), num_experts, K, fill)
        tiles = {} if table is None else {(TILE_BM, None): table}
    else:
        order, token, sorted_expert, offsets = sort_plan(flat, num_experts, K)
        tiles = {}
        if fill is not None:
            initialise(*fill)
    return RoutingPlan(num_experts=num_experts, top_k=K, num_tokens=T, order=order, token=token,
                       sorted_expert32=sorted_expert, offsets=offsets, tiles=tiles)


def initialise(out: torch.Tensor, row=None) -> None:
    """out [T, W] := row broadcast over its rows, or zeros (what the kernels' fills do, as torch ops)."""
    out.zero_() if row is None else out.copy_(row.expand(out.shape))


def sort_plan(flat: torch.Tensor, num_experts: int, top_k: int):
    """(order, token, sorted expert, offsets), all int32, in torch ops: a stable sort + searchsorted."""
    with torch.no_grad():
        # int32 keys: the radix sort does half the passes of int64 keys.
        sorted_expert, order = torch.sort(flat.to(torch.int32), stable=True)
        bounds = torch.arange(num_experts + 1, device=flat.device, dtype=torch.int32)
        offsets = torch.searchsorted(sorted_expert, bounds).to(torch.int32)
        order32 = order.to(torch.int32)
        token = torch.div(order32, top_k, rounding_mode="floor")
    return order32, token, sorted_expert, offsets


def inverse_order(plan: RoutingPlan) -> torch.Tensor:
    """[M] int64: flat pair p -> its sorted row (the inverse permutation of `order`)."""
    return inverse_permutation(plan.order.long())
