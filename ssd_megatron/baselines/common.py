"""Helpers shared by the baselines: finding a model's FFNs and blocks, and in-place class conversion.

Conversions are done by swapping an existing module's class (as FSDP2's `fully_shard` does) instead
of building a new module and re-parenting it. That keeps:
- parameter names, so a baseline's checkpoint has the same keys as the dense model's (plus the
  router, where there is one) and the final dense model of PLD / MoE-Dropout loads into a plain model;
- object identity, so lists the loop or a monitor already holds (`model.ffn_layers()`) stay valid;
- whatever attributes the base class's `__init__` set, without this package having to know them.
"""
from __future__ import annotations

import hashlib
import struct

import torch
from torch import nn

from ..ffn import SwitchableFFN


def ffn_layers(model: nn.Module) -> list:
    """The model's FFNs in order (`model.ffn_layers()` where the model defines it)."""
    if hasattr(model, "ffn_layers"):
        return list(model.ffn_layers())
    return [m for m in model.modules() if isinstance(m, SwitchableFFN)]


def transformer_layers(model: nn.Module) -> list:
    """The model's transformer blocks in order (encoder blocks then decoder blocks for T5)."""
    if hasattr(model, "transformer_layers"):
        return list(model.transformer_layers())
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return list(model.layers)
    raise TypeError(f"{type(model).__name__} exposes neither transformer_layers() nor a `layers` ModuleList")


def stacks_of(model: nn.Module, blocks: list) -> list[list[int]]:
    """Group block indices (into `blocks`) by the ModuleList holding them: one residual stack each.

    GPT/BERT have one stack; T5 has an encoder and a decoder stack, each with its own depth. Blocks
    not held by any ModuleList form one stack together.
    """
    owner = {}
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList):
            for child in mod:
                owner.setdefault(id(child), id(mod))
    groups: dict = {}
    for i, blk in enumerate(blocks):
        groups.setdefault(owner.get(id(blk), None), []).append(i)
    return list(groups.values())


def swap_class(module: nn.Module, mixin: type, prefix: str) -> None:
    """Make `module` an instance of `mixin` when `mixin` subclasses its class, else of
    `type(prefix + cls.__name__, (mixin, cls), {})` (cached per class)."""
    cls = type(module)
    if isinstance(module, mixin):
        return
    if issubclass(mixin, cls):
        module.__class__ = mixin
        return
    key = (mixin, cls)
    new_cls = _SWAPPED.get(key)
    if new_cls is None:
        new_cls = type(prefix + cls.__name__, (mixin, cls), {"__module__": mixin.__module__})
        _SWAPPED[key] = new_cls
    module.__class__ = new_cls


_SWAPPED: dict = {}


def uniform_hash(*keys: int) -> float:
    """A uniform draw in [0, 1) that is a pure function of integer keys (seed, step, layer, ...).

    Used instead of a stateful RNG so that a draw never depends on how many draws came before it:
    the same (seed, step, layer) gives the same value on every rank, after any resume, in any order.
    """
    h = hashlib.blake2b(struct.pack(f"<{len(keys)}q", *keys), digest_size=8).digest()
    return (int.from_bytes(h, "little") >> 11) * (1.0 / (1 << 53))


def seed_for(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (for torch.Generator.manual_seed)."""
    h = hashlib.blake2b(struct.pack(f"<{len(keys)}q", *keys), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def contiguous_experts(ffn: SwitchableFFN, num_experts: int, top_k: int) -> None:
    """Experts = contiguous neuron blocks [n*E, (n+1)*E), stored expert-major so that the sparse path reads
    them as views: without GLU that storage is the neuron order itself; with GLU each expert's gate and up
    rows are interleaved once, here, before any optimizer state exists (ffn/expert_layout.py)."""
    from ..ffn.expert_layout import to_expert_major

    if ffn.is_expert_major:
        raise ValueError("a baseline FFN must be built from a neuron-order SwitchableFFN")
    ffn.configure_experts(num_experts, top_k)
    ffn.expert_perm.copy_(torch.arange(ffn.d_ff, device=ffn.expert_perm.device))
    to_expert_major(ffn)
