"""SMoE baseline (paper §5.1): every FFN becomes a learned-router mixture of experts, trained sparsely.

Experts are the contiguous neuron blocks `[n*E, (n+1)*E)` (E = d_ff / N) of the FFN's own `w_in` /
`w_out`, so the experts' parameters are exactly the dense FFN's (the paper: "the number of parameters
in experts ... is the same as ... in the FFNs"; N=3, K=2 at base scale). Only the router is added.

Routing (Switch / GShard / MegaBlocks style, dropless):
- logits `z = x @ W_r.T` with `W_r` an `nn.Linear(d_model, N, bias=False)`, computed in fp32;
- `p = softmax(z)` over all N experts; the top-K experts by `p` are selected;
- gate = `p_sel / sum(p_sel)`: **renormalised over the selected K** so the gates of a token sum to 1
  (with K=N it is plain softmax gating). Gradient reaches the router through the gate values.
- load-balancing loss `N * sum_i f_i * P_i`, `f_i` = fraction of the T*K (token, slot) assignments
  that went to expert i, `P_i` = mean over tokens of p_i (= 1 at perfect balance, its minimum for a
  uniform router); optional router z-loss `mean_t logsumexp(z_t)^2` (ST-MoE). The method adds
  `aux_loss_coef * mean_over_layers(lb) + z_loss_coef * mean_over_layers(z)` (MegaBlocks'
  normalisation: a per-layer mean, so the coefficient does not scale with depth).

SMoE is sparse at train and eval. `all_experts=True` (smoe.all_experts) is the paper's "dense
fine-tuning" SMoE (D): every expert runs, gated by softmax over all N.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ffn import SwitchableFFN
from ..ffn.backends import get_backend
from ..train.method import TrainingMethod, register_method
from .common import contiguous_experts, ffn_layers, swap_class


class SMoEFFN(SwitchableFFN):
    """A SwitchableFFN whose sparse path is routed by a learned router; always sparse."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", bias: bool = True,
                 num_experts: int = 3, top_k: int = 2, router_init_std: float = 0.02):
        super().__init__(d_model, d_ff, activation, bias)
        self._setup_smoe(num_experts, top_k, router_init_std)

    @classmethod
    def convert(cls, ffn: SwitchableFFN, num_experts: int, top_k: int, router_init_std: float = 0.02,
                generator: Optional[torch.Generator] = None) -> "SMoEFFN":
        """Turn an existing SwitchableFFN into an SMoE FFN in place (its w_in / w_out are kept)."""
        swap_class(ffn, cls, "SMoE")
        ffn._setup_smoe(num_experts, top_k, router_init_std, generator)
        return ffn

    def _setup_smoe(self, num_experts, top_k, router_init_std, generator=None) -> None:
        # Contiguous experts: neuron j belongs to expert j // E, forever.
        contiguous_experts(self, num_experts, top_k)
        w = self.w_in.weight
        self.router = nn.Linear(self.d_model, num_experts, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            init = torch.empty(num_experts, self.d_model, dtype=torch.float32)
            init.normal_(0.0, router_init_std, generator=generator)
            self.router.weight.copy_(init)
        self.mode = "sparse"
        self.all_experts = False
        self._aux: list = []          # (lb_loss, z_loss) per forward since the last pop_aux()
        self.last_load: Optional[torch.Tensor] = None   # [N] f_i of the last training forward

    # ------------------------------------------------------------------ forward

    def set_mode(self, mode: str) -> None:
        if mode != "sparse":
            raise ValueError("an SMoE FFN is always sparse; use all_experts=True for dense fine-tuning")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparse_forward(x)

    def router_logits(self, x2: torch.Tensor) -> torch.Tensor:
        # At least fp32 whatever the autocast dtype: softmax over a handful of logits, and the
        # load-balancing statistics, are sensitive to bf16 rounding (float64 stays float64).
        dt = torch.promote_types(x2.dtype, torch.float32)
        with torch.autocast(x2.device.type, enabled=False):
            return F.linear(x2.to(dt), self.router.weight.to(dt))

    def route(self, x2: torch.Tensor, w1: torch.Tensor, k: int):
        logits = self.router_logits(x2)
        probs = logits.softmax(dim=-1)
        k = self.num_experts if self.all_experts else k
        top_p, top_idx = probs.topk(k, dim=-1)
        gate = top_p / top_p.sum(dim=-1, keepdim=True)
        if self.training and torch.is_grad_enabled():
            lb, load = load_balancing_loss(probs, top_idx, self.num_experts)
            self._aux.append((lb, router_z_loss(logits)))
            self.last_load = load.detach()
        return top_idx, gate

    def pop_aux(self):
        """(mean load-balancing loss, mean z-loss) over the training forwards since the last call."""
        if not self._aux:
            return None
        lb = torch.stack([a for a, _ in self._aux]).mean()
        z = torch.stack([b for _, b in self._aux]).mean()
        self._aux = []
        return lb, z

    def extra_repr(self) -> str:
        return super().extra_repr() + f", router=learned, all_experts={self.all_experts}"


def load_balancing_loss(probs: torch.Tensor, top_idx: torch.Tensor, num_experts: int):
    """Switch/GShard auxiliary loss N * sum_i f_i * P_i, and the load vector f.

    probs: [T, N] router softmax; top_idx: [T, K] selected experts. f_i counts (token, slot)
    assignments over T*K (for K=1 this is Switch's fraction of tokens); it is not differentiable,
    the gradient flows through P_i = mean_t probs[t, i].
    """
    T, K = top_idx.shape
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, top_idx.reshape(-1), torch.ones(T * K, dtype=probs.dtype, device=probs.device))
    f = counts / max(T * K, 1)
    P = probs.mean(dim=0)
    return num_experts * (f * P).sum(), f


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


