"""Dense ↔ sparse transitions (paper §4.2). Lossless by construction.

Dense → sparse adopts each layer's clustering as its expert layout (a permutation buffer) and turns
on the sparse path; sparse → dense turns it off. Neither touches a parameter, an optimizer moment, an
RNG or the data position: the experts are views of the same W_i/W_o rows gathered through the
permutation, so the neurons' optimizer state simply stays where it is.
"""
from __future__ import annotations

import time


def to_sparse(ffns, labels) -> float:
    """Switch every FFN to its sparse form with the given per-layer clusterings; returns seconds."""
    t0 = time.perf_counter()
    if len(labels) != len(ffns):
        raise ValueError(f"got {len(labels)} clusterings for {len(ffns)} FFN layers")
    for ffn, lab in zip(ffns, labels):
        ffn.set_clustering(lab)
        ffn.set_mode("sparse")
    return time.perf_counter() - t0


def to_dense(ffns) -> float:
    """Switch every FFN back to dense computation (concatenating the experts is a no-op here)."""
    t0 = time.perf_counter()
    for ffn in ffns:
        ffn.set_mode("dense")
    return time.perf_counter() - t0
