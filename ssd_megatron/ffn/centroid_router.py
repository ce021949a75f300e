"""SSD's router (paper eq. 4): each token picks the K experts with the largest α_n = x · c_n.

`expert_centroids(w1, E, dtype)`: c_n, the mean of expert n's first E rows of W_i. `CentroidCache` keeps
them across inference forwards of unchanged weights.

`centroid_topk(x, centroids, k)` returns (top scores, expert ids), the scores in descending order
and in x's dtype, as `(x @ centroids.T).topk(k)` does. On CUDA one Triton kernel computes the scores
and selects the top K in registers: the [T, N] score matrix never reaches memory, and the two
kernels `torch.topk` launches (a radix select and a sort of its output; ~40 µs per GPT-base layer on
an H200, against ~6 µs to read x) are gone. Ties go to the lower expert id (torch.topk leaves them
unspecified). The backward is the one autograd would build for the torch expression: the K score
gradients scattered into a [T, N] matrix, then two small GEMMs.
"""
from __future__ import annotations

import torch

from .backends.triton_backend import triton_runs_on

_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def centroid_topk_kernel(X, stride_x, C, stride_c, S, I, T, D, N,
                                 K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, NP2: tl.constexpr,
                                 PREC: tl.constexpr):
            rows = tl.program_id(0) * BT + tl.arange(0, BT)
            rmask = rows < T
            rows64 = rows.to(tl.int64)
            cols = tl.arange(0, NP2)
            cmask = cols < N
            ds = tl.arange(0, BD)
            acc = tl.zeros((BT, NP2), dtype=tl.float32)
            for d0 in range(0, D, BD):
                dm = (d0 + ds) < D
                x = tl.load(X + rows64[:, None] * stride_x + (d0 + ds)[None, :], mask=rmask[:, None] & dm[None, :],
                            other=0.0)
                ct = tl.load(C + cols[None, :] * stride_c + (d0 + ds)[:, None], mask=dm[:, None] & cmask[None, :],
                             other=0.0)
                acc = tl.dot(x, ct, acc, input_precision=PREC)
            # round to x's dtype first, as the torch matmul's output is, then pick in fp32; NaN ranks
            # highest (as in torch.topk), and `free` keeps the K ids distinct even among -inf scores
            s = acc.to(X.dtype.element_ty).to(tl.float32)
            s = tl.where(s != s, float("inf"), s)
            free = cmask[None, :] & rmask[:, None]
            for j in tl.static_range(K):
                best = tl.max(tl.where(free, s, float("-inf")), 1)
                idx = tl.min(tl.where(free & (s == best[:, None]), cols[None, :], NP2), 1)
                tl.store(S + rows64 * K + j, best.to(S.dtype.element_ty), mask=rmask)
                tl.store(I + rows64 * K + j, idx.to(tl.int64), mask=rmask)
                free = free & (cols[None, :] != idx[:, None])

        _KERNEL = centroid_topk_kernel
    return _KERNEL


