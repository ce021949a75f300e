"""AdamW whose CUDA update is one Triton kernel launch per parameter group, near HBM bandwidth.

torch's fused AdamW (`_fused_adamw_`, a multi_tensor_apply kernel) updates GPT-base's 181 M parameters in
2.3 ms on an H100: it moves 28 bytes per parameter (fp32 param, moments read + written, grad read),
5.1 GB, i.e. 2.2 TB/s of the chip's 3.35 (tools/bench_adamw.py). This kernel moves the same bytes in
one launch over all tensors of a group: the host builds, once per set of tensors, a table of their
device addresses and a list of (tensor, offset) work blocks; each program updates one block.

Semantics are torch's AdamW with `grad_scale` / `found_inf` as the fused implementation takes them
(train/clipping.py passes the clip coefficient and the non-finite flag that way): g = grad / grad_scale;
nothing changes (parameters, moments, step counts) when found_inf is set;
    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g²
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
State and checkpoints are torch.optim.AdamW's (`exp_avg`, `exp_avg_sq`, a device `step` per parameter),
so a run can switch between this and torch's AdamW through a checkpoint. The update is CUDA-graph
capturable: each captured step copies its addresses from a pinned buffer of its own (`_Tables`).

`build_optimizer` uses it on CUDA when Triton is there (torch's fused AdamW otherwise; foreach on CPU).
On CPU the class itself runs only under TRITON_INTERPRET=1 (the tests compare it with torch's AdamW).
"""
from __future__ import annotations

import math

import torch

BLOCK = 4096


