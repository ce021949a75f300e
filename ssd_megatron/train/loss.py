"""Language-model loss as (sum, count), so averaging can happen over the whole global batch.

Every objective (causal LM, masked LM, span corruption) is a token-level cross-entropy over the labels
that are not `IGNORE_INDEX`. Returning the *sum* and the number of valid tokens lets the loop divide
by the valid-token count of the entire global batch (all micro-batches, all ranks): a micro-batch with
more real targets then weighs more, exactly as in a single big batch, and the result does not depend
on how the batch was split across ranks or accumulation steps.

Two ways to the same number:
- `lm_loss(logits, labels)`: from materialised logits (any model, evaluation, tests).
- `fused_lm_loss(hidden, weight, labels)`: LM head + cross-entropy in row chunks, for training. The
  full [tokens, vocab] logits never exist at once, and never in fp32: at GPT-base shape (16k tokens x
  50k vocab) `lm_loss` under bf16 autocast moves ~35 GB through memory (bf16 logits, their fp32 copy,
  log-softmax, its gradient, the cast back), ~10 ms of an H100 step. Here each chunk's logits are
  computed in the compute dtype, one kernel turns them *in place* into d(loss)/d(logits) (softmax
  minus one-hot, fp32 arithmetic) and returns the per-row losses, and the two gradient GEMMs run
  right away, in the forward. The backward only scales the stored gradients by the incoming scalar
  (the loop's 1/global_tokens), so nothing of size [tokens, vocab] is kept for it (Liger-Kernel's
  fused linear cross-entropy does the same).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Rows per chunk are chosen so that one chunk's logits hold about this many elements (2^28: 512 MiB in
# bf16): 4 chunks at GPT-base shape, each GEMM still large enough to run at full rate.
CHUNK_ELEMENTS = 1 << 28


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies in fp32, number of valid tokens as an int64 tensor)."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    n_valid = (flat_labels != IGNORE_INDEX).sum()
    return loss_sum, n_valid


def count_valid(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def masked_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) argmax predictions over valid labels (MLM accuracy)."""
    valid = labels != IGNORE_INDEX
    pred = logits.argmax(dim=-1)
    return int(((pred == labels) & valid).sum()), int(valid.sum())


# --------------------------------------------------------------------------- fused LM head + loss


# Opaque to torch.compile: a compiled caller (whole-model compile) graph-breaks here and runs the chunk
# loop as written; tracing it would only re-derive the same GEMMs around an opaque Triton kernel.
@torch.compiler.disable
def fused_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`lm_loss(hidden @ weight.T, labels)` without materialising the logits.

    hidden: [..., D] (the LM head's input), weight: [V, D] (the head's weight, bias-free), labels: [...]
    with IGNORE_INDEX for no target. Under autocast the head GEMMs run in the autocast dtype, as
    `nn.Linear` would; the softmax arithmetic is fp32 (or the input's dtype when wider, e.g. fp64).
    Returns (loss sum, int64 valid count), as `lm_loss`; the sum is fp32 (fp64 for fp64 inputs, where
    `lm_loss` would round to fp32). Gradients reach `hidden` and `weight`.
    """
    D = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"fused_lm_loss: weight {tuple(weight.shape)} does not fit hidden size {D}")
    x = hidden.reshape(-1, D)
    y = labels.reshape(-1)
    if y.numel() != x.shape[0]:
        raise ValueError(f"fused_lm_loss: {x.shape[0]} hidden rows but {y.numel()} labels")
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        compute = torch.get_autocast_dtype(dev)
    else:
        compute = torch.promote_types(x.dtype, weight.dtype)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(x.shape[0], weight.shape[0])
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss_sum = _FusedLinearCrossEntropy.apply(x, weight, y, compute, int(chunk_rows), need_grad)
    n_valid = (y != IGNORE_INDEX).sum()
    return loss_sum, n_valid


def default_chunk_rows(n_rows: int, vocab: int) -> int:
    n_chunks = max(1, math.ceil(n_rows * vocab / CHUNK_ELEMENTS))
    rows = math.ceil(n_rows / n_chunks)
    return max(1, min(n_rows, -(-rows // 64) * 64))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, compute_dtype, chunk_rows, need_grad):
        gx_wanted = need_grad and ctx.needs_input_grad[0]
        gw_wanted = need_grad and ctx.needs_input_grad[1]
        acc = torch.promote_types(compute_dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(compute_dtype)
            n = x.shape[0]
            loss = torch.zeros((), dtype=acc, device=x.device)
            gx = torch.empty_like(x) if gx_wanted else None
            gw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, acc), device=weight.device) \
                if gw_wanted else None
            for s in range(0, n, chunk_rows):
                xc = x[s:s + chunk_rows].to(compute_dtype)
                logits = xc @ w.t()
                loss = loss + cross_entropy_rows_(logits, labels[s:s + chunk_rows], write_grad=need_grad).sum()
                if gx is not None:
                    gx[s:s + chunk_rows] = logits @ w
                if gw is not None:
                    gw = _accumulate_mm(gw, logits.t(), xc)
                del logits
        # Plain attributes, not save_for_backward: these are results, not inputs (no version checks needed).
        ctx.gx, ctx.gw = gx, gw
        ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        # Out of place (0.1 ms at GPT-base), so a retained graph can be backpropagated again (gradcheck).
        gx = None if ctx.gx is None else ctx.gx * grad.to(ctx.gx.dtype)
        gw = None if ctx.gw is None else (ctx.gw * grad.to(ctx.gw.dtype)).to(ctx.w_dtype)
        return gx, gw, None, None, None, None


_MM_OUT_DTYPE = {"ok": None}


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b with `acc` wider than a/b (fp32 accumulator, bf16 operands): one cuBLAS call
    accumulating into fp32 where torch supports `out_dtype` (CUDA), else the product in the operands'
    dtype, then added. In place: out-of-place addmm first copies the 154 MB accumulator (GPT-base),
    0.1 ms per chunk on an H100 (profiled)."""
    if acc.dtype == a.dtype:
        return acc.addmm_(a, b)
    if a.is_cuda and _MM_OUT_DTYPE["ok"] is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _MM_OUT_DTYPE["ok"] = True
            return acc
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE["ok"] = False
    return acc.add_(a @ b)


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, write_grad: bool = True) -> torch.Tensor:
    """Per-row cross-entropy (0 where the label is IGNORE_INDEX) of a [C, V] block of logits; with
    `write_grad` the block is overwritten by d(sum of losses)/d(logits) = softmax - one-hot (0 on
    ignored rows), in its own dtype. The arithmetic is fp32 (or wider, if the logits are)."""
    if logits.is_cuda and _triton_ok():
        return _ce_rows_triton_(logits, labels, write_grad)
    return _ce_rows_torch_(logits, labels, write_grad)


