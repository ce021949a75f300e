"""The switchable FFN: one set of parameters, a dense path and a sparse (MoE) path (paper §4.1–4.2).

Dense:  FFN(x) = W_o σ(W_i x + b_i) + b_o                                  (eq. 1)
Sparse: FFN(x) = Σ_{n ∈ topK(α)} 1 · W_o,n σ(W_i,n x + b_i,n) + b_o       (eq. 2, 4)

Neurons keep their identity forever: the clustering is held as the permutation buffer
`expert_perm` (the neurons of expert n are expert_perm[n*E:(n+1)*E]), indexed by neuron id. The
parameters are stored in neuron order, where the sparse path gathers the expert blocks through the
permutation, or, while a training run is sparse, in expert-major order (ffn/expert_layout.py: moved
together with their optimizer moments, and back bit for bit), where the experts are free views. The
`expert_major` buffer says which; labels, ARI and `neuron_rows` always speak neuron ids.
"""
from __future__ import annotations

import torch
from torch import nn

from .activations import ACTIVATIONS, apply_activation, is_glu
from .backends import call_router_folded, expert_ffn, get_backend, router_fold_offered, weights_for
from .backends.weights import expert_rows, expert_views, gather_expert_weights, inverse_permutation
from .centroid_router import CentroidCache, centroid_topk, expert_centroids
from .fused_relu_ffn import relu_ffn

MODES = ("dense", "sparse")


