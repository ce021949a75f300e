"""The order in which a launch takes its M-tiles (expert order, or token windows within groups of experts) and the
tile tables that spell that order out for the kernels (`kernels/tile_table.py` where Triton runs, else torch ops)."""
from __future__ import annotations

import os

import torch
import triton

from . import descriptors
from .tile_table import expert_tile_table, token_window_table


# M-tile order. Expert order (tile i of expert e after all tiles of experts < e) makes the programs that
# run at the same time cover every token: fine while the token-indexed operand (the gathered x or dy, the
# atomically combined y or dx) fits in L2, but at the 8B shape it is 134 MB, so each of a token's K rows
# is gathered, or atomically added, through DRAM again. Token-window order sorts the tiles by their
# relative position in their expert's token-sorted rows, so that the tiles resident at once cover one
# window of tokens of every expert, whose rows stay in L2 across the K visits; but then every expert's W
# is in flight at once and the weights miss L2 (Nsight Compute, docs/kernels.md v14: the 8B dx launch
# moves ~4 GB through DRAM in expert order, L2 hit rate 79% -> 41% in token order). Token order over all
# experts lost everywhere (v12, v14: +1.24 ms in the H100 8B layer). Grouped windows (`token:G`) take
# the experts in groups of G, one group after the other, with token windows within each group: fewer
# weights in flight, fewer DRAM round trips per dx row. Timed at 8B (H100, v15), G = 16 won in the layer
# for the fused forward without a gate only: inference forward 2.88 -> 2.55 ms (two A/B runs), training
# fwd+bwd even (9.59 -> 9.56 / 9.54 with the backward launches grouped too). Alone, down for dx, up_bwd
# and the fused forward each looked 2-8% faster grouped, but in the layer the backward's gains did not show
# (SwiGLU fwd+bwd 13.09 -> 13.11 / 13.58), and the unfused GLU forward lost (3.95 -> 4.17 ms). The WS dx
# (kernels/down_gluon.py, since v16) was never in that A/B; at 8B its adds alone cost what it does (v37:
# 1.51 of 1.55 ms on the H200), and in windows of 16 experts it took 1.885 -> 1.452 ms alone and the H100
# 8B ReLU layer 8.13 -> 8.01 ms (eight rounds over three calls, each won), while up_bwd grouped too lost
# again (8.12). So `auto` is grouped windows for the fused forward and the WS down on Hopper where the
# token rows are >= 2048 wide (`wide_group`), expert order for every other launch;
# SSD_TRITON_TILE_ORDER=expert|token|token:G forces one order, SSD_TRITON_WS_DOWN_ORDER the WS down's alone.
AUTO_GROUP = 16


def tile_groups(auto=None, var="SSD_TRITON_TILE_ORDER"):
    """How a launch takes its M-tiles (SSD_TRITON_TILE_ORDER, or `var`): None for expert order, else the size
    of the expert groups of token-window order (0: one group of all experts, `token`); `auto` is the launch's
    own choice, taken when the variable is unset or `auto` (`wide_group`)."""
    from ....errors import UserError

    mode = os.environ.get(var, "auto")
    if mode == "auto":
        return auto
    if mode == "expert":
        return None
    if mode == "token":
        return 0
    name, _, group = mode.partition(":")
    if name != "token" or not group.isdigit() or int(group) < 1:
        raise UserError(f"{var}: {mode!r}; accepted: auto, expert, token, or token:G with G >= 1 "
                        f"experts per group")
    return int(group)


def ws_down_group(auto=None):
    """The WS down kernel's M-tile order: SSD_TRITON_WS_DOWN_ORDER (this launch alone), else
    SSD_TRITON_TILE_ORDER, else `auto` (the launcher passes `wide_group`'s: token windows of 16 experts
    where its output rows are >= 2048 wide on Hopper, the 8B dx; comment above)."""
    return tile_groups(tile_groups(auto), "SSD_TRITON_WS_DOWN_ORDER")


def wide_group(width: int, t: torch.Tensor):
    """`auto`'s M-tile order for the launch that won with grouped token windows (the fused forward without a
    gate; comment above): AUTO_GROUP on Hopper when the token-indexed rows are `width` >= 2048 wide (x and y
    do not fit L2), else None (expert order)."""
    return AUTO_GROUP if width >= 2048 and descriptors.hopper(t) else None