def expert_centroids(w1: torch.Tensor, E: int, dtype: torch.dtype) -> torch.Tensor:
    """c [N, D] in `dtype`: the mean of expert n's first E rows of w1 [N, F1, D] (its gate rows for GLU). Without a
    gradient to carry, by kernels/column_sums.py where it serves (base, H100: 6.2 against torch's 9.2 µs,
    docs/kernels.md v25), else torch's mean."""
    if not (w1.requires_grad and torch.is_grad_enabled()) and triton_runs_on(w1):
        from .backends.kernels import column_sums
        if column_sums.serves(w1):
            return column_sums.segment_means(w1, E, dtype)
    return w1[:, :E].mean(dim=1).to(dtype)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class CentroidCache:
    """Inference: the centroids, a function of the weights only, computed once per version of the weights
    instead of once per forward (a mean over all of W_i; ~13 µs per GPT-base layer on an H200, about 5% of
    its sparse forward). `get(key, compute)` returns the value stored under `key` or stores compute()'s;
    the caller's key names the weights' storage and version counter (bumped by every in-place update:
    optimizer steps, load_state_dict, the expert-layout moves) and the dtypes. Under autograd or
    torch.compile it always computes (training needs the graph through the mean). During CUDA-graph
    capture a stored value is used but a new one is not stored: it would live in the graph's pool."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, compute):
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return compute()
        if key == self.key:
            return self.value
        value = compute()
        if not _capturing():
            self.key, self.value = key, value
        return value


def default_tile(d: int, np2: int, itemsize: int) -> tuple:
    """(rows per program, D per step, warps, pipeline stages) for D = d, np2 = the expert count's power of two.

    64 rows (32 past 64 experts: the [rows, np2] scores stay in registers), 64 columns of D per step, 4 warps, 3
    stages; for wide 2-byte rows (d >= 2048, at most 64 experts) 128 columns per step over 8 warps: at the 8B shape
    62 us against 67.5 on an H100 in three runs, the same ids, and even at base (docs/kernels.md v47). Not for fp32:
    its three 64 x 128 stages of x and the centroids would take 196 kB of shared memory, more than an A100 has."""
    if np2 <= 64 and d >= 2048 and itemsize == 2:
        return 64, 128, 8, 3
    return (64 if np2 <= 64 else 32), 64, 4, 3


def _topk_launch(x: torch.Tensor, centroids: torch.Tensor, k: int, tile=None):
    """The kernel's launch; `tile` = (rows per program, D per step, warps, pipeline stages) overrides
    `default_tile`'s, for tools/bench_routing.py's candidates."""
    T, D = x.shape
    N = centroids.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    c = centroids.to(x.dtype)
    c = c if c.stride(-1) == 1 else c.contiguous()
    scores = torch.empty(T, k, device=x.device, dtype=x.dtype)
    idx = torch.empty(T, k, device=x.device, dtype=torch.int64)
    np2 = max(16, 1 << (N - 1).bit_length())
    bt, bd, warps, stages = tile or default_tile(D, np2, x.element_size())
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    _kernel()[((T + bt - 1) // bt,)](x, x.stride(0), c, c.stride(0), scores, idx, T, D, N,
                                     K=k, BT=bt, BD=bd, NP2=np2, PREC=prec, num_warps=warps,
                                     num_stages=stages)
    return scores, idx


@torch.library.custom_op("ssd_megatron::centroid_topk", mutates_args=())
def _centroid_topk_op(x: torch.Tensor, centroids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _topk_launch(x, centroids, k)


@_centroid_topk_op.register_fake
def _(x, centroids, k):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


def _setup(ctx, inputs, output):
    x, centroids, _ = inputs
    ctx.save_for_backward(x, centroids, output[1])
    ctx.set_materialize_grads(False)  # the expert ids take no gradient: none is zero-filled for them


def _backward(ctx, d_scores, _):
    if d_scores is None:
        return None, None, None
    x, centroids, idx = ctx.saved_tensors
    full = torch.zeros(x.shape[0], centroids.shape[0], device=x.device, dtype=x.dtype)
    full.scatter_(1, idx, d_scores.to(x.dtype))
    dx = full @ centroids.to(x.dtype) if ctx.needs_input_grad[0] else None
    dc = (full.t() @ x).to(centroids.dtype) if ctx.needs_input_grad[1] else None
    return dx, dc, None


_centroid_topk_op.register_autograd(_backward, setup_context=_setup)


def centroid_topk(x: torch.Tensor, centroids: torch.Tensor, k: int):
    """(top scores [T, k] in x's dtype, descending; expert ids [T, k] int64) of x @ centroids.T."""
    if not 1 <= k <= centroids.shape[0]:
        raise ValueError(f"top_k={k} must be in [1, {centroids.shape[0]}]")
    if x.dtype in (torch.bfloat16, torch.float16, torch.float32) and triton_runs_on(x):
        return _centroid_topk_op(x, centroids, k)
    return tuple((x @ centroids.t().to(x.dtype)).topk(k, dim=-1))