try:  # the kernels are defined only where Triton is installed (CPU-only installs may lack it)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:
    @triton.jit
    def _update(p_ptr, g_ptr, m_ptr, v_ptr, idx, mask, inv_scale, lr, wd, beta1, beta2, eps, bc1, sqrt_bc2,
                MASKED: tl.constexpr):
        if MASKED:
            g = tl.load(g_ptr + idx, mask=mask, other=0.0)
            p = tl.load(p_ptr + idx, mask=mask, other=0.0)
            m = tl.load(m_ptr + idx, mask=mask, other=0.0)
            v = tl.load(v_ptr + idx, mask=mask, other=0.0)
        else:
            g = tl.load(g_ptr + idx)
            p = tl.load(p_ptr + idx)
            m = tl.load(m_ptr + idx)
            v = tl.load(v_ptr + idx)
        g = g * inv_scale
        p = p * (1.0 - lr * wd)
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - (lr / bc1) * (m / (tl.sqrt(v) / sqrt_bc2 + eps))
        if MASKED:
            tl.store(p_ptr + idx, p, mask=mask)
            tl.store(m_ptr + idx, m, mask=mask)
            tl.store(v_ptr + idx, v, mask=mask)
        else:
            tl.store(p_ptr + idx, p)
            tl.store(m_ptr + idx, m)
            tl.store(v_ptr + idx, v)

    @triton.jit
    def adamw_blocks_kernel(P, G, M, V, NUMEL, BLK_T, BLK_OFF, lr_ptr, step_ptr, scale_ptr, inf_ptr,
                            wd, beta1, beta2, eps, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        if tl.load(inf_ptr) != 0:
            return
        t = tl.load(BLK_T + pid)
        start = tl.multiple_of(tl.load(BLK_OFF + pid), BLOCK)
        n = tl.load(NUMEL + t)
        idx = start + tl.arange(0, BLOCK)
        # Parameters, gradients and moments come from torch's allocator: 16-byte aligned at least, which
        # the compiler cannot see through a loaded address; without the hint every access is scalar.
        p_ptr = tl.multiple_of(tl.load(P + t).to(tl.pointer_type(tl.float32)), 16)
        g_ptr = tl.multiple_of(tl.load(G + t).to(tl.pointer_type(tl.float32)), 16)
        m_ptr = tl.multiple_of(tl.load(M + t).to(tl.pointer_type(tl.float32)), 16)
        v_ptr = tl.multiple_of(tl.load(V + t).to(tl.pointer_type(tl.float32)), 16)
        lr = tl.load(lr_ptr)
        step = tl.load(step_ptr)
        bc1 = 1.0 - tl.exp(step * tl.log(beta1))
        sqrt_bc2 = tl.sqrt(1.0 - tl.exp(step * tl.log(beta2)))
        inv_scale = 1.0 / tl.load(scale_ptr)
        if start + BLOCK <= n:  # whole block: unmasked, vectorised accesses
            _update(p_ptr, g_ptr, m_ptr, v_ptr, idx, idx < n, inv_scale, lr, wd, beta1, beta2, eps, bc1,
                    sqrt_bc2, False)
        else:
            _update(p_ptr, g_ptr, m_ptr, v_ptr, idx, idx < n, inv_scale, lr, wd, beta1, beta2, eps, bc1,
                    sqrt_bc2, True)



def _kernel():
    if triton is None:
        raise RuntimeError("Triton is not installed")
    return adamw_blocks_kernel


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        _kernel()
        return True
    except Exception:  # no Triton / no compiler: torch's AdamW
        return False


class _Tables:
    """Device tables of one group's tensor addresses and work blocks.

    Eager steps copy the addresses from one pinned buffer (refilled when a tensor moved) every step. A
    captured step copies from a pinned buffer of its own that never changes afterwards: several captured
    graphs (SSD's dense and sparse steps, each with its own gradient buffers) and eager steps can then
    share the device table, each writing it right before its kernel reads it."""

    def __init__(self):
        self.key = None
        self.host = None
        self.dev = None
        self.blocks = None
        self.numels = None
        self.copied = None
        self.captured: list[torch.Tensor] = []  # pinned buffers that captured copies read at every replay

    def _fill(self, host: torch.Tensor, tensors: list[list[torch.Tensor]]) -> None:
        for row, ts in enumerate(tensors):
            host[row] = torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)
        host[4] = torch.tensor(self.numels, dtype=torch.int64)

    def update(self, tensors: list[list[torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, ...]:
        cuda = device.type == "cuda"
        numels = [t.numel() for t in tensors[0]]
        if numels != self.numels:  # a new set of tensors (never while capturing: eager steps come first)
            self.numels = numels
            n = len(numels)
            self.host = torch.empty(5, n, dtype=torch.int64, pin_memory=cuda)
            self.dev = torch.empty(5, n, dtype=torch.int64, device=device) if cuda else self.host
            blk_t = [i for i, k in enumerate(numels) for _ in range(math.ceil(k / BLOCK))]
            blk_off = [j * BLOCK for k in numels for j in range(math.ceil(k / BLOCK))]
            self.blocks = (torch.tensor(blk_t, dtype=torch.int32, device=device),
                           torch.tensor(blk_off, dtype=torch.int64, device=device))
            self.key = None
        key = tuple(t.data_ptr() for ts in tensors for t in ts)
        if cuda and torch.cuda.is_current_stream_capturing():
            host = torch.empty_like(self.host, pin_memory=True)
            self._fill(host, tensors)
            self.captured.append(host)
            self.dev.copy_(host, non_blocking=True)
        else:
            if key != self.key:
                if self.copied is not None:
                    self.copied.synchronize()  # the previous copy has read the pinned buffer
                self._fill(self.host, tensors)
                self.key = key
            if cuda:  # every eager step: a replay in between may have left other addresses on the device
                self.dev.copy_(self.host, non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record()
        return (*self.dev, *self.blocks)


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose step on CUDA (fp32 dense parameters) is the Triton kernel above. Takes
    `grad_scale` / `found_inf` attributes like the fused implementation (train/clipping.py sets them)."""

    def __init__(self, params, **kwargs):
        kwargs.pop("fused", None)
        kwargs.pop("foreach", None)
        kwargs["capturable"] = True  # step counts on the device, lr may be a device tensor
        super().__init__(params, **kwargs)
        self.defaults["fused"] = True  # clip_and_step: the sync-free path (grad_scale / found_inf)
        self._tables: dict[int, _Tables] = {}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("TritonAdamW.step takes no closure")
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            device = params[0].device
            if any(p.dtype != torch.float32 or p.grad.is_sparse or p.device != device or not p.is_contiguous()
                   for p in params):
                raise ValueError("TritonAdamW: parameters must be contiguous dense fp32 tensors on one CUDA device "
                                 "(set optim.kernel: torch for others)")
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states = [self.state[p] for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            lr = group["lr"]
            if not torch.is_tensor(lr):
                lr = group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
            scale = grad_scale if grad_scale is not None else torch.ones((), device=device)
            inf = found_inf if found_inf is not None else torch.zeros((), device=device)
            tables = self._tables.setdefault(gi, _Tables())
            # The kernel walks each tensor as numel contiguous elements. Autograd gives gradients the
            # parameter's layout; a gradient set by hand in another layout is read from a contiguous copy.
            grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
            P, G, M, V, numel, blk_t, blk_off = tables.update(
                [params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]], device)
            beta1, beta2 = group["betas"]
            _kernel()[(blk_t.numel(),)](P, G, M, V, numel, blk_t, blk_off, lr, steps[0], scale, inf,
                                        float(group["weight_decay"]), float(beta1), float(beta2),
                                        float(group["eps"]), BLOCK=BLOCK)
            if found_inf is not None:
                torch._foreach_sub_(steps, [found_inf] * len(steps))
        return None