class Activation(nn.Module):
    """σ as a module, so monitors can hook its output (the post-activation hidden state)."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")
        self.name = name
        self.glu_block = None  # E while a GLU FFN is stored expert-major (gate/up rows interleaved per expert)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return apply_activation(h, self.name, self.glu_block)

    def extra_repr(self) -> str:
        return self.name


def straight_through_gate(scores: torch.Tensor) -> torch.Tensor:
    """Value exactly 1, gradient that of `scores` (paper appendix A).

    Written as (s - s.detach()) + 1: the paper's `1 + s - s.detach()` evaluates as (1 + s) - s, which
    rounds away from 1 for a sizeable fraction of elements in bf16 and fp32, breaking K=N == dense. Without a
    gradient to carry (inference, or the router's gradient off), ones: one fill instead of two elementwise ops.
    """
    if not scores.requires_grad:
        return torch.ones_like(scores)
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
        # 0 in neuron order; E (the expert size) while stored expert-major, so a checkpoint says its layout.
        self.register_buffer("expert_major", torch.zeros((), dtype=torch.long), persistent=True)
        self._expert_major = False  # host mirror of the buffer: read by forward without a device sync
        self.mode = "dense"
        self.num_experts = 1
        self.top_k = 1
        self.router_grad = router_grad
        self.backend = get_backend("reference")
        # Inference-only dynamic top-k (§5.3): drop this fraction of the lowest-scoring candidates.
        self.dynamic_drop_ratio = 0.0
        # inference only (infer.sparse.sparsify): centroids kept while the weights are unchanged
        self.cache_centroids = False
        self._centroid_cache = CentroidCache()
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
        if self._expert_major and num_experts != self.num_experts:
            raise ValueError(f"num_experts={num_experts}: the FFN is stored expert-major for {self.num_experts} "
                             "experts; restore neuron order first (ffn.expert_layout.to_neuron_order)")
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

    # ------------------------------------------------------------------ storage order

    @property
    def is_expert_major(self) -> bool:
        return self._expert_major

    def mark_expert_major(self, flag: bool) -> None:
        """Record the storage order (called by ffn/expert_layout.py once the tensors have moved)."""
        self._expert_major = bool(flag)
        with torch.no_grad():
            self.expert_major.fill_(self.expert_size if flag else 0)
        self.act.glu_block = self.expert_size if (self._expert_major and self.glu) else None

    def expert_major_order(self):
        """(W_i / b_i row order, W_o column order) of the expert-major storage: the neuron (row) ids by
        storage position; for GLU each expert's gate rows then its up rows."""
        return expert_rows(self.expert_perm, self.num_experts, self.glu), self.expert_perm

    def reset_layout(self) -> None:
        """Identity clustering, neuron-order storage: a freshly initialised FFN (not a move: only call
        this when the parameters are (re-)initialised too)."""
        with torch.no_grad():
            self.expert_perm.copy_(torch.arange(self.d_ff, device=self.expert_perm.device))
        self.mark_expert_major(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before expert-major storage existed hold neuron-order parameters.
        state_dict.setdefault(prefix + "expert_major", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        size = int(self.expert_major)
        if size and size != self.expert_size:  # the stored layout fixes the experts
            self.num_experts = self.d_ff // size
            self.top_k = min(self.top_k, self.num_experts)
        self.mark_expert_major(size > 0)

    def neuron_rows(self) -> torch.Tensor:
        """One row per neuron, what the clustering sees: W_i's row (for GLU, [gate row, up row]).

        Under FSDP2 (outside forward the weight is a DTensor shard) the full matrix is gathered first:
        a collective, so every rank of the group must call this."""
        w = self.w_in.weight.detach()
        if hasattr(w, "full_tensor"):
            w = w.full_tensor()
        if self._expert_major:
            w = w.index_select(0, inverse_permutation(self.expert_major_order()[0]).to(w.device))
        if self.glu:
            return torch.cat([w[: self.d_ff], w[self.d_ff:]], dim=1)
        return w

    def set_clustering(self, labels: torch.Tensor) -> None:
        """Adopt a balanced clustering (labels indexed by neuron id) as the expert layout."""
        if self._expert_major:
            raise ValueError("set_clustering: the FFN is stored expert-major for its current clustering; restore "
                             "neuron order first (ffn.expert_layout.to_neuron_order, with the optimizer)")
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

    def _router_folded(self, x2: torch.Tensor) -> bool:
        """Whether the router's gradient (through the straight-through gate into x and W_i) is computed
        inside the backend's kernels (`folds_router`, docs/interfaces.md) instead of by the router's own
        backward. Not for subclasses with another router, nor for the inference-only dynamic top-k."""
        return (self.router_grad and torch.is_grad_enabled()
                and type(self).route is SwitchableFFN.route
                and not (self.dynamic_drop_ratio > 0 and not self.training)
                and router_fold_offered(self.backend, x2))

    def expert_weights(self):
        """(w1 [N, F1, D], b1 [N, F1] or None, w2 [N, E, D]) of the shared parameters: views when they are
        stored expert-major, else gathered through `expert_perm` (differentiable; the backward is a
        gather by the inverse permutation, not an atomic scatter-add)."""
        if self._expert_major:
            return expert_views(self.w_in.weight, self.w_in.bias, self.w_out.weight, self.num_experts)
        return gather_expert_weights(self.w_in.weight, self.w_in.bias, self.w_out.weight, self.expert_perm,
                                     self.num_experts, self.glu)

    def centroids(self, x2: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
        """c_n: the mean of expert n's W_i rows (its gate rows for GLU), [N, D], in the tokens' dtype (w1 may
        be the fp32 master weights with bf16 tokens). With `cache_centroids` (set by infer.sparse.sparsify),
        forwards without autograd reuse them while the weights and the clustering are unchanged."""
        def compute():
            return expert_centroids(w1, self.expert_size, x2.dtype)

        w = self.w_in.weight
        if not self.cache_centroids or w.is_inference():  # (inference tensors have no version counter)
            return compute()
        key = (w.data_ptr(), w._version, self.expert_perm._version, self._expert_major, self.num_experts, w1.dtype,
               x2.dtype)
        return self._centroid_cache.get(key, compute)

    def route(self, x2: torch.Tensor, w1: torch.Tensor, k: int):
        """Top-k experts by α_n = x·c_n, c_n the mean of expert n's W_i (gate) rows (eq. 4)."""
        centroids = self.centroids(x2, w1)
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
            x2 = x2.to(torch.get_autocast_dtype(x.device.type))
            # fp32 (master) weights go as they are to a backend that casts them itself and returns fp32 grads
            w1, b1, w2 = weights_for(self.backend, x2, w1, b1, w2)
        b2 = self.w_out.bias  # y's initial value where the backend folds it (expert_ffn)
        if self._router_folded(x2):
            with torch.no_grad():
                centroids = self.centroids(x2, w1)
                top_idx = centroid_topk(x2, centroids, self.top_k)[1]
            y = call_router_folded(self.backend, x2, w1, b1, w2, top_idx, self.activation, centroids, b2)
        else:
            top_idx, gate = self.route(x2, w1, self.top_k)
            y = expert_ffn(self.backend, x2, w1, b1, w2, top_idx, gate.to(x2.dtype), self.activation, b2)
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
