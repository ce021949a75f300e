"""`megablocks` expert backend: MegaBlocks' kernels over *our* weights and *our* routing.

We bypass MegaBlocks' router and layers entirely and use it as a kernel library: `megablocks.ops`
sort / histogram / inclusive_cumsum / gather / scatter (Triton + CUB) and `grouped_gemm.ops.gmm`
(autograd; the default build loops cuBLAS over experts). Gates flow through `ops.scatter`, whose
backward returns the weight (gate) gradient, so the straight-through gate trains the router.

Limits (theirs): bf16 only, CUDA only, contiguous `[N, F, D]` weights, and one host sync per call:
the default grouped_gemm needs the per-expert counts on the CPU (`tokens_per_expert.cpu()`).
Install: the prebuilt wheels (see tools/gpu_bench.sh) or tools/build_megablocks.sh.
"""
from __future__ import annotations

import math

import torch

from ...errors import UserError
from ..activations import apply_activation
from .grouped_mm import expert_bias_rows

INSTALL_HINT = ("ssd.backend: megablocks needs the optional packages megablocks==0.10.0, grouped_gemm==0.3.0 and "
                "stanford-stk (CUDA only); pip install --no-deps --no-build-isolation megablocks==0.10.0 "
                "grouped_gemm==0.3.0 stanford-stk, or run tools/build_megablocks.sh")

_MODS = None


def _modules():
    global _MODS
    if _MODS is None:
        try:
            import grouped_gemm.ops as gg_ops
            import megablocks.ops as mops
        except Exception as exc:
            raise UserError(f"{INSTALL_HINT} (import failed: {type(exc).__name__}: {exc})") from exc
        _MODS = (mops, gg_ops)
    return _MODS


def megablocks_available() -> bool:
    try:
        _modules()
    except UserError:
        return False
    return True


class MegaBlocksBackend:
    name = "megablocks"

    def __init__(self):
        _modules()  # fail at selection time, with the install hint

    # Eager even inside a compiled block: the call syncs with the host anyway, and dynamo would otherwise
    # trace MegaBlocks' autograd Functions and kernel launches, the pattern that lost every gradient of
    # our own triton backend under torch.compile (docs/kernels.md v8).
    @torch.compiler.disable
    def __call__(self, x, w1, b1, w2, topk_idx, gate, activation):
        mops, gg_ops = _modules()
        if not x.is_cuda or x.dtype != torch.bfloat16:
            raise UserError("ssd.backend: megablocks runs only on CUDA in bf16 (grouped_gemm accepts bf16 only); "
                            "use backend 'triton' or 'grouped_mm'")
        T, D = x.shape
        N = w1.shape[0]
        K = topk_idx.shape[1]
        flat = topk_idx.reshape(-1).int()
        end_bit = max(int(math.ceil(math.log2(N))), 1)
        with torch.no_grad():
            bin_ids, indices = mops.sort(flat, end_bit)
            tokens_per_expert = mops.histogram(flat, N)
            bins = mops.inclusive_cumsum(tokens_per_expert, 0)
            if bins.dim() == 0:
                bins = bins.view(1)
            batch_sizes = tokens_per_expert.cpu().long()  # host sync: grouped_gemm's cuBLAS loop needs it
        xs = mops.gather(x.contiguous(), indices, bin_ids, bins, K)
        h = gg_ops.gmm(xs, w1.contiguous(), batch_sizes, True)
        if b1 is not None:
            h = h + expert_bias_rows(b1, bin_ids.long())
        ys = gg_ops.gmm(apply_activation(h, activation), w2.contiguous(), batch_sizes, False)
        return mops.scatter(ys, indices, bin_ids, gate.reshape(-1).to(ys.dtype), bins, K)
