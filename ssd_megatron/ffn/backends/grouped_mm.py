"""`grouped_mm` expert backend: torch-native grouped GEMMs over expert-sorted token copies.

Routing (sort by expert, int32 cumulative group ends) is device-only, so there is no host sync on
CUDA bf16 sm90+, where `torch._grouped_mm` runs one CUTLASS grouped kernel. The gathered token copy
`xs [T*K, D]` and the scattered outputs are materialised (that is what the `triton` backend fuses
away); autograd provides the backward (grouped weight-gradient GEMMs included).

torch 2.11 needs no padding of groups for bf16 (torchtitan dropped it); it needs 16-byte-aligned row
strides, so D and E must be multiples of 8 (bf16) / 4 (fp32). Shapes that are not fall back to the
reference backend. On other dtypes/devices torch's own fallback loops over groups (CPU, fp32 on GPU:
correct but with a host sync), which the tests use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import apply_activation
from .reference import ReferenceBackend
from .routing import inverse_order, make_plan
from .weights import permute_gather

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available() -> bool:
    return _grouped_mm is not None


def grouped_mm_fast(device: torch.device) -> bool:
    """True where _grouped_mm has its sync-free grouped kernel (CUDA sm90+, bf16)."""
    return (_grouped_mm is not None and device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 9)


class _GatherTokens(torch.autograd.Function):
    """xs = x[token] (sorted rows). Backward sums each token's K row grads through the inverse order
    (a gather + sum over k: deterministic, no atomic index_add)."""

    @staticmethod
    def forward(ctx, x, token, inv, K):
        ctx.save_for_backward(inv)
        ctx.TK = (x.shape[0], K)
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        T, K = ctx.TK
        gt = g.index_select(0, inv)
        return (gt if K == 1 else gt.view(T, K, -1).sum(1)), None, None, None


def expert_bias_rows(b1: torch.Tensor, sorted_expert: torch.Tensor) -> torch.Tensor:
    """b1[expert of each sorted row] as a one-hot matmul: its backward is a GEMM accumulating in fp32
    (index_select's backward would be a bf16 atomic index_add: 3% error on db1 at 400 rows/expert)."""
    onehot = torch.nn.functional.one_hot(sorted_expert, b1.shape[0]).to(b1.dtype)
    return onehot @ b1


def _aligned(x: torch.Tensor, *dims: int) -> bool:
    step = 16 // x.element_size()
    return all(d % step == 0 for d in dims)


class GroupedMMBackend:
    name = "grouped_mm"

    def __init__(self):
        self._fallback = ReferenceBackend()

    def __call__(self, x, w1, b1, w2, topk_idx, gate, activation):
        T, D = x.shape
        N, F1, _ = w1.shape
        E = w2.shape[1]
        if (_grouped_mm is None or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)
                or not _aligned(x, D, F1, E)):
            return self._fallback(x, w1, b1, w2, topk_idx, gate, activation)
        K = topk_idx.shape[1]
        plan = make_plan(topk_idx, N)
        ends = plan.ends
        inv = inverse_order(plan)
        xs = _GatherTokens.apply(x, plan.token, inv, K)
        h = _grouped_mm(xs, w1.transpose(1, 2), offs=ends)
        if b1 is not None:
            h = h + expert_bias_rows(b1, plan.sorted_expert)
        ys = _grouped_mm(apply_activation(h, activation), w2, offs=ends)
        # Combine: back to (token, k) order by a permutation gather (deterministic), weight, sum over k.
        ys = permute_gather(ys, inv, 0).view(T, K, D)
        return (ys * gate.to(ys.dtype).unsqueeze(-1)).sum(1)
