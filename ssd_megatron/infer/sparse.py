"""Sparse inference for a trained model: put every FFN in MoE form with any k (paper §5.2, §5.3, Table 5).

The final SSD model is dense; because it has been trained through sparse phases it also runs sparsely.
`sparsify` clusters each layer (warm-started from the last clustering the run used, as SSD does, and a
cold start, keeping the better — eq. 3) and switches the FFNs to top-k. The conversion-gap study of
Table 5 compares that with random neuron groups and with cold-start-only clustering.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from ..ffn.expert_layout import to_expert_major, to_neuron_order
from ..ssd.clustering import balanced_kmeans
from ..ssd.clustering import cluster_layers as batched_eq3

GROUPINGS = ("ssd", "cold", "random")


def random_labels(d_ff: int, num_experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(d_ff, generator=g) % num_experts


def cluster_layers(ffns, num_experts: int, grouping: str = "ssd", prev_labels: Optional[Sequence] = None,
                   cluster_backend: str = "torch", seed: int = 0) -> list:
    """Per-layer labels (indexed by neuron id) for `grouping` in ssd | cold | random.

    ssd: warm start from `prev_labels` (default: each FFN's current expert layout) and a cold start,
    the lower WCSS wins; cold: MoEfication's clustering without the previous checkpoint; random:
    equal random groups.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping {grouping!r}; accepted: {', '.join(GROUPINGS)}")
    if grouping == "random":
        return [random_labels(ffn.d_ff, num_experts, seed + i) for i, ffn in enumerate(ffns)]
    rows = [ffn.neuron_rows().float() for ffn in ffns]
    if grouping == "cold":
        return [balanced_kmeans(r, num_experts, seed=seed + i, backend=cluster_backend).labels.cpu()
                for i, r in enumerate(rows)]
    prev = prev_labels if prev_labels is not None else [_current_labels(f, num_experts) for f in ffns]
    # Same batched eq. 3 as the training monitor (layer i's cold start seeded seed + i).
    results = batched_eq3(rows, num_experts, prev, seed=seed, backend=cluster_backend)
    return [r.labels.cpu() for r in results]


def _current_labels(ffn, num_experts: int):
    if ffn.num_experts != num_experts:
        return None
    return ffn.expert_labels().cpu()


def sparsify(model, num_experts: int, top_k: int, *, labels: Optional[Sequence] = None,
             drop_ratio: float = 0.0, grouping: str = "ssd", cluster_backend: str = "torch",
             seed: int = 0) -> float:
    """Switch every FFN of `model` to sparse top-k inference; returns the clustering time in seconds."""
    ffns = list(model.ffn_layers())
    t0 = time.perf_counter()
    if labels is None:
        labels = cluster_layers(ffns, num_experts, grouping, cluster_backend=cluster_backend, seed=seed)
    for ffn, lab in zip(ffns, labels):
        to_neuron_order(ffn)  # inference: no optimizer state to move
        ffn.configure_experts(num_experts, top_k)
        ffn.set_clustering(lab)
        to_expert_major(ffn)  # experts as contiguous slices: no weight gather per forward
        ffn.set_mode("sparse")
        ffn.dynamic_drop_ratio = drop_ratio
        ffn.cache_centroids = True  # inference: computed once per version of the weights, not per forward
    return time.perf_counter() - t0


def set_top_k(model, top_k: int, drop_ratio: float = 0.0) -> None:
    """Change k (and the §5.3 drop ratio) of an already sparsified model without re-clustering."""
    for ffn in model.ffn_layers():
        ffn.configure_experts(ffn.num_experts, top_k)
        ffn.dynamic_drop_ratio = drop_ratio


def densify(model) -> None:
    for ffn in model.ffn_layers():
        to_neuron_order(ffn)
        ffn.set_mode("dense")
        ffn.dynamic_drop_ratio = 0.0
        ffn.cache_centroids = False