@register_method("smoe")
class SMoEMethod(TrainingMethod):
    """Swaps every FFN for an SMoEFFN (same weights + a router); adds the auxiliary losses.

    Build it before the optimizer (the routers are new parameters) and before DDP/FSDP wrapping.
    """

    def __init__(self, cfg, model: nn.Module, group=None):
        super().__init__(cfg, model, group)
        s = cfg.smoe
        device = next(model.parameters()).device
        backend = get_backend(cfg.ssd.backend, device=device)
        gen = torch.Generator().manual_seed(int(cfg.train.seed) + 7919)
        self.ffns = []
        for ffn in ffn_layers(model):
            if not isinstance(ffn, SMoEFFN):
                SMoEFFN.convert(ffn, s.num_experts, s.top_k, cfg.model.init_std, generator=gen)
            ffn.set_backend(backend)
            ffn.all_experts = bool(getattr(s, "all_experts", False))
            self.ffns.append(ffn)
        self._last: dict = {}

    def phase(self) -> str:
        return "dense" if self._all_experts() else "sparse"

    def _all_experts(self) -> bool:
        return bool(self.ffns) and self.ffns[0].all_experts

    def set_all_experts(self, on: bool) -> None:
        """SMoE (D): dense fine-tuning / evaluation with every expert on."""
        for ffn in self.ffns:
            ffn.all_experts = bool(on)

    def extra_loss(self) -> Optional[torch.Tensor]:
        s = self.cfg.smoe
        pairs = [p for p in (ffn.pop_aux() for ffn in self.ffns) if p is not None]
        if not pairs:
            return None
        lb = torch.stack([a for a, _ in pairs]).mean()
        z = torch.stack([b for _, b in pairs]).mean()
        self._last = {"lb": lb.detach(), "z": z.detach()}
        loss = s.aux_loss_coef * lb
        if s.z_loss_coef > 0:
            loss = loss + s.z_loss_coef * z
        return loss

    def after_step(self, step: int) -> dict:
        out = {}
        if self._last:
            out["smoe_lb_loss"] = float(self._last["lb"])
            out["smoe_z_loss"] = float(self._last["z"])
            self._last = {}
        loads = [ffn.last_load for ffn in self.ffns if ffn.last_load is not None]
        if loads:
            # 1.0 = perfectly balanced; N = everything on one expert.
            out["smoe_max_load"] = float(torch.stack(loads).max()) * self.cfg.smoe.num_experts
        return out

    def ffn_active_fraction(self) -> float:
        if self._all_experts():
            return 1.0
        return self.cfg.smoe.top_k / self.cfg.smoe.num_experts

    def router_flops_per_token(self) -> float:
        return 2.0 * self.ffns[0].d_model * self.cfg.smoe.num_experts if self.ffns else 0.0

    def router_backward_flops_per_token(self) -> float:
        # The router is trained: gradients w.r.t. its input and its weight, 2x the forward.
        return 2.0 * self.router_flops_per_token()
