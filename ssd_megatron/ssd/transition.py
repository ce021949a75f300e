"""Dense ↔ sparse transitions (paper §4.2). Lossless by construction.

Dense → sparse adopts each layer's clustering as its expert layout (the permutation buffer
`expert_perm`), moves the neurons into expert-major storage (ffn/expert_layout.py: parameters,
gradients and optimizer moments permuted together) and turns on the sparse path; sparse → dense moves
them back to neuron order and turns it off. A permutation is exact, so dense → sparse → dense leaves
every parameter and moment bit-identical, and no RNG or data position is touched. `optimizer` is the
one that holds the FFNs' parameters (None only without one, e.g. for inference).
"""
from __future__ import annotations

import time

from ..ffn.expert_layout import to_expert_major, to_neuron_order


def to_sparse(ffns, labels, optimizer) -> float:
    """Switch every FFN to its sparse form with the given per-layer clusterings; returns seconds."""
    t0 = time.perf_counter()
    if len(labels) != len(ffns):
        raise ValueError(f"got {len(labels)} clusterings for {len(ffns)} FFN layers")
    for ffn, lab in zip(ffns, labels):
        to_neuron_order(ffn, optimizer)
        ffn.set_clustering(lab)
        to_expert_major(ffn, optimizer)
        ffn.set_mode("sparse")
    return time.perf_counter() - t0


def to_dense(ffns, optimizer) -> float:
    """Switch every FFN back to dense computation in neuron order; returns seconds."""
    t0 = time.perf_counter()
    for ffn in ffns:
        to_neuron_order(ffn, optimizer)
        ffn.set_mode("dense")
    return time.perf_counter() - t0
