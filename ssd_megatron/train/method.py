"""Training methods: what differs between dense, SSD and the baselines, behind one set of hooks.

The loop owns optimisation, data, checkpoints and logging; a method owns everything that makes a
step of its kind: which FFN path runs, how many experts, which layers are dropped, extra loss terms,
and how many FLOPs the step really executes. Each hook runs on every rank; a method whose decisions
need data from one rank broadcasts them itself (the process group is passed in, never global).
"""
from __future__ import annotations

from typing import Hashable, Optional

import torch
from torch import nn


class TrainingMethod:
    """Base class: the dense method. Subclasses override what they change."""

    name = "dense"
    # True when some parameters may get no gradient in a step (e.g. dropped layers): DDP must then be
    # built with find_unused_parameters=True (slower, so only methods that need it ask).
    needs_find_unused_parameters = False

    def __init__(self, cfg, model: nn.Module, group=None):
        self.cfg = cfg
        self.model = model
        self.group = group
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer over the model's parameters, once built (after the method: the method may change
        the model first). Methods that move parameters in storage move its state with them."""
        self.optimizer = optimizer

    # ---- per step
    def before_step(self, step: int) -> None:
        """Called before the forward of optimizer step `step` (0-based)."""

    def extra_loss(self) -> Optional[torch.Tensor]:
        """Auxiliary loss terms (e.g. load balancing) collected during the last forward, or None."""
        return None

    def after_step(self, step: int) -> dict:
        """Called after the optimizer step; returns extra metrics to log (JSON-serialisable)."""
        return {}

    def phase(self) -> str:
        """What kind of step runs now: 'dense' or 'sparse' (logged per step, asserted equal across ranks)."""
        return "dense"

    def graph_key(self) -> Optional[Hashable]:
        """Names this step's device computation for train.cuda_graph, which captures one graph per key and
        replays it for every later step with that key; None = run this step eagerly. A key promises that
        the step's device work is the same for every step with that key and adds no extra loss. The plain
        dense method and SSD (per phase) say so; subclasses stay eager unless they opt in."""
        return "dense" if type(self) is TrainingMethod else None

    def ffn_active_fraction(self) -> float:
        """Fraction of FFN neurons a token computes in the current step (1.0 dense)."""
        return 1.0

    def router_flops_per_token(self) -> float:
        """Forward FLOPs per token per FFN layer spent on routing (0 dense)."""
        return 0.0

    def router_backward_flops_per_token(self) -> float:
        """Backward FLOPs per token per FFN layer of the routing (default: twice the forward, i.e. a
        gradient for the router's input and one for its weights; 0 for a frozen router with a constant gate)."""
        return 2.0 * self.router_flops_per_token()

    def layers_kept(self) -> Optional[list]:
        """For layer dropping: which transformer layers ran in the last step (None = all)."""
        return None

    def set_reference_batch(self, batch: dict) -> None:
        """A fixed validation batch (on the model's device) for methods that probe the model."""

    # ---- evaluation
    def eval_mode(self) -> None:
        """Put the model in its inference form (dense for SSD's final model, all layers for PLD)."""

    def train_mode(self) -> None:
        """Undo eval_mode."""

    # ---- checkpointing
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


_REGISTRY: dict = {}


def register_method(name: str):
    def deco(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


register_method("dense")(TrainingMethod)


_METHOD_MODULES = ("ssd_megatron.baselines", "ssd_megatron.ssd.method")


def build_method(cfg, model: nn.Module, group=None) -> TrainingMethod:
    # Importing registers the non-dense methods; done here so the loop needs no knowledge of them.
    # A module that fails to import only matters if the requested method lives there.
    import importlib

    failures = []
    if cfg.method not in _REGISTRY:
        for mod in _METHOD_MODULES:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                failures.append(f"{mod}: {e}")
    if cfg.method not in _REGISTRY:
        from ..errors import UserError
        why = f" (import failed: {'; '.join(failures)})" if failures else ""
        raise UserError(f"method: {cfg.method!r} is not available{why}; accepted: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[cfg.method](cfg, model, group)
