"""The paper's baselines (§5.1) as training methods: SMoE, MoE-Dropout, PLD (Dense is the base class).

Importing this package registers them with `ssd_megatron.train.method.register_method`, so
`build_method(cfg, model)` finds `method: smoe | moe_dropout | pld`. See docs/baselines.md.
"""
from .moe_dropout import MoEDropoutFFN, MoEDropoutMethod, k_schedule
from .pld import PLDBlock, PLDMethod, keep_probabilities, pld_theta
from .smoe import SMoEFFN, SMoEMethod, load_balancing_loss, router_z_loss

__all__ = [
    "MoEDropoutFFN", "MoEDropoutMethod", "PLDBlock", "PLDMethod", "SMoEFFN", "SMoEMethod",
    "k_schedule", "keep_probabilities", "load_balancing_loss", "pld_theta", "router_z_loss",
]
