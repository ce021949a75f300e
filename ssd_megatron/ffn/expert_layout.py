"""Expert-major storage: an FFN's neurons physically laid out in expert order while it is sparse.

In neuron order (the default, and always in dense phases) the sparse path must gather each expert's
W_i rows, b_i entries and W_o columns through the clustering permutation `expert_perm`, forward and
backward, every step: ~0.5 ms of a 31 ms sparse GPT-base step and 1.1 ms of the 8B layer's 10.6 ms
(docs/kernels.md §4, item 4). Re-laying the parameters out once per dense → sparse switch makes every
expert a contiguous slice, so the experts are free views (`expert_views`).

The move is a permutation of rows (W_i, b_i) and columns (W_o), applied with every tensor shaped like
the parameter and attached to it: its gradient and its optimizer state (AdamW's moments). So the
optimizer keeps each neuron's moments with the neuron, as DESIGN.md §3 requires of a physical reorder,
and the neuron-order layout comes back bit for bit when the phase ends (`to_neuron_order`): labels,
ARI and the monitor only ever see neuron ids. For GLU activations the expert-major rows interleave each
expert's gate and up rows ([g_0, u_0, g_1, u_1, …], `expert_rows`), which is what the backends read as
w1[n]; the dense path then splits the pre-activation per expert block (Activation.glu_block).

Under FSDP2 a dimension sharded across ranks is permuted on the full tensor (every rank gathers it,
permutes it and keeps its own shard): the same collective the clustering's `neuron_rows` already pays.
"""
from __future__ import annotations

import torch

from .backends.weights import inverse_permutation


@torch.no_grad()
def _permute_(t: torch.Tensor, dim: int, idx: torch.Tensor) -> None:
    """t[..., i, ...] <- t[..., idx[i], ...] along `dim`, in place (the storage, hence any captured CUDA
    graph or optimizer kernel table that points at it, stays valid)."""
    if hasattr(t, "full_tensor"):  # DTensor (FSDP2)
        from torch.distributed.tensor import Shard, distribute_tensor

        if any(isinstance(pl, Shard) and pl.dim == dim for pl in t.placements):
            full = t.full_tensor().index_select(dim, idx.to(t.device))
            t.to_local().copy_(distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local())
            return
        t = t.to_local()
    t.copy_(t.index_select(dim, idx.to(t.device)))


def _attached(p: torch.Tensor, optimizer) -> list:
    """p, its gradient and every optimizer-state tensor of p's shape (moments; not AdamW's scalar step)."""
    out = [p] + ([p.grad] if p.grad is not None else [])
    if optimizer is not None:
        out += [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]
    return out


def _move(ffn, rows: torch.Tensor, cols: torch.Tensor, optimizer) -> None:
    """W_i rows and b_i entries by `rows`, W_o columns by `cols`, with their gradients and moments."""
    moves = [(ffn.w_in.weight, 0, rows), (ffn.w_out.weight, 1, cols)]
    if ffn.w_in.bias is not None:
        moves.append((ffn.w_in.bias, 0, rows))
    for p, dim, idx in moves:
        for t in _attached(p, optimizer):
            _permute_(t, dim, idx)


def to_expert_major(ffn, optimizer=None) -> None:
    """Lay the FFN's neurons out in the expert order of its clustering (no-op if already so). Pass the
    optimizer that holds the FFN's parameters (None only where there is none, e.g. inference)."""
    if ffn.is_expert_major:
        return
    _move(ffn, *ffn.expert_major_order(), optimizer)
    ffn.mark_expert_major(True)


def to_neuron_order(ffn, optimizer=None) -> None:
    """Undo to_expert_major: every parameter, gradient and moment back in neuron-id order, bit for bit."""
    if not ffn.is_expert_major:
        return
    rows, cols = ffn.expert_major_order()
    inv_cols = inverse_permutation(cols)
    _move(ffn, inverse_permutation(rows) if ffn.glu else inv_cols, inv_cols, optimizer)
    ffn.mark_expert_major(False)
