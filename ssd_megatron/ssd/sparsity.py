"""Activation sparsity of FFN layers (paper §3: the phenomenon SSD exploits).

Definition: the fraction of entries of the post-activation hidden `h` (`[..., d_ff]`, the output of
`SwitchableFFN.act`) that are "off".

- Activations that produce exact zeros (`relu`, `reglu`, `squared_relu`): an entry is off iff `h == 0`
  (default threshold 0.0; for `reglu`, `h = relu(gate) * up` is zero wherever the gate is off).
- Smooth activations (`gelu`, `swiglu`, `geglu`) never output exact zeros, so an entry is off iff
  `|h| <= threshold` with default `SMOOTH_THRESHOLD = 1e-3`, the same value as the config's
  `ssd.sparsity_threshold` default. What it means: GELU's negative lobe reaches -0.17; |GELU(x)| falls
  below 1e-3 only for pre-activations below about -3.4 (and within ~2e-3 of 0), so it counts neurons
  that are clearly off, not the whole negative half-line (1e-2 would move that point to about -2.65).
  It is an absolute threshold, so it compares models of similar activation scale only (GLU outputs
  scale with the up projection). Pass `threshold=` for another convention (0.0 = exact zeros only).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ssd_megatron.errors import UserError

ZERO_ACTIVATIONS = ("relu", "reglu", "squared_relu")
SMOOTH_ACTIVATIONS = ("gelu", "swiglu", "geglu")
SMOOTH_THRESHOLD = 1e-3


def default_threshold(activation: str) -> float:
    """The documented default "off" threshold for `activation` (0.0 for ReLU-like, 1e-3 otherwise)."""
    if activation in ZERO_ACTIVATIONS:
        return 0.0
    if activation in SMOOTH_ACTIVATIONS:
        return SMOOTH_THRESHOLD
    accepted = ", ".join(ZERO_ACTIVATIONS + SMOOTH_ACTIVATIONS)
    raise UserError(f"model.activation: unknown activation {activation!r}; accepted: {accepted}")


def _off_mask(h: torch.Tensor, threshold: float) -> torch.Tensor:
    if threshold == 0.0:
        return h == 0
    return h.abs() <= threshold


def activation_sparsity(
    h: torch.Tensor,
    activation: str,
    threshold: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
) -> float:
    """Fraction of off entries of the post-activation hidden `h` `[..., d_ff]` (see module docstring).

    `mask` (optional, shape `h.shape[:-1]`, nonzero = real token) excludes padding tokens.
    """
    zeros, total = count_off(h, threshold if threshold is not None else default_threshold(activation), mask)
    total_f = float(total)
    return float(zeros) / total_f if total_f > 0 else 0.0


def count_off(
    h: torch.Tensor, threshold: float, mask: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(off_count, total)` as 0-d int64 tensors on `h.device` (no host sync)."""
    h = h.detach()
    off = _off_mask(h, threshold)
    if mask is None:
        return off.sum(), torch.tensor(off.numel(), device=h.device, dtype=torch.int64)
    m = mask.to(device=h.device)
    if m.shape != h.shape[:-1]:
        if m.numel() != h[..., 0].numel():
            raise ValueError(f"mask shape {tuple(m.shape)} does not match hidden {tuple(h.shape)}[:-1]")
        m = m.reshape(h.shape[:-1])
    m = m != 0
    off_tok = off.sum(dim=-1)
    return (off_tok * m).sum(), m.sum() * h.shape[-1]


class SparsityProbe:
    """Measures per-layer activation sparsity over the forwards run inside a `with` block.

    `SparsityProbe(ffns)` takes the FFN modules in layer order (e.g. `model.ffn_layers()`); each must
    expose `.act`, an `nn.Module` whose output is the post-activation hidden `[..., d_ff]`. A forward
    hook on each `act` adds that output's off count and size to per-layer totals kept on the device
    (no host sync per batch). The activation name comes from `activation=` or else each FFN's
    `.activation` attribute.

    Padding: call `probe.set_mask(mask)` (`[B, L]`, nonzero = real token) before a forward; it applies
    to every layer whose hidden has leading shape `[B, L]` (or the same number of tokens, flattened),
    until changed or cleared with `set_mask(None)`. Paths that do not call `act` (e.g. a fused sparse
    expert kernel) are not counted; in sparse mode the count covers only what passes through `act`.
    """

    def __init__(
        self,
        ffn_modules: Iterable[nn.Module],
        activation: Optional[str] = None,
        threshold: Optional[float] = None,
    ):
        self.modules = list(ffn_modules)
        if not self.modules:
            raise ValueError("SparsityProbe needs at least one FFN module")
        self.thresholds = []
        for i, mod in enumerate(self.modules):
            if not isinstance(getattr(mod, "act", None), nn.Module):
                raise ValueError(f"FFN module {i} ({type(mod).__name__}) has no `.act` submodule to probe")
            name = activation if activation is not None else getattr(mod, "activation", None)
            if threshold is not None:
                self.thresholds.append(float(threshold))
            elif name is None:
                raise ValueError(f"FFN module {i} has no `.activation`; pass activation= to SparsityProbe")
            else:
                self.thresholds.append(default_threshold(name))
        self._mask: Optional[torch.Tensor] = None
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self._off: list = [None] * len(self.modules)
        self._total: list = [None] * len(self.modules)

    def set_mask(self, mask: Optional[torch.Tensor]) -> None:
        self._mask = mask

    def _hook(self, index: int):
        def hook(_module, _inputs, output):
            off, total = count_off(output, self.thresholds[index], self._mask)
            if self._off[index] is None:
                self._off[index], self._total[index] = off, total
            else:
                self._off[index] = self._off[index] + off
                self._total[index] = self._total[index] + total

        return hook

    def __enter__(self) -> "SparsityProbe":
        if self._handles:
            raise RuntimeError("SparsityProbe is already active")
        self._handles = [m.act.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def counts(self) -> list[tuple[int, int]]:
        """Per layer `(off_entries, total_entries)` accumulated so far."""
        return [
            (0, 0) if off is None else (int(off), int(tot)) for off, tot in zip(self._off, self._total)
        ]

    def per_layer(self) -> list[float]:
        """Per-layer sparsity in [0, 1] (0.0 for a layer that saw no tokens)."""
        return [off / tot if tot else 0.0 for off, tot in self.counts()]

    def mean(self) -> float:
        """Mean of the per-layer sparsities over layers that saw tokens."""
        vals = [off / tot for off, tot in self.counts() if tot]
        return sum(vals) / len(vals) if vals else 0.0
