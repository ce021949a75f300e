"""Balanced k-means of FFN neurons (paper §4.2, eq. 3; appendix A "WCSS", "Clustering").

Each neuron j is row j of W_i (for GLU the caller passes the concatenated [gate, up] rows). Rows are
L2-normalised, then split into N clusters of exactly d_ff/N neurons by Lloyd iterations whose
assignment step is a *balanced* assignment (each cluster takes exactly `size` rows) minimising the
squared distance to the current centroids. WCSS (appendix A) is the sum of squared distances of the
normalised rows to their cluster mean.

Assignment methods (all exactly balanced; measured in docs/clustering.md):
- "greedy": the global greedy (sort all (neuron, cluster) pairs by distance, take each pair while the
  neuron is free and the cluster has room), computed as neuron-proposing deferred acceptance: when
  both sides rank pairs by the same cost the stable matching is unique and equals the greedy one, and
  deferred acceptance vectorises (a round = every free neuron proposes to its next viable cluster;
  each cluster keeps its `size` best).
- "auction": forward auction (Bertsekas) for "similar objects": neurons bid for clusters, a full
  cluster's price is its lowest held bid; all free neurons bid at once (Jacobi), so a round is a few
  dense tensor ops. Its tail of small price steps is long, so it is capped and finished greedily.
- "sinkhorn": entropic OT (log-domain Sinkhorn, column potentials carried across Lloyd iterations)
  gives cluster potentials g; the greedy on the adjusted cost `cost - g` rounds it to a partition.
Any of them can be followed by `polish_exchange` rounds (optimal pairwise exchanges between clusters),
which brings the greedy's single-step cost from a few % to well under 1% above the exact optimum.

Everything runs on the weights' device in float32 with fixed-shape tensor ops; host syncs happen only
for loop termination (every round/iteration on CPU, every few rounds on GPU). Results are
deterministic for fixed inputs, seed and device (stable sorts, no float atomics: centroids come from
sorting neurons by label and averaging `[N, size, d]` blocks, or from one-hot matmuls).

CPU note: the per-round tensors are small (n x N), so OpenMP fan-out costs more than it gains on a
busy 2-core machine; `torch.set_num_threads(1)` around clustering is measured faster there.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ssd_megatron.errors import UserError

BACKENDS = ("torch", "faiss")
ASSIGNMENTS = ("auction", "greedy", "sinkhorn")
DEFAULT_ASSIGNMENT = "greedy"  # chosen by measurement: docs/clustering.md
DEFAULT_ITERS = 50
DEFAULT_EXCHANGE_ROUNDS = 8


@dataclass
class ClusteringResult:
    """Result of a balanced clustering of `n` neurons into `N` clusters of `n/N`.

    `labels[j]` is the cluster of neuron (row) j, int64 on the input's device, canonical numbering
    (clusters numbered in order of their smallest neuron id, so equal partitions give equal labels).
    `centroids[c]` is the mean of cluster c's normalised rows (float32). `wcss` is appendix A's WCSS on
    the normalised rows. `start` says which initialisation produced it ("cold" or "warm");
    `candidates` maps each start that was run to its WCSS (cluster_neurons runs both).
    """

    labels: torch.Tensor
    wcss: float
    centroids: torch.Tensor
    seconds: float
    iterations: int = 0
    start: str = "cold"
    candidates: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# input handling


def _check_args(w: torch.Tensor, n_clusters: int, backend: str, assignment: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise UserError(f"clustering expects a 2-D weight matrix [d_ff, d_model], got {getattr(w, 'shape', type(w))}")
    n = w.shape[0]
    if not isinstance(n_clusters, int) or n_clusters < 1 or n_clusters > n or n % n_clusters:
        raise UserError(
            f"ssd.num_experts: cannot split {n} neurons into {n_clusters} equal experts "
            f"(need a positive divisor of d_ff={n})"
        )
    if backend not in BACKENDS:
        raise UserError(f"ssd.cluster_backend: unknown {backend!r}; accepted: {', '.join(BACKENDS)}")
    if assignment not in ASSIGNMENTS:
        raise UserError(f"ssd.cluster_assignment: unknown {assignment!r}; accepted: {', '.join(ASSIGNMENTS)}")


def normalize_rows(w: torch.Tensor) -> torch.Tensor:
    """float32 rows of unit L2 norm (zero rows stay zero)."""
    return F.normalize(w.detach().to(torch.float32), dim=1)


def _sync_every(device: torch.device) -> int:
    # A termination check is a host sync: free on CPU, ~10-50 us on GPU; extra rounds are no-ops.
    return 1 if device.type == "cpu" else 8


# --------------------------------------------------------------------------------------------------
# balanced assignment


def _sortable(key: torch.Tensor) -> torch.Tensor:
    """int64 with the same order as float32 `key` (IEEE bits, negatives flipped); in [0, 2^32)."""
    bits = key.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits + (1 << 31)) - 1, bits) + (1 << 31)


def _keep_best(cand_cluster: torch.Tensor, cand_key: torch.Tensor, size: int, k: int) -> torch.Tensor:
    """Bool mask: for each cluster, the `size` candidates with the largest key (ties: lower index).

    One int64 sort on (cluster, -key); rank within cluster = position - cluster start.
    """
    n = cand_cluster.numel()
    composite = (cand_cluster << 32) + ((1 << 32) - 1 - _sortable(cand_key))
    order = torch.sort(composite, stable=True).indices
    counts = torch.bincount(cand_cluster, minlength=k)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=cand_cluster.device)
    return rank - starts[cand_cluster] < size


def _top2(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(argmax, max, second max) along dim 1; two `max` passes (CPU topk is several times slower)."""
    v1, i1 = values.max(dim=1)
    v2 = values.scatter(1, i1[:, None], float("-inf")).max(dim=1).values
    return i1, v1, v2


