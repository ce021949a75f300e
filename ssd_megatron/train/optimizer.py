"""AdamW with decay / no-decay parameter groups.

Weight decay applies to the weight matrices of linear layers only. Biases, normalisation gains/biases
and embeddings (token, position, relative-position bias tables) are exempt, as in BERT, GPT-2/3,
Megatron-LM and torchtitan: decaying a norm gain pulls it toward 0 rather than toward its neutral
value 1, a bias is not a scale that can overfit, and embedding rows of rare tokens are updated so
rarely that decay would shrink them toward zero between their updates. A tied LM head shares the token
embedding, so it is not decayed either. The rule is by module type, not by parameter name, so it holds
for every architecture built from torch's Linear / Embedding / LayerNorm / RMSNorm (and any module
whose class name ends in "Norm").

On CUDA the update is one Triton kernel per group (train/triton_adamw.py; `optim.kernel: torch` picks
torch's fused AdamW instead); on CPU the foreach implementation, whose results are deterministic run to
run (the bit-exact resume test needs that).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, getattr(nn, "RMSNorm", nn.LayerNorm))) \
        or type(mod).__name__.lower().endswith("norm")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    no_decay_ids: set[int] = set()
    for mod in model.modules():
        is_emb = isinstance(mod, nn.Embedding)
        is_norm = _is_norm(mod)
        for pname, p in mod.named_parameters(recurse=False):
            if is_emb or is_norm or pname.endswith("bias") or p.ndim < 2:
                no_decay_ids.add(id(p))
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in no_decay_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, ocfg, device: torch.device, capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW over `model` (call on the unwrapped model, or on the FSDP2-sharded one: same parameters).
    `capturable`: the step may be captured in a CUDA graph (train.cuda_graph; CUDA only)."""
    kwargs = dict(lr=ocfg.lr, betas=(ocfg.beta1, ocfg.beta2), eps=ocfg.eps)
    if device.type == "cuda" and ocfg.kernel != "torch":
        from .triton_adamw import TritonAdamW, triton_available

        sharded = any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP2 DTensors: torch's kernel
        if triton_available(device) and not sharded:  # one launch per group near HBM bandwidth; capturable
            return TritonAdamW(param_groups(model, ocfg.weight_decay), **kwargs)
        if ocfg.kernel == "triton":
            raise UserError("optim.kernel: 'triton' needs Triton on a CUDA device and unsharded parameters "
                            "(not parallel.data_parallel: fsdp); accepted here: auto, torch")
    if device.type == "cuda":
        kwargs["fused"] = True
        kwargs["capturable"] = capturable
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(param_groups(model, ocfg.weight_decay), **kwargs)
