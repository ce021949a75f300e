"""The switchable FFN: one set of parameters, a dense path and a sparse (MoE) path (paper §4.1–4.2).

Dense:  FFN(x) = W_o σ(W_i x + b_i) + b_o                                  (eq. 1)
Sparse: FFN(x) = Σ_{n ∈ topK(α)} 1 · W_o,n σ(W_i,n x + b_i,n) + b_o       (eq. 2, 4)

Neurons keep their identity forever: the clustering is held as the permutation buffer
`expert_perm` (the neurons of expert n are expert_perm[n*E:(n+1)*E]) and the sparse path gathers the
expert blocks through it. So a phase switch never creates, drops or reorders a parameter, the
optimizer's moments stay attached to their neurons, and ARI labels need no mapping.
"""
from __future__ import annotations

import torch
from torch import nn

from .activations import ACTIVATIONS, apply_activation, is_glu
from .backends import get_backend
from .backends.weights import gather_expert_weights, inverse_permutation
from .centroid_router import centroid_topk
from .fused_relu_ffn import relu_ffn

MODES = ("dense", "sparse")


class Activation(nn.Module):
    """σ as a module, so monitors can hook its output (the post-activation hidden state)."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")
        self.name = name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return apply_activation(h, self.name)

    def extra_repr(self) -> str:
        return self.name


def straight_through_gate(scores: torch.Tensor) -> torch.Tensor:
    """Value exactly 1, gradient that of `scores` (paper appendix A).

    Written as (s - s.detach()) + 1: the paper's `1 + s - s.detach()` evaluates as (1 + s) - s, which
    rounds away from 1 for a sizeable fraction of elements in bf16 and fp32, breaking K=N == dense.
    """
    return (scores - scores.detach()) + 1


class SwitchableFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", bias: bool = True,
                 num_experts: int = 1, top_k: int = 1, router_grad: bool = True):
        super().__init__()
        self.d_model, self.d_ff = d_model, d_ff
        self.glu = is_glu(activation)
        self.w_in = nn.Linear(d_model, d_ff * (2 if self.glu else 1), bias=bias)
        self.act = Activation(activation)
        self.w_out = nn.Linear(d_ff, d_model, bias=bias)
        self.register_buffer("expert_perm", torch.arange(d_ff), persistent=True)
        self.mode = "dense"
        self.num_experts = 1
        self.top_k = 1
        self.router_grad = router_grad
        self.backend = get_backend("reference")
        # Inference-only dynamic top-k (§5.3): drop this fraction of the lowest-scoring candidates.
        self.dynamic_drop_ratio = 0.0
        self.configure_experts(num_experts, top_k)

    @property
    def activation(self) -> str:
        return self.act.name

    # ------------------------------------------------------------------ configuration

    def configure_experts(self, num_experts: int, top_k: int) -> None:
        if num_experts < 1 or self.d_ff % num_experts:
            raise ValueError(f"num_experts={num_experts} must divide d_ff={self.d_ff}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k = num_experts, top_k

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; accepted: {', '.join(MODES)}")
        self.mode = mode

    def set_backend(self, backend) -> None:
        self.backend = get_backend(backend) if isinstance(backend, str) else backend

    @property
    def expert_size(self) -> int:
        return self.d_ff // self.num_experts

    def neuron_rows(self) -> torch.Tensor:
        """One row per neuron, what the clustering sees: W_i's row (for GLU, [gate row, up row]).

        Under FSDP2 (outside forward the weight is a DTensor shard) the full matrix is gathered first:
        a collective, so every rank of the group must call this."""
        w = self.w_in.weight.detach()
        if hasattr(w, "full_tensor"):
            w = w.full_tensor()
        if self.glu:
            return torch.cat([w[: self.d_ff], w[self.d_ff:]], dim=1)
        return w

    def set_clustering(self, labels: torch.Tensor) -> None:
        """Adopt a balanced clustering (labels indexed by neuron id) as the expert layout."""
        labels = torch.as_tensor(labels, device=self.expert_perm.device).long()
        counts = torch.bincount(labels, minlength=self.num_experts)
        if labels.numel() != self.d_ff or counts.numel() != self.num_experts or bool((counts != self.expert_size).any()):
            raise ValueError(f"clustering must assign exactly {self.expert_size} of {self.d_ff} neurons to each of "
                             f"{self.num_experts} experts")
        # In place: a captured step (train.cuda_graph) replays with this very tensor.
        self.expert_perm.copy_(torch.argsort(labels, stable=True))

    def expert_labels(self) -> torch.Tensor:
        """Inverse of set_clustering: the expert of each neuron, indexed by neuron id."""
        return inverse_permutation(self.expert_perm) // self.expert_size

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "dense":
            return self.sparse_forward(x)
        if self._fused_dense(x):
            return relu_ffn(x, self.w_in.weight, self.w_in.bias, self.w_out.weight, self.w_out.bias)
        return self.w_out(self.act(self.w_in(x)))

    # Class switch for benchmarks (bench/step.py --variant no-fused-relu).
    fuse_relu = True

    def _fused_dense(self, x: torch.Tensor) -> bool:
        """On CUDA a biased ReLU FFN runs with its bias, ReLU and ReLU-derivative work inside the GEMMs
        (fused_relu_ffn.py), unless something hooks `act` (the sparsity probe reads its output)."""
        return (self.fuse_relu and x.is_cuda and self.act.name == "relu" and self.w_in.bias is not None
                and self.w_out.bias is not None and not self.act._forward_hooks
                and not self.act._forward_pre_hooks)

    def expert_weights(self):
        """Expert-major views of the shared parameters, gathered through `expert_perm` (differentiable;
        the backward is a gather by the inverse permutation, not an atomic scatter-add)."""
        return gather_expert_weights(self.w_in.weight, self.w_in.bias, self.w_out.weight, self.expert_perm,
                                     self.num_experts, self.glu)

    def route(self, x2: torch.Tensor, w1: torch.Tensor, k: int):
        """Top-k experts by α_n = x·c_n, c_n the mean of expert n's W_i (gate) rows (eq. 4)."""
        centroids = w1[:, : self.expert_size].mean(dim=1)
        if not self.router_grad:
            # No gradient path through the router at all (neither into W_i nor into x): the sparse
            # layer's gradients are then exactly the dense layer's restricted to the chosen experts.
            centroids, x2 = centroids.detach(), x2.detach()
        top_scores, top_idx = centroid_topk(x2, centroids, k)
        gate = straight_through_gate(top_scores)
        if self.dynamic_drop_ratio > 0 and not self.training:
            gate = gate * _dynamic_keep_mask(top_scores, self.dynamic_drop_ratio)
        return top_idx, gate

    def sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.d_model)
        w1, b1, w2 = self.expert_weights()
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x2, w1, w2 = x2.to(dt), w1.to(dt), w2.to(dt)
            b1 = None if b1 is None else b1.to(dt)
        top_idx, gate = self.route(x2, w1, self.top_k)
        y = self.backend(x2, w1, b1, w2, top_idx, gate.to(x2.dtype), self.activation)
        if self.w_out.bias is not None:
            y = y + self.w_out.bias.to(y.dtype)
        return y.view(*shape[:-1], self.d_model)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, mode={self.mode}, "
                f"experts={self.num_experts}, top_k={self.top_k}")


def _dynamic_keep_mask(top_scores: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """§5.3: of all (token, candidate) pairs in the batch, drop the lowest-scoring `drop_ratio`."""
    flat = top_scores.detach().float().reshape(-1)
    n_drop = int(flat.numel() * drop_ratio)
    if n_drop <= 0:
        return torch.ones_like(top_scores)
    cutoff = flat.kthvalue(n_drop).values
    keep = (top_scores.detach() > cutoff).to(top_scores.dtype)
    # Every token keeps at least its best expert.
    keep[:, 0] = 1
    return keep
