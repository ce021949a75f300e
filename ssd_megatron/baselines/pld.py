"""Progressive Layer Dropping baseline (Zhang & He, NeurIPS 2020; paper §5.1).

Schedule (DeepSpeed `ProgressiveLayerDrop`): θ(t) = (1 − θ̄)·exp(−γ·t) + θ̄, t the 0-based optimizer
step, so θ(0) = 1 (nothing dropped) and θ → θ̄ (pld.theta_bar, default 0.5; γ = pld.gamma, 0.001).
Layer i (1-based within its stack of L blocks) is kept with p_i = 1 − i·(1 − θ)/L, so the deepest
layer is dropped most; with θ̄ = 0.5 the expected dropped fraction tends to (L+1)/(4L) ≈ 0.25, the
paper's "dropout rate from 0 to 0.25" (appendix A). T5's encoder and decoder are separate stacks.

A kept block's residual branches are scaled by 1/p_i (inverted dropout), a dropped block is the
identity, written generically around any block `forward(x, **kw) -> x'`:
    out = x + (block(x) − x) / p_i   if kept,      out = x   if dropped.
(DeepSpeed's pre-LN BertLayer scales the attention branch before the FFN sees it; the generic form
scales the block's total update — the same thing for the block's output expectation, and the only form
that does not need to know the block's internals.) Evaluation runs every layer unscaled.

Draws are one Bernoulli per layer per optimizer step (shared by its micro-batches), taken from a hash
of (train.seed, step, layer) rather than a stateful RNG: every rank draws the same layers without a
broadcast, and a resumed run redraws exactly what the uninterrupted one drew.

Dropped layers' parameters get no gradient in that step, so DDP needs `find_unused_parameters=True`
(`PLDMethod.needs_find_unused_parameters`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..train.method import TrainingMethod, register_method
from .common import stacks_of, swap_class, transformer_layers, uniform_hash


def pld_theta(step: int, theta_bar: float = 0.5, gamma: float = 0.001) -> float:
    return (1.0 - theta_bar) * math.exp(-gamma * step) + theta_bar


def keep_probabilities(theta: float, num_layers: int) -> list[float]:
    """p_i = 1 − i·(1 − θ)/L for i = 1..L."""
    return [1.0 - i * (1.0 - theta) / num_layers for i in range(1, num_layers + 1)]


class PLDBlock:
    """Mixin put in front of a block's class (see `common.swap_class`): keep/drop + 1/p scaling."""

    _pld_active = True
    _pld_keep = True
    _pld_prob = 1.0

    # The keep/drop branch runs outside torch.compile (the block's own forward is still compiled, as
    # its own frame): traced, every drawn pattern of kept layers would be a new graph and a whole-model
    # compile would exhaust its recompile limit within a few steps.
    @torch.compiler.disable(recursive=False)
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not (self.training and self._pld_active):
            return super().forward(x, *args, **kwargs)
        if not self._pld_keep:
            return x
        out = super().forward(x, *args, **kwargs)
        if self._pld_prob == 1.0:
            return out
        return x + (out - x) * (1.0 / self._pld_prob)


@register_method("pld")
class PLDMethod(TrainingMethod):
    # Dropped layers leave parameters out of the graph: the loop must build DDP with this set.
    needs_find_unused_parameters = True

    def __init__(self, cfg, model: nn.Module, group=None):
        super().__init__(cfg, model, group)
        self.theta_bar = cfg.pld.theta_bar
        self.gamma = cfg.pld.gamma
        self.seed = int(cfg.train.seed)
        self.blocks = transformer_layers(model)
        self.stacks = stacks_of(model, self.blocks)
        for blk in self.blocks:
            swap_class(blk, PLDBlock, "PLD")
        self.theta = 1.0
        self.kept: Optional[list] = None
        self.step_index = -1

    # ------------------------------------------------------------------ schedule

    def theta_at(self, step: int) -> float:
        return pld_theta(step, self.theta_bar, self.gamma)

    def keep_probs(self, step: int) -> list[float]:
        """Keep probability of every block (in transformer_layers order) at `step`."""
        theta = self.theta_at(step)
        probs = [1.0] * len(self.blocks)
        for stack in self.stacks:
            for idx, p in zip(stack, keep_probabilities(theta, len(stack))):
                probs[idx] = p
        return probs

    def draw(self, step: int) -> list[bool]:
        """Which blocks are kept at `step`: u(seed, step, layer) < p_layer."""
        return [uniform_hash(self.seed, step, i, 0x504C44) < p for i, p in enumerate(self.keep_probs(step))]

    # ------------------------------------------------------------------ hooks

    def before_step(self, step: int) -> None:
        self.step_index = step
        self.theta = self.theta_at(step)
        probs = self.keep_probs(step)
        keep = self.draw(step)
        for blk, p, k in zip(self.blocks, probs, keep):
            blk._pld_prob = float(p)
            blk._pld_keep = bool(k)
            blk._pld_active = True
        self.kept = [i for i, k in enumerate(keep) if k]

    def after_step(self, step: int) -> dict:
        n = len(self.blocks) if self.kept is None else len(self.kept)
        return {"pld_theta": self.theta, "layers_kept": n}

    def layers_kept(self) -> Optional[list]:
        """0-based indices (into model.transformer_layers()) of the blocks that ran in the last step."""
        return None if self.kept is None else list(self.kept)

    def eval_mode(self) -> None:
        for blk in self.blocks:
            blk._pld_active = False

    def train_mode(self) -> None:
        for blk in self.blocks:
            blk._pld_active = True

    def state_dict(self) -> dict:
        # Every draw is a function of (seed, step, layer): nothing to restore but a consistency check.
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        pass
