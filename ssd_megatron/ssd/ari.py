"""Adjusted Rand Index between two clusterings of the same neurons (paper §3, §4.3).

SSD's monitor compares the clustering of W_i at two checkpoints; both labelings must be indexed by the
same fixed neuron identity (row j of W_i is neuron j at every checkpoint). Label *names* do not matter:
ARI is invariant to renaming clusters.

Computed from the contingency table in O(n + Ka*Kb): one bincount over `a*Kb + b`, then pair counts.
Never enumerate pairs (134 M of them at n = 16 384). The arithmetic on pair counts is done on Python
integers so that it is exact for any n, and the formula is sklearn's pair-confusion form, so results
(including degenerate cases) match `sklearn.metrics.adjusted_rand_score`.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

Labels = Union[torch.Tensor, np.ndarray, Sequence[int]]


def _as_numpy(labels: Labels, name: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().to("cpu").numpy()
    else:
        arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D labeling, got shape {tuple(arr.shape)}")
    return arr


def _dense_ids(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """Map arbitrary labels to 0..K-1. Fast path for small non-negative integer labels (the SSD case)."""
    if arr.size and np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi < 4 * arr.size + 1024:
            present = np.bincount(arr, minlength=hi + 1) > 0
            remap = np.cumsum(present) - 1
            return remap[arr].astype(np.int64), int(present.sum())
    uniq, inv = np.unique(arr, return_inverse=True)
    return inv.reshape(-1).astype(np.int64), int(uniq.size)


def contingency_table(a: Labels, b: Labels) -> np.ndarray:
    """`[Ka, Kb]` int64 table: entry (i, j) = number of items in cluster i of `a` and cluster j of `b`."""
    xa, xb = _as_numpy(a, "a"), _as_numpy(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"labelings differ in length: {xa.shape[0]} vs {xb.shape[0]}")
    ia, ka = _dense_ids(xa)
    ib, kb = _dense_ids(xb)
    return np.bincount(ia * kb + ib, minlength=ka * kb).reshape(ka, kb)


def adjusted_rand_index(a: Labels, b: Labels) -> float:
    """ARI of two labelings of the same items; equals `sklearn.metrics.adjusted_rand_score(a, b)`.

    1.0 for identical partitions (up to renaming), ~0 in expectation for independent random ones,
    at least -0.5. Degenerate inputs follow sklearn: when no pair is split by one labeling and joined
    by the other (e.g. both a single cluster, both all singletons, or n <= 1) the result is 1.0.
    """
    table = contingency_table(a, b)
    n = int(table.sum())
    # Pair counts over ordered pairs, as in sklearn's pair_confusion_matrix.
    sum_sq = int((table.astype(np.int64) ** 2).sum())
    rows = table.sum(axis=1).astype(np.int64)
    cols = table.sum(axis=0).astype(np.int64)
    same_a = int((rows**2).sum()) - sum_sq  # pairs together in a, apart in b ("fn")
    same_b = int((cols**2).sum()) - sum_sq  # pairs apart in a, together in b ("fp")
    tp = sum_sq - n
    tn = n * n - same_a - same_b - sum_sq
    fn, fp = same_a, same_b
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def pairwise_ari(labelings: Sequence[Labels]) -> np.ndarray:
    """Symmetric `[M, M]` float64 matrix of ARI between every pair of labelings (paper Fig. 1c).

    Typical use: the clusterings of one layer at M checkpoints; the diagonal is 1.
    """
    m = len(labelings)
    out = np.eye(m, dtype=np.float64)
    arrays = [_as_numpy(x, f"labelings[{i}]") for i, x in enumerate(labelings)]
    for i in range(m):
        for j in range(i + 1, m):
            out[i, j] = out[j, i] = adjusted_rand_index(arrays[i], arrays[j])
    return out


def mean_ari(prev: Sequence[Labels], cur: Sequence[Labels]) -> float:
    """Mean over layers of the ARI between each layer's previous and current labels (the monitor's signal)."""
    if len(prev) != len(cur) or not cur:
        raise ValueError(f"need one previous and one current labeling per layer, got {len(prev)} and {len(cur)}")
    return float(np.mean([adjusted_rand_index(p, c) for p, c in zip(prev, cur)]))
