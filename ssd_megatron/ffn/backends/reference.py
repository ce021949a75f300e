"""Reference expert backend: readable torch, CPU and GPU, the ground truth the fast backends match.

Tokens are sorted by expert once, each expert runs a dense matmul over its contiguous slice, and the
weighted outputs are scattered back with index_add. A Python loop over experts is fine here: this
backend is for correctness and CPU runs, not for speed (see the grouped_mm / triton backends).
"""
import torch

from ..activations import apply_activation


class ReferenceBackend:
    name = "reference"

    def __call__(self, x, w1, b1, w2, topk_idx, gate, activation):
        T, D = x.shape
        K = topk_idx.shape[1]
        flat_expert = topk_idx.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // K
        counts = torch.bincount(flat_expert, minlength=w1.shape[0]).tolist()
        xs = x.index_select(0, token_of)
        gs = gate.reshape(-1).index_select(0, order)
        outs = []
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            h = xs[start:start + c] @ w1[e].t()
            if b1 is not None:
                h = h + b1[e]
            outs.append(apply_activation(h, activation) @ w2[e])
            start += c
        if not outs:
            return x.new_zeros(T, D) + 0 * gate.sum()
        y_sorted = torch.cat(outs) * gs.unsqueeze(1)
        return x.new_zeros(T, D).index_add(0, token_of, y_sorted)