def _tile_index(offsets: torch.Tensor, M: int, N: int, BM: int):
    """(expert, index within the expert, the expert's tile count, whether real) of the M-tiles j = 0 ..
    cdiv(M, BM) + N - 1 in expert order (an upper bound: the tail is not real). Device ops, no host sync."""
    counts = (offsets[1:] - offsets[:-1]).long()
    nt = (counts + BM - 1) // BM
    cum = nt.cumsum(0)
    j = torch.arange(triton.cdiv(M, BM) + N, device=offsets.device)
    e = torch.searchsorted(cum, j, right=True).clamp_max(N - 1)
    return e, j - (cum[e] - nt[e]), nt[e], j < cum[-1]


def _tile_table(offsets: torch.Tensor, M: int, BM: int, e, i, valid) -> torch.Tensor:
    """[n, 2] int32 (expert, first row) of the tiles (e, i); first row M where not `valid` (empty)."""
    row0 = torch.where(valid, offsets.long()[e] + i * BM, M)
    return torch.stack([e, row0], 1).to(torch.int32).contiguous()


def _table_launches(offsets: torch.Tensor) -> bool:
    """Whether the tile tables come from kernels/tile_table.py's launches (Triton runs: CUDA, or the interpreter)."""
    return offsets.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def expert_tiles(offsets: torch.Tensor, M: int, N: int, BM: int) -> torch.Tensor:
    """[cdiv(M, BM) + N, 2] int32 (expert, first row) of every M-tile in expert order; the unused tail of
    this upper bound holds empty tiles (first row M). The work list of the Gluon kernels (WS): one launch,
    `kernels/tile_table.py`, where Triton runs (else torch ops, as `token_window_tiles`)."""
    if _table_launches(offsets):
        return expert_tile_table(offsets, M, N, BM)
    e, i, _, valid = _tile_index(offsets, M, N, BM)
    return _tile_table(offsets, M, BM, e, i, valid)


def token_window_tiles(offsets: torch.Tensor, M: int, N: int, BM: int, group: int = 0) -> torch.Tensor:
    """`expert_tiles` ordered by the tile's relative position (i + 1/2) / tiles_e within its expert (ties:
    expert order), within groups of `group` consecutive experts taken one after the other (0: all experts
    in one group); empty tiles last. One launch where Triton runs (`kernels/tile_table.py`), else torch ops and a
    sort; no host sync."""
    if _table_launches(offsets):
        return token_window_table(offsets, M, N, BM, group)
    return token_window_tiles_torch(offsets, M, N, BM, group)


def token_window_tiles_torch(offsets: torch.Tensor, M: int, N: int, BM: int, group: int = 0) -> torch.Tensor:
    """`token_window_tiles` by torch ops: the relative positions as doubles, sorted stably (exact enough: with tile
    counts below 2^20, two distinct positions differ by at least 1 / (nt * nt') >= 2^-40, far above a double's
    rounding)."""
    e, i, nt, valid = _tile_index(offsets, M, N, BM)
    pos = (i.double() + 0.5) / nt.clamp_min(1).double()   # in (0, 1): the group index is the major key
    key = torch.where(valid, pos + (e // group if group else 0), float("inf"))
    order = torch.argsort(key, stable=True)
    return _tile_table(offsets, M, BM, e[order], i[order], valid[order])


def tile_list(plan, BM: int, group):
    """The plan's M-tile table at tile height BM, built once per plan, height and order (unless the plan's
    counting sort wrote it: `plan.tiles`): expert order (group None, `expert_tiles`) or token windows within
    groups of `group` experts (`token_window_tiles`)."""
    cache = plan.tiles
    if (BM, group) not in cache:
        M, N = plan.num_rows, plan.num_experts
        cache[BM, group] = (expert_tiles(plan.offsets, M, N, BM) if group is None
                            else token_window_tiles(plan.offsets, M, N, BM, group))
    return cache[BM, group]


def schedule(plan, BM: int, auto=None):
    """(TILES, SCHED) of a launch: the token-window schedule, built once per plan, tile height and expert
    grouping, or expert order (TILES unused); `auto`: the launch's own order (`tile_groups`)."""
    group = tile_groups(auto)
    if group is None:
        return plan.offsets, False
    return tile_list(plan, BM, group), True