def assign_greedy(cost: torch.Tensor, size: int, fixed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Global greedy balanced assignment (lowest-cost pairs first); returns labels `[n]`.

    Computed by deferred acceptance, which gives exactly the greedy result (the stable matching is
    unique when both sides rank pairs by the same cost); at most `k` proposals per neuron. `fixed`
    (labels, -1 = free) pins neurons that are already placed; free neurons fill the remaining room.
    """
    n, k = cost.shape
    pref = torch.argsort(cost, dim=1, stable=True)
    key_pref = -cost.gather(1, pref)  # [n, k]: neuron's key at each cluster, in its preference order
    col = torch.arange(k, device=cost.device)[None, :]
    ptr = torch.zeros(n, dtype=torch.long, device=cost.device)
    rows = torch.arange(n, device=cost.device)
    pinned = fixed is not None
    if pinned:
        is_fixed = fixed >= 0
        inf = torch.full((n,), float("inf"), device=cost.device)
    every = _sync_every(cost.device)
    for rnd in range(n * k + 1):
        cand = pref[rows, ptr]
        key = key_pref[rows, ptr]
        if pinned:
            cand = torch.where(is_fixed, fixed, cand)
            key = torch.where(is_fixed, inf, key)
        keep = _keep_best(cand, key, size, k)
        if (rnd + 1) % every == 0 and bool(keep.all()):
            return cand
        # Skip ahead: a full cluster only ever raises its cutoff (its size-th best key), so a rejected
        # neuron can jump past every cluster whose cutoff already beats it; the result is unchanged
        # (still exactly the greedy), it just takes far fewer rounds.
        kept_cl = torch.where(keep, cand, torch.full_like(cand, k))
        full = torch.bincount(kept_cl, minlength=k + 1)[:k] == size
        low = torch.full((k + 1,), float("inf"), device=cost.device).scatter_reduce(
            0, kept_cl, key, reduce="amin", include_self=True
        )[:k]
        cutoff = torch.where(full, low, torch.full_like(low, float("-inf")))
        viable = (key_pref >= cutoff[pref]) & (col > ptr[:, None])
        nxt = torch.argmax(viable.to(torch.uint8), dim=1)
        ptr = torch.where(keep, ptr, nxt)
    raise RuntimeError("greedy assignment did not converge")  # unreachable: proposals are finite


def _mean_gap(cost: torch.Tensor) -> torch.Tensor:
    """Mean gap between each row's best and second-best cost: the natural scale of a price."""
    _, v1, v2 = _top2(-cost)
    return (v1 - v2).mean() + 1e-12


def assign_auction(cost: torch.Tensor, size: int, eps: float = 0.1, max_rounds: int = 100) -> torch.Tensor:
    """Forward (Jacobi) auction, neurons bidding for cluster slots; returns labels `[n]`.

    A free neuron bids on its best cluster k1 (value = -cost - price) the amount
    `price(k1) + v1 - v2 + eps`; a cluster keeps its `size` highest bids; a full cluster's price is its
    lowest kept bid. `eps` is relative to the mean best-to-second-best cost gap. If neurons are still
    free after `max_rounds` (a Jacobi auction's tail of small price steps is long), they are placed by
    the greedy on the price-adjusted cost `cost + price` into the remaining room.

    Prices start at zero on every call: carrying them across Lloyd iterations was measured to slow
    convergence (a forward auction only raises prices, so a cluster left overpriced by the previous
    centroids stays underfull until every other price catches up).
    """
    n, k = cost.shape
    if k == 1:
        return torch.zeros(n, dtype=torch.long, device=cost.device)
    eps_t = _mean_gap(cost) * eps
    score = -cost
    prices = torch.zeros(k, device=cost.device)
    owner = torch.full((n,), -1, dtype=torch.long, device=cost.device)
    held = torch.zeros(n, device=cost.device)
    minus1 = torch.full_like(owner, -1)
    every = _sync_every(cost.device)
    done = False
    for rnd in range(max_rounds):
        free = owner < 0
        best, _, v2 = _top2(score - prices)
        bid = score.gather(1, best[:, None]).squeeze(1) - v2 + eps_t
        cand = torch.where(free, best, owner)
        key = torch.where(free, bid, held)
        keep = _keep_best(cand, key, size, k)
        owner = torch.where(keep, cand, minus1)
        held = torch.where(keep, key, held)
        kept_cl = torch.where(keep, cand, torch.full_like(cand, k))  # k = "dropped" bucket
        full = torch.bincount(kept_cl, minlength=k + 1)[:k] == size
        low = torch.full((k + 1,), float("inf"), device=cost.device).scatter_reduce(
            0, kept_cl, held, reduce="amin", include_self=True
        )[:k]
        prices = torch.where(full, torch.maximum(low, prices), prices)
        if (rnd + 1) % every == 0 and bool(keep.all()):
            done = True
            break
    if done:
        return owner
    return assign_greedy(cost + prices[None, :], size, fixed=owner)


class _SinkhornState:
    def __init__(self, k: int, device: torch.device):
        self.g = torch.zeros(k, device=device)


def assign_sinkhorn(
    cost: torch.Tensor,
    size: int,
    state: Optional[_SinkhornState] = None,
    iters: int = 10,
    reg: float = 0.3,
) -> torch.Tensor:
    """Entropic OT (rows mass 1, columns mass `size`), then greedy rounding on `cost - g`.

    `reg` (the temperature) is relative to the mean best-to-second-best cost gap, so it is scale-free;
    `state` carries the column potentials `g` between Lloyd iterations (warm start), which is what
    lets a few iterations per call suffice.
    """
    n, k = cost.shape
    if state is None:
        state = _SinkhornState(k, cost.device)
    temp = _mean_gap(cost) * reg
    c = cost / temp
    g = state.g / temp
    log_size = math.log(size)
    for _ in range(iters):
        f = -torch.logsumexp(g[None, :] - c, dim=1)
        g = log_size - torch.logsumexp(f[:, None] - c, dim=0)
    state.g = (g - g.mean()) * temp
    return assign_greedy(cost - state.g[None, :], size)


def polish_exchange(
    cost: torch.Tensor, labels: torch.Tensor, size: int, rounds: int = 8, max_moves: int = 16
) -> torch.Tensor:
    """Improve a balanced assignment by optimal pairwise exchanges between clusters.

    For clusters a, b the best exchange of t neurons pairs a's t cheapest moves to b with b's t
    cheapest moves to a (both sorted ascending); all t (up to `max_moves`) with a negative pair sum
    are taken. Each round every cluster picks the partner with the largest total gain; mutually
    chosen pairs (disjoint) exchange at once. Balance is preserved (equal numbers move each way); cost never increases.
    Fixed-shape tensor ops, so no host syncs except the early-exit check.
    """
    n, k = cost.shape
    if k == 1 or rounds <= 0:
        return labels
    ar = torch.arange(k, device=cost.device)
    m = min(size, max_moves)
    every = _sync_every(cost.device)
    for rnd in range(rounds):
        delta = cost - cost.gather(1, labels[:, None])  # [n, k]: cost change if neuron moves to b
        members = torch.argsort(labels, stable=True).view(k, size)  # [a, t]: neuron ids per cluster
        by_target = delta[members].transpose(1, 2)  # [a, b, t]
        # Only the few cheapest moves per pair can be part of an improving exchange; topk is ~3x
        # cheaper than a full sort, and a pair needing more than m exchanges gets them next round.
        d_sorted, idx = torch.topk(by_target, m, dim=2, largest=False, sorted=True)
        pair = d_sorted + d_sorted.transpose(0, 1)  # [a, b, t]: a's t-th move to b + b's t-th move to a
        gain = pair.clamp_max(0).sum(2)  # [a, b], symmetric, <= 0
        gain.fill_diagonal_(0)
        best_gain, partner = gain.min(1)
        mutual = (partner[partner] == ar) & (best_gain < 0)
        movers = members.gather(1, idx[ar, partner])  # a's neurons sorted by cost of moving to partner
        move = (pair[ar, partner] < 0) & mutual[:, None]
        target = torch.where(move, partner[:, None].expand(k, m), labels[movers])
        labels = labels.scatter(0, movers.reshape(-1), target.reshape(-1))
        if (rnd + 1) % every == 0 and not bool(mutual.any()):
            break
    return labels


def balanced_assignment(
    cost: torch.Tensor,
    size: int,
    method: str = DEFAULT_ASSIGNMENT,
    exchange_rounds: int = DEFAULT_EXCHANGE_ROUNDS,
    state: Optional[_SinkhornState] = None,
) -> torch.Tensor:
    """One balanced E-step: labels `[n]` giving each of the k clusters exactly `size` rows of `cost`
    `[n, k]` (lower is better), by `method`, then `exchange_rounds` rounds of `polish_exchange`."""
    if method == "auction":
        labels = assign_auction(cost, size)
    elif method == "greedy":
        labels = assign_greedy(cost, size)
    elif method == "sinkhorn":
        labels = assign_sinkhorn(cost, size, state)
    else:
        raise UserError(f"ssd.cluster_assignment: unknown {method!r}; accepted: {', '.join(ASSIGNMENTS)}")
    return polish_exchange(cost, labels, size, exchange_rounds)


# --------------------------------------------------------------------------------------------------
# Lloyd iterations


def _sq_cost(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """||x - c||^2 - ||x||^2 = ||c||^2 - 2 x.c  (`[n, k]`); the dropped term is constant per row."""
    return (centroids * centroids).sum(1)[None, :] - 2.0 * (x @ centroids.T)


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster row sums `[k, d]`, deterministic on every device.

    CPU: index_add_ (a serial, ordered accumulation; ~5x faster than a one-hot matmul at 16k x 4k).
    CUDA: index_add_ uses float atomics (run-to-run differences), so a one-hot matmul instead.
    """
    if x.device.type == "cpu":
        return torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    return F.one_hot(labels, k).to(x.dtype).T @ x


def _balanced_means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    return _cluster_sums(x, labels, k) / (x.shape[0] // k)


def _means_from_labels(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster means and sizes for arbitrary (possibly unbalanced) labels."""
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    return _cluster_sums(x, labels, k) / counts.clamp_min(1.0)[:, None], counts


def _sq_norm_total(x: torch.Tensor) -> float:
    """sum ||x_i||^2: float32 per row, float64 across rows (accurate, no float64 copy of x)."""
    return float((x * x).sum(1).double().sum())


def wcss(x: torch.Tensor, labels: torch.Tensor, n_clusters: int, normalize: bool = True) -> float:
    """Appendix A WCSS: sum over clusters of squared distances of (normalised) rows to the cluster mean.

    Direct deviations (no cancellation), float32 per row, float64 across rows; works for unbalanced
    labels too.
    """
    x = normalize_rows(x) if normalize else x.to(torch.float32)
    labels = labels.to(device=x.device, dtype=torch.long)
    means, _ = _means_from_labels(x, labels, n_clusters)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    chunk = max(1, (1 << 22) // max(1, x.shape[1]))
    for s in range(0, x.shape[0], chunk):
        diff = x[s : s + chunk] - means[labels[s : s + chunk]]
        total += (diff * diff).sum(1).double().sum()
    return float(total)


def _kmeans_pp(x: torch.Tensor, k: int, seed: int, points_per_centroid: int = 64) -> torch.Tensor:
    """k-means++ seeding with CPU-generated randomness (same picks on every device), no host syncs.

    Seeds from a seeded subsample of at most `points_per_centroid * k` rows: k sequential passes over
    all 16k x 4k rows cost ~1 s on one core, and the Lloyd steps that follow use every row anyway.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if x.shape[0] > points_per_centroid * k:
        sub = torch.randperm(x.shape[0], generator=gen)[: points_per_centroid * k].sort().values
        x = x[sub.to(x.device)]
    u = torch.rand(k, generator=gen, dtype=torch.float64).to(x.device)
    n = x.shape[0]
    sq = (x * x).sum(1)
    idx = (u[0] * n).long().clamp_max(n - 1).reshape(1)
    picks = [idx]
    c = x[idx].squeeze(0)
    d2 = (sq + (c * c).sum() - 2.0 * (x @ c)).clamp_min(0).double()
    for i in range(1, k):
        cdf = torch.cumsum(d2, 0)
        idx = torch.searchsorted(cdf, (u[i] * cdf[-1]).reshape(1)).clamp_max(n - 1)
        picks.append(idx)
        c = x[idx].squeeze(0)
        d2 = torch.minimum(d2, (sq + (c * c).sum() - 2.0 * (x @ c)).clamp_min(0).double())
    return x[torch.cat(picks)]


def _lloyd_unbalanced(x: torch.Tensor, cents: torch.Tensor, iters: int) -> torch.Tensor:
    k = cents.shape[0]
    for _ in range(iters):
        labels = _sq_cost(x, cents).argmin(1)
        means, counts = _means_from_labels(x, labels, k)
        cents = torch.where(counts[:, None] > 0, means, cents)  # an empty cluster keeps its centroid
    return cents


def _faiss_kmeans(x: torch.Tensor, k: int, seed: int, iters: int) -> torch.Tensor:
    try:
        import faiss  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UserError(
            "ssd.cluster_backend: 'faiss' selected but faiss is not installed "
            "(pip install faiss-cpu, or faiss-gpu); or use 'torch'"
        ) from e
    import numpy as np

    data = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    use_gpu = x.is_cuda and hasattr(faiss, "StandardGpuResources")
    km = faiss.Kmeans(
        data.shape[1], k, niter=iters, nredo=1, seed=int(seed) & 0x7FFFFFFF, gpu=bool(use_gpu),
        max_points_per_centroid=max(256, data.shape[0] // k + 1), verbose=False,
    )
    km.train(data)
    return torch.from_numpy(np.array(km.centroids, dtype=np.float32)).to(x.device)


def _canonical(labels: torch.Tensor, cents: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Renumber clusters by their smallest neuron id (stable, representation-independent labels)."""
    n = labels.numel()
    first = torch.full((k,), n, dtype=torch.long, device=labels.device).scatter_reduce(
        0, labels, torch.arange(n, device=labels.device), reduce="amin", include_self=True
    )
    order = torch.argsort(first, stable=True)  # new id i <- old id order[i]
    new_id = torch.empty_like(order)
    new_id[order] = torch.arange(k, device=labels.device)
    return new_id[labels], cents[order]


def _refine(
    x: torch.Tensor,
    cents: torch.Tensor,
    size: int,
    iters: int,
    assignment: str,
    tol: float,
    start_labels: Optional[torch.Tensor] = None,
    exchange_rounds: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Balanced Lloyd iterations from `cents`; returns the best (labels, centroids, objective, iters).

    `start_labels` (a balanced partition, e.g. the previous clustering) is itself a candidate, so a
    warm start never returns a partition worse than the one it started from.
    """
    k = cents.shape[0]
    sq_norm = _sq_norm_total(x)
    state = _SinkhornState(k, x.device)
    best = (None, None, math.inf)
    if start_labels is not None:
        obj0 = sq_norm - size * float((cents.double() ** 2).sum())
        best = (start_labels, cents, obj0)
    prev_labels = None
    stall = 0
    it = 0
    for it in range(1, iters + 1):
        cost = _sq_cost(x, cents)
        labels = balanced_assignment(cost, size, assignment, exchange_rounds, state)
        cents = _balanced_means(x, labels, k)
        # WCSS of balanced means: sum ||x||^2 - size * sum ||c||^2 (tracking only; reported WCSS is direct).
        obj = sq_norm - size * float((cents.double() ** 2).sum())
        if obj < best[2] - 1e-9 * max(1.0, abs(obj)):
            improved = best[2] - obj
            best = (labels, cents, obj)
            stall = 0 if improved > tol * max(1.0, abs(obj)) else stall + 1
        else:
            stall += 1
        if prev_labels is not None and torch.equal(labels, prev_labels):
            break
        if stall >= 3:
            break
        prev_labels = labels
    return best[0], best[1], best[2], it


def balanced_kmeans(
    w: torch.Tensor,
    n_clusters: int,
    *,
    init_labels: Optional[torch.Tensor] = None,
    init_centroids: Optional[torch.Tensor] = None,
    iters: int = DEFAULT_ITERS,
    seed: int = 0,
    backend: str = "torch",
    assignment: str = DEFAULT_ASSIGNMENT,
    init_iters: int = 10,
    tol: float = 1e-5,
    exchange_rounds: int = DEFAULT_EXCHANGE_ROUNDS,
    normalize: bool = True,
) -> ClusteringResult:
    """Balanced k-means of the L2-normalised rows of `w` `[n, d]` into `n_clusters` clusters of `n/N`.

    Initial centroids: the means implied by `init_labels` (warm start), else `init_centroids`, else a
    cold start: k-means++ (seeded) plus `init_iters` unbalanced Lloyd steps (backend "torch", on `w`'s
    device) or faiss k-means with `init_iters` iterations (backend "faiss"). Then at most `iters`
    balanced Lloyd iterations with the chosen `assignment`, each followed by at most
    `exchange_rounds` rounds of `polish_exchange` (0 = off); stops early when labels repeat or WCSS
    stops improving (relative `tol` for 3 iterations); returns the best iterate.
    """
    _check_args(w, n_clusters, backend, assignment)
    t0 = time.perf_counter()
    x = normalize_rows(w) if normalize else w.detach().to(torch.float32)
    n = x.shape[0]
    k = n_clusters
    size = n // k
    start = "cold"
    start_labels = None
    if init_labels is not None:
        lab = torch.as_tensor(init_labels).to(device=x.device, dtype=torch.long).reshape(-1)
        if lab.numel() != n or int(lab.min()) < 0 or int(lab.max()) >= k:
            raise ValueError(f"init_labels must be {n} ints in [0, {k}), got {tuple(lab.shape)}")
        cents, counts = _means_from_labels(x, lab, k)
        if bool((counts == size).all()):
            start_labels = lab
        start = "warm"
    elif init_centroids is not None:
        cents = init_centroids.to(device=x.device, dtype=torch.float32)
        start = "warm"
    elif backend == "faiss":
        cents = _faiss_kmeans(x, k, seed, max(1, init_iters))
    else:
        cents = _lloyd_unbalanced(x, _kmeans_pp(x, k, seed), init_iters)
    if k == 1:
        labels = torch.zeros(n, dtype=torch.long, device=x.device)
        cents, iters_run = x.mean(0, keepdim=True), 0
    else:
        labels, cents, _, iters_run = _refine(
            x, cents, size, max(1, iters), assignment, tol, start_labels, exchange_rounds
        )
    labels, cents = _canonical(labels, cents, k)
    value = wcss(x, labels, k, normalize=False)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return ClusteringResult(
        labels=labels, wcss=value, centroids=cents, seconds=time.perf_counter() - t0,
        iterations=iters_run, start=start, candidates={start: value},
    )


def cluster_neurons(
    w: torch.Tensor,
    n_clusters: int,
    prev_labels: Optional[torch.Tensor] = None,
    *,
    warm_tolerance: float = 0.0,
    **kwargs,
) -> ClusteringResult:
    """Paper eq. 3: cold start, plus a warm start from `prev_labels` when given; keep the lower WCSS.

    `kwargs` go to `balanced_kmeans` (iters, seed, backend, assignment, exchange_rounds, ...). The
    result's `start` says which won and `candidates` holds both WCSS values; ties go to the warm start.
    With the default `warm_tolerance=0` the returned WCSS is never above the cold start's (the paper's
    rule). `warm_tolerance > 0` (relative, opt-in) keeps the warm result unless the cold one is better
    by more than that fraction: on weakly clustered weights the two often differ by ~0.01% while the
    cold labels share little with the previous ones, which drags the monitor's ARI down.
    """
    if warm_tolerance < 0:
        raise UserError(f"ssd.warm_tolerance must be >= 0, got {warm_tolerance}")
    t0 = time.perf_counter()
    kwargs.pop("init_labels", None)
    cold = balanced_kmeans(w, n_clusters, **kwargs)
    best = cold
    cands = {"cold": cold.wcss}
    if prev_labels is not None:
        warm = balanced_kmeans(w, n_clusters, init_labels=prev_labels, **kwargs)
        cands["warm"] = warm.wcss
        if warm.wcss <= cold.wcss * (1.0 + warm_tolerance):
            best = warm
    best.candidates = cands
    best.seconds = time.perf_counter() - t0
    return best


def labels_to_permutation(labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """`expert_perm` for `SwitchableFFN`: neurons of expert c are `perm[c*E:(c+1)*E]`, ascending ids."""
    labels = labels.to(torch.long)
    counts = torch.bincount(labels, minlength=n_clusters)
    if counts.numel() != n_clusters or bool((counts != labels.numel() // n_clusters).any()):
        raise ValueError(f"labels are not a balanced partition into {n_clusters} clusters: {counts.tolist()}")
    return torch.argsort(labels, stable=True)
