"""MoE-Dropout baseline (Chen et al., ICLR 2023; paper §5.1): random frozen router, K grows to N.

The FFN is split into N experts of contiguous neurons (`[n*E, (n+1)*E)`, E = d_ff / N; as the public
code, no clustering). Routing, as in VITA-Group/Random-MoE-as-Dropout with `--freeze_gate`:
- scores `s = x @ R.T`, `R` a `[N, d_model]` random projection drawn once from N(0, init_std^2)
  (the public code's `weights_init`, std 0.02) with a seed derived from (train.seed, layer), **never
  trained** (a buffer, not a Parameter: the optimizer, DDP and weight decay never see it; it is saved
  with the model so evaluation routes as training did);
- the K experts with the highest scores are selected (`topk`, ties broken by index);
- gate **exactly 1** for the selected experts (the public code softmax-weights them; we use SSD's
  constant gate so that K=N is the dense FFN bit-for-bit and the schedule ends on the dense model).
  The scores get no gradient: the router is frozen and the gate is a constant.
K follows the public code's `linear_increase`: `k(t) = clip(round((k_end - k_start) * t / T) + k_start,
k_start, k_end)`, T = moe_dropout.ramp_steps (0 = train.max_steps), Python `round` (half to even).
When K reaches N the FFN runs its dense path (identical function, no routing cost). The final model,
and evaluation (eval_mode), is dense unless moe_dropout.eval_k asks for a sparse k.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..ffn import SwitchableFFN
from ..ffn.backends import get_backend
from ..train.method import TrainingMethod, register_method
from .common import contiguous_experts, ffn_layers, seed_for, swap_class


def k_schedule(step: int, k_start: int, k_end: int, total_steps: int) -> int:
    """Public code's `calculate_gate_number(..., 'linear_increase')`, clipped to [k_start, k_end]."""
    if total_steps <= 0:
        return k_end
    k = round((k_end - k_start) * step / total_steps) + k_start
    return int(min(max(k, k_start), k_end))


class MoEDropoutFFN(SwitchableFFN):
    """SwitchableFFN with contiguous experts, a frozen random router and gate 1; dense when K = N."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", bias: bool = True,
                 num_experts: int = 32, top_k: int = 6, router_init_std: float = 0.02, seed: int = 0):
        super().__init__(d_model, d_ff, activation, bias)
        self._setup_moe_dropout(num_experts, top_k, router_init_std, seed)

    @classmethod
    def convert(cls, ffn: SwitchableFFN, num_experts: int, top_k: int, router_init_std: float = 0.02,
                seed: int = 0) -> "MoEDropoutFFN":
        """Turn an existing SwitchableFFN into a MoE-Dropout FFN in place (weights kept)."""
        swap_class(ffn, cls, "MoEDropout")
        ffn._setup_moe_dropout(num_experts, top_k, router_init_std, seed)
        return ffn

    def _setup_moe_dropout(self, num_experts, top_k, router_init_std, seed) -> None:
        contiguous_experts(self, num_experts, top_k)
        gen = torch.Generator().manual_seed(int(seed))
        r = torch.empty(num_experts, self.d_model, dtype=torch.float32).normal_(0.0, router_init_std, generator=gen)
        w = self.w_in.weight
        self.register_buffer("router_weight", r.to(device=w.device, dtype=w.dtype), persistent=True)
        self.set_k(top_k)

    def set_k(self, k: int) -> None:
        self.configure_experts(self.num_experts, k)
        # K = N with gate 1 is the dense FFN: take the dense path (same function, no routing).
        self.mode = "dense" if k == self.num_experts else "sparse"

    def route(self, x2: torch.Tensor, w1: torch.Tensor, k: int):
        with torch.no_grad():
            dt = torch.promote_types(x2.dtype, torch.float32)
            with torch.autocast(x2.device.type, enabled=False):
                scores = F.linear(x2.detach().to(dt), self.router_weight.to(dt))
            top_idx = scores.topk(k, dim=-1).indices
        gate = torch.ones(top_idx.shape, dtype=x2.dtype, device=x2.device)
        return top_idx, gate

    def extra_repr(self) -> str:
        return super().extra_repr() + ", router=random-frozen"


@register_method("moe_dropout")
class MoEDropoutMethod(TrainingMethod):
    def __init__(self, cfg, model: nn.Module, group=None):
        super().__init__(cfg, model, group)
        s = cfg.moe_dropout
        self.num_experts = s.num_experts
        self.k_start = s.k_start
        self.k_end = s.k_end or s.num_experts
        self.total_steps = getattr(s, "ramp_steps", 0) or cfg.train.max_steps
        self.eval_k = getattr(s, "eval_k", 0) or s.num_experts
        device = next(model.parameters()).device
        backend = get_backend(cfg.ssd.backend, device=device)
        self.ffns = []
        for i, ffn in enumerate(ffn_layers(model)):
            if not isinstance(ffn, MoEDropoutFFN):
                MoEDropoutFFN.convert(ffn, s.num_experts, self.k_start, cfg.model.init_std,
                                      seed=seed_for(int(cfg.train.seed), i, 0x4D6F45))
            ffn.set_backend(backend)
            self.ffns.append(ffn)
        self.k = self.k_start
        self._eval = False

    def k_at(self, step: int) -> int:
        return k_schedule(step, self.k_start, self.k_end, self.total_steps)

    def _set_k(self, k: int) -> None:
        for ffn in self.ffns:
            ffn.set_k(k)

    def before_step(self, step: int) -> None:
        self.k = self.k_at(step)
        self._eval = False
        self._set_k(self.k)

    def after_step(self, step: int) -> dict:
        return {"k": self.k}

    def phase(self) -> str:
        return "dense" if self.k == self.num_experts else "sparse"

    def _current_k(self) -> int:
        return self.eval_k if self._eval else self.k

    def ffn_active_fraction(self) -> float:
        """K/N of the current mode: the training step's k, or eval_k after eval_mode()."""
        return self._current_k() / self.num_experts

    def router_flops_per_token(self) -> float:
        if self._current_k() == self.num_experts or not self.ffns:
            return 0.0
        return 2.0 * self.ffns[0].d_model * self.num_experts

    def router_backward_flops_per_token(self) -> float:
        return 0.0  # frozen router, constant gate: nothing to differentiate

    def eval_mode(self) -> None:
        self._eval = True
        self._set_k(self.eval_k)

    def train_mode(self) -> None:
        self._eval = False
        self._set_k(self.k)

    def set_inference_k(self, k: int) -> None:
        """Sparse inference with the training MoE structure (contiguous experts, the frozen router) at
        any k (paper Fig. 4a: "we directly adopt their MoE structure used in pre-training"); k = N is
        the dense model. Takes effect now and at every later eval_mode()."""
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"k={k} must be in [1, {self.num_experts}]")
        self.eval_k = int(k)
        self.eval_mode()

    def state_dict(self) -> dict:
        # k is a pure function of the step; saved only so a resumed run can be checked against it.
        return {"k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.k = int(state.get("k", self.k))
        self._set_k(self.k)
