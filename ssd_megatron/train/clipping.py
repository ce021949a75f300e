"""Gradient clipping by global norm, then the optimizer step; a step with a non-finite norm is skipped.

Two paths, one rule (clip coefficient max_norm / (norm + 1e-6), capped at 1, as
`torch.nn.utils.clip_grad_norm_`):

- **host path** (foreach AdamW on CPU, DTensor parameters under FSDP2): `clip_grad_norm_` scales the
  gradients in place, the norm is read on the host, and the optimizer runs only if it is finite.
- **device path** (fused AdamW, i.e. CUDA): nothing is read on the host. The norm, the inverse clip
  coefficient and the non-finite flag stay on the device and go into the fused kernel as `grad_scale`
  (it divides each gradient by it) and `found_inf` (when set the kernel leaves parameters, moments and
  step counts untouched). This removes the host sync in the middle of every step (the GPU idled while
  the host launched the optimizer) and the separate multiply over all gradients.

`StepOutcome.skipped` is a bool on the host path and a device tensor on the device path: callers read
it after their own end-of-step synchronisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class StepOutcome:
    grad_norm: torch.Tensor
    skipped: torch.Tensor | bool


def _uses_device_path(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> bool:
    if not optimizer.defaults.get("fused"):
        return False
    return not any(hasattr(g, "full_tensor") for g in grads)  # DTensor norms need their own reduction


def clip_and_step(params, optimizer: torch.optim.Optimizer, max_norm: float) -> StepOutcome:
    """Clip the gradients of `params` to global L2 norm `max_norm` (<= 0 or inf: no clipping) and step."""
    params = [p for p in params if p.grad is not None]
    max_norm = max_norm if max_norm > 0 else math.inf
    grads = [p.grad for p in params]
    if not _uses_device_path(optimizer, grads):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        skipped = not math.isfinite(float(norm))
        if not skipped:
            optimizer.step()
        return StepOutcome(norm, skipped)
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    bad = ~torch.isfinite(norm)
    # grad / scale == grad * min(1, max_norm / (norm + 1e-6)); 1 when skipping (the kernel ignores it).
    scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0) if math.isfinite(max_norm) else torch.ones_like(norm)
    optimizer.grad_scale = torch.where(bad, torch.ones_like(scale), scale).float()
    optimizer.found_inf = bad.float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    return StepOutcome(norm, bad)
