"""Which launches of the Gluon kernels have loaded their modules in this process, and `auto`'s rule for taking them.

A Gluon launch costs more host time than a Triton kernel's (TMA descriptors built per call, a heavier launch path:
≈ 0.35 ms more per eager forward for the WS fused forward, docs/kernels.md v20), which eager steps, host-bound,
would pay in full; under a CUDA graph that cost is paid once, at capture. But the first launch of a kernel loads
its module, and CUDA refuses a module load while a stream captures. So `auto` takes a Gluon kernel (`take`):
- outside a capture, for the first launch of each cheap eager key (shapes): that launch loads the module, during the
  warm-up every capture needs; later eager launches keep the Triton kernel;
- while capturing, only if an eager launch with the same launch key (`key`) ran before: the key holds each tensor's
  shape, strides and 16-byte alignment and the launch's flags, finer than Triton's own specialisation key, so a
  recorded key means a compiled kernel and a loaded module.
A heavy launch (`take`'s `flops` at least HEAVY_FLOPS, e.g. 8B's weight gradients, ≈ 1.2 ms each on an H100) takes
the Gluon kernel in every eager call too: its GPU time hides the extra host time many times over, and eager steps at that size
(FSDP2's, which take no CUDA graphs) are GPU-bound, as the 8B down for dx, which always takes its Gluon kernel.
Both records stop at MAX_KEYS entries: a run whose shapes keep changing (e.g. batches padded to their longest
sequence) is not one a CUDA graph can capture, and would otherwise pay the Gluon launch's host time for every new
shape and grow the records without bound. Past the bound, eager launches keep the Triton kernels, and captures take
the Gluon kernels only for the keys recorded before.
"""
from __future__ import annotations

import torch

# what ran outside a CUDA-graph capture in this process: the launch keys (`key`) and the callers' eager keys
_LAUNCHED: set = set()
_EAGER: set = set()
MAX_KEYS = 64  # entries of each record (module docstring)
# a launch's multiply-adds x 2 from which eager calls always take the Gluon kernel (module docstring): 2^38 ≈ 2.7e11,
# ≈ 0.6 ms at 450 TF/s, twice the heaviest Gluon launch's extra host time (≈ 0.35 ms, the WS fused forward's). 8B's
# weight gradients are 5.5e11 (ReLU) and 1.1e12 (SwiGLU's dW1); base's 3e10.
HEAVY_FLOPS = 2 ** 38


def _spec(t):
    return None if t is None else (t.device, t.dtype, tuple(t.shape), t.stride(), t.data_ptr() % 16 == 0)


def key(tensors, *flags) -> tuple:
    """A launch's key: each tensor's device, dtype, shape, strides and 16-byte alignment, then the launch's flags and
    tile (module docstring)."""
    return tuple(_spec(t) for t in tensors) + flags


def capturing(t: torch.Tensor) -> bool:
    """Whether `t`'s device's current stream is capturing a CUDA graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def note(launch_key: tuple, eager_key: tuple, t: torch.Tensor) -> None:
    """Record a launch's key (its module loaded) and the caller's eager key when it ran outside a capture."""
    if not capturing(t):
        for record, k in ((_LAUNCHED, launch_key), (_EAGER, eager_key)):
            if len(record) < MAX_KEYS:
                record.add(k)


def take(t: torch.Tensor, launch_key, eager_key, flops: float = 0) -> bool:
    """Whether `auto` takes the Gluon kernel for this launch of `flops` (module docstring): while capturing, if
    `launch_key()` ran eagerly before; otherwise if the launch is heavy (`flops` >= HEAVY_FLOPS), or no eager launch
    with `eager_key()` has and neither record is full (with the launch keys' full, the eager launch could not make a
    capture take the kernel, and would only pay its host time). (Both keys are callables: an eager launch builds only
    the cheap key.)"""
    if capturing(t):
        return launch_key() in _LAUNCHED
    if flops >= HEAVY_FLOPS:
        return True
    return len(_EAGER) < MAX_KEYS and len(_LAUNCHED) < MAX_KEYS and eager_key() not in _EAGER