def _ce_rows_torch_(logits: torch.Tensor, labels: torch.Tensor, write_grad: bool) -> torch.Tensor:
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0).unsqueeze(1)
    lse = torch.logsumexp(z, dim=-1)
    loss = torch.where(valid, lse - z.gather(1, safe).squeeze(1), 0.0)
    if write_grad:
        p = torch.exp(z - lse.unsqueeze(1))
        p.scatter_add_(1, safe, -valid.unsqueeze(1).to(p.dtype))
        p.mul_(valid.unsqueeze(1))
        logits.copy_(p)
    return loss


# --------------------------------------------------------------------------- Triton kernel (CUDA)

_TRITON = {"ok": None, "kernel": None}


def _triton_ok() -> bool:
    if _TRITON["ok"] is None:
        try:
            _TRITON["kernel"] = _build_kernel()
            _TRITON["ok"] = True
        except Exception:  # no triton: the torch path computes the same thing
            _TRITON["ok"] = False
    return bool(_TRITON["ok"])


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ce_rows_kernel(logits_ptr, stride, labels_ptr, loss_ptr, V, ignore_index,
                       WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        # One program per row: pass 1 = online max / sum-exp over the row, pass 2 = gradient in place.
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        m = float("-inf")
        s = 0.0
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            z = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(ptr + tl.where(valid, label, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
        if WRITE_GRAD:
            for off in range(0, V, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                z = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                g = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
                g = tl.where(valid, g, 0.0)
                tl.store(ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)

    return ce_rows_kernel


def _ce_rows_triton_(logits: torch.Tensor, labels: torch.Tensor, write_grad: bool) -> torch.Tensor:
    import triton

    if logits.dtype == torch.float64 or logits.stride(1) != 1:
        return _ce_rows_torch_(logits, labels, write_grad)
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C == 0:
        return loss
    # 16384 columns / 16 warps per pass: 392 us vs 446 us (32768 / 32) for a 4096 x 50304 bf16 chunk on
    # an H100 (docs/performance.md).
    block = min(16384, triton.next_power_of_2(V))
    warps = 16 if block >= 16384 else (8 if block >= 2048 else 4)
    try:
        _TRITON["kernel"][(C,)](logits, logits.stride(0), labels.contiguous(), loss, V, IGNORE_INDEX,
                                 WRITE_GRAD=write_grad, BLOCK=block, num_warps=warps)
    except Exception as e:  # compilation failed (toolchain, driver): same result through torch, slower
        import warnings

        warnings.warn(f"fused_lm_loss: Triton kernel unavailable ({type(e).__name__}: {e}); using torch ops")
        _TRITON["ok"] = False
        return _ce_rows_torch_(logits, labels, write_grad)
    return loss
