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

Batching: every routine works on a leading batch of independent problems (`[B, n, K]` costs), one
kernel per op for the whole batch; different problems meet only in the flat sort/bincount/scatter
steps, through cluster ids offset by `b*K`. `cluster_layers` runs the cold and warm starts of all
layers as one batch: on a GPU the per-op launch cost, not arithmetic, is what a single 6144 x 32
problem pays for, so batching is what makes all layers fast.

Everything runs on the weights' device in float32 with fixed-shape tensor ops; host syncs happen only
for loop termination (every round/iteration on CPU, every few rounds on GPU). Results are
deterministic for identical calls (inputs, seed, device, batch composition): stable sorts, no float
atomics (cluster sums use index_add_ on CPU, one-hot matmuls on CUDA).

CPU note: the per-round tensors are small, so on a busy shared 2-core machine OpenMP fan-out can cost
more than it gains; `torch.set_num_threads(1)` around clustering was measured faster there.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ssd_megatron.errors import UserError

BACKENDS = ("torch", "faiss")
ASSIGNMENTS = ("auction", "greedy", "sinkhorn")
DEFAULT_ASSIGNMENT = "greedy"  # chosen by measurement: docs/clustering.md
DEFAULT_EXCHANGE_ROUNDS = 8
DEFAULT_ITERS = 50
# Normalised copies of the rows of one batch stay under this many bytes (larger sets are chunked).
BATCH_BYTES = 1 << 30


@dataclass
class ClusteringResult:
    """Result of a balanced clustering of `n` neurons into `N` clusters of `n/N`.

    `labels[j]` is the cluster of neuron (row) j, int64 on the input's device, canonical numbering
    (clusters numbered in order of their smallest neuron id, so equal partitions give equal labels).
    `centroids[c]` is the mean of cluster c's normalised rows (float32). `wcss` is appendix A's WCSS on
    the normalised rows. `start` says which initialisation produced it ("cold" or "warm");
    `candidates` maps each start that was run to its WCSS (eq. 3 runs both). `seconds` is the wall
    time of the call that produced it (for a batched call, the whole batch).
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


def _check_args(w, n_clusters: int, backend: str, assignment: str) -> None:
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
    return F.normalize(w.detach().to(torch.float32), dim=-1)


def _sync_every(device: torch.device) -> int:
    # A termination check is a host sync: free on CPU, ~10-50 us on GPU; extra rounds are no-ops.
    return 1 if device.type == "cpu" else 8


def _batched(fn):
    """Let a routine written for `[B, n, K]` costs also take a single `[n, K]` problem."""

    def wrapper(cost, *args, **kwargs):
        if cost.dim() == 2:
            args = [a.unsqueeze(0) if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            return fn(cost.unsqueeze(0), *args, **kwargs).squeeze(0)
        return fn(cost, *args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _ordered_index_add(device: torch.device) -> bool:
    """index_add_ accumulates in a fixed order on CPU only (CUDA uses float atomics)."""
    return device.type == "cpu"


def _problems_per_batch(device: torch.device, rows: int, cols: int) -> int:
    """CPU: one problem at a time (see _solve_chunked); GPU: as many as fit in BATCH_BYTES."""
    return 1 if device.type == "cpu" else max(1, BATCH_BYTES // (4 * rows * cols))


def _offsets(b: int, k: int, device) -> torch.Tensor:
    return (torch.arange(b, device=device) * k)[:, None]  # [B, 1]: cluster id offset of problem b


# --------------------------------------------------------------------------------------------------
# balanced assignment


def _sortable(key: torch.Tensor) -> torch.Tensor:
    """int64 with the same order as float32 `key` (IEEE bits, negatives flipped); in [0, 2^32)."""
    bits = key.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits + (1 << 31)) - 1, bits) + (1 << 31)


def _keep_best(cand: torch.Tensor, key: torch.Tensor, size: int, k: int) -> torch.Tensor:
    """Bool `[B, n]`: in each problem, for each cluster, the `size` candidates with the largest key
    (ties: lower index). One int64 sort on (problem, cluster, -key); rank = position - group start."""
    b, n = cand.shape
    group = (cand + _offsets(b, k, cand.device)).reshape(-1)
    composite = (group << 32) + ((1 << 32) - 1 - _sortable(key.reshape(-1)))
    order = torch.sort(composite, stable=True).indices
    counts = torch.bincount(group, minlength=b * k)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(b * n, device=cand.device)
    return (rank - starts[group] < size).view(b, n)


def _group_stats(cand: torch.Tensor, keep: torch.Tensor, key: torch.Tensor, size: int, k: int):
    """Per (problem, cluster): (full `[B, K]` bool, lowest kept key `[B, K]`)."""
    b = cand.shape[0]
    dropped = b * k  # one extra bucket for candidates that were not kept
    group = torch.where(keep, cand + _offsets(b, k, cand.device), torch.full_like(cand, dropped)).reshape(-1)
    full = (torch.bincount(group, minlength=dropped + 1)[:dropped] == size).view(b, k)
    low = torch.full((dropped + 1,), float("inf"), device=cand.device, dtype=key.dtype).scatter_reduce(
        0, group, key.reshape(-1), reduce="amin", include_self=True
    )[:dropped].view(b, k)
    return full, low


def _top2(values: torch.Tensor):
    """(argmax, max, second max) along the last dim; two `max` passes (CPU topk is several times slower)."""
    v1, i1 = values.max(dim=-1)
    v2 = values.scatter(-1, i1.unsqueeze(-1), float("-inf")).max(dim=-1).values
    return i1, v1, v2


@_batched
def assign_greedy(cost: torch.Tensor, size: int, fixed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Global greedy balanced assignment (lowest-cost pairs first): labels `[n]` (or `[B, n]`).

    Computed by deferred acceptance, which gives exactly the greedy result (the stable matching is
    unique when both sides rank pairs by the same cost); at most `k` proposals per neuron. `fixed`
    (labels, -1 = free) pins neurons that are already placed; free neurons fill the remaining room.
    """
    b, n, k = cost.shape
    pref = torch.argsort(cost, dim=2, stable=True)
    key_pref = -cost.gather(2, pref)  # neuron's key at each cluster, in its preference order
    col = torch.arange(k, device=cost.device)
    ptr = torch.zeros(b, n, dtype=torch.long, device=cost.device)
    if fixed is not None:
        is_fixed = fixed >= 0
        inf = torch.full((b, n), float("inf"), device=cost.device)
    every = _sync_every(cost.device)
    for rnd in range(n * k + 1):
        cand = pref.gather(2, ptr.unsqueeze(2)).squeeze(2)
        key = key_pref.gather(2, ptr.unsqueeze(2)).squeeze(2)
        if fixed is not None:
            cand = torch.where(is_fixed, fixed, cand)
            key = torch.where(is_fixed, inf, key)
        keep = _keep_best(cand, key, size, k)
        if (rnd + 1) % every == 0 and bool(keep.all()):
            return cand
        # Skip ahead: a full cluster only ever raises its cutoff (its size-th best key), so a rejected
        # neuron can jump past every cluster whose cutoff already beats it; the result is unchanged
        # (still exactly the greedy), it just takes far fewer rounds.
        full, low = _group_stats(cand, keep, key, size, k)
        cutoff = torch.where(full, low, torch.full_like(low, float("-inf")))
        viable = (key_pref >= cutoff.gather(1, pref.view(b, -1)).view(b, n, k)) & (col > ptr.unsqueeze(2))
        ptr = torch.where(keep, ptr, torch.argmax(viable.to(torch.uint8), dim=2))
    raise RuntimeError("greedy assignment did not converge")  # unreachable: proposals are finite


def _mean_gap(cost: torch.Tensor) -> torch.Tensor:
    """Per problem `[B, 1, 1]`: mean gap between each row's best and second-best cost, the natural
    scale of a price."""
    _, v1, v2 = _top2(-cost)
    return (v1 - v2).mean(dim=1).view(-1, 1, 1) + 1e-12


@_batched
def assign_auction(cost: torch.Tensor, size: int, eps: float = 0.1, max_rounds: int = 100) -> torch.Tensor:
    """Forward (Jacobi) auction, neurons bidding for cluster slots: labels `[n]` (or `[B, n]`).

    A free neuron bids on its best cluster k1 (value = -cost - price) the amount
    `price(k1) + v1 - v2 + eps`; a cluster keeps its `size` highest bids; a full cluster's price is its
    lowest kept bid. `eps` is relative to the mean best-to-second-best cost gap. If neurons are still
    free after `max_rounds` (a Jacobi auction's tail of small price steps is long), they are placed by
    the greedy on the price-adjusted cost `cost + price` into the remaining room.

    Prices start at zero on every call: carrying them across Lloyd iterations was measured to slow
    convergence (a forward auction only raises prices, so a cluster left overpriced by the previous
    centroids stays underfull until every other price catches up).
    """
    b, n, k = cost.shape
    if k == 1:
        return torch.zeros(b, n, dtype=torch.long, device=cost.device)
    eps_t = _mean_gap(cost).view(b, 1) * eps
    score = -cost
    prices = torch.zeros(b, k, device=cost.device)
    owner = torch.full((b, n), -1, dtype=torch.long, device=cost.device)
    held = torch.zeros(b, n, device=cost.device)
    minus1 = torch.full_like(owner, -1)
    every = _sync_every(cost.device)
    done = False
    for rnd in range(max_rounds):
        free = owner < 0
        best, _, v2 = _top2(score - prices.unsqueeze(1))
        bid = score.gather(2, best.unsqueeze(2)).squeeze(2) - v2 + eps_t
        cand = torch.where(free, best, owner)
        key = torch.where(free, bid, held)
        keep = _keep_best(cand, key, size, k)
        owner = torch.where(keep, cand, minus1)
        held = torch.where(keep, key, held)
        full, low = _group_stats(cand, keep, held, size, k)
        prices = torch.where(full, torch.maximum(low, prices), prices)
        if (rnd + 1) % every == 0 and bool(keep.all()):
            done = True
            break
    if done:
        return owner
    return assign_greedy(cost + prices.unsqueeze(1), size, fixed=owner)


class _SinkhornState:
    def __init__(self, b: int, k: int, device: torch.device):
        self.g = torch.zeros(b, k, device=device)


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
    lets a few iterations per call suffice. Labels `[n]` (or `[B, n]`).
    """
    single = cost.dim() == 2
    if single:
        cost = cost.unsqueeze(0)
    b, n, k = cost.shape
    if state is None:
        state = _SinkhornState(b, k, cost.device)
    temp = _mean_gap(cost) * reg  # [B, 1, 1]
    c = cost / temp
    g = state.g / temp.view(b, 1)
    log_size = math.log(size)
    for _ in range(iters):
        f = -torch.logsumexp(g.unsqueeze(1) - c, dim=2)  # [B, n]
        g = log_size - torch.logsumexp(f.unsqueeze(2) - c, dim=1)  # [B, K]
    state.g = (g - g.mean(dim=1, keepdim=True)) * temp.view(b, 1)
    labels = assign_greedy(cost - state.g.unsqueeze(1), size)
    return labels.squeeze(0) if single else labels


@_batched
def polish_exchange(
    cost: torch.Tensor, labels: torch.Tensor, size: int, rounds: int = 8, max_moves: int = 16
) -> torch.Tensor:
    """Improve a balanced assignment by optimal pairwise exchanges between clusters.

    For clusters a, b the best exchange of t neurons pairs a's t cheapest moves to b with b's t
    cheapest moves to a (both sorted ascending); all t (up to `max_moves`) with a negative pair sum
    are taken. Each round every cluster picks as partner the cluster with the best first exchange
    (cheapest move each way: a segment-min over [n, K], not a top-k over all K^2 pairs); mutually
    chosen pairs (disjoint) then make their full exchange. Balance is preserved (equal numbers move
    each way); cost never increases. Fixed-shape tensor ops: no host syncs but the early-exit check.
    """
    b, n, k = cost.shape
    if k == 1 or rounds <= 0:
        return labels
    ar = torch.arange(k, device=cost.device)
    offs = _offsets(b, k, cost.device)
    not_self = ~torch.eye(k, dtype=torch.bool, device=cost.device)
    m = min(size, max_moves)
    every = _sync_every(cost.device)
    for rnd in range(rounds):
        delta = cost - cost.gather(2, labels.unsqueeze(2))  # [B, n, K]: cost change if i moves to b
        group = (labels + offs).reshape(-1, 1).expand(-1, k)
        cheapest = torch.zeros(b * k, k, device=cost.device, dtype=cost.dtype).scatter_reduce(
            0, group, delta.reshape(-1, k), reduce="amin", include_self=False
        ).view(b, k, k)  # [B, a, b]: cheapest move of one of a's neurons to b
        first = torch.where(not_self, cheapest + cheapest.transpose(1, 2), torch.zeros_like(cheapest))
        best_gain, partner = first.min(2)  # [B, K]
        mutual = (partner.gather(1, partner) == ar) & (best_gain < 0)
        members = torch.argsort(labels, dim=1, stable=True).view(b, k, size)  # neuron ids per cluster
        to_partner = delta.gather(2, partner.gather(1, labels).unsqueeze(2)).squeeze(2)  # [B, n]
        moves, idx = torch.topk(to_partner.gather(1, members.view(b, n)).view(b, k, size), m, dim=2,
                                largest=False, sorted=True)  # a's cheapest moves to its partner
        pair = moves + moves.gather(1, partner.unsqueeze(2).expand(b, k, m))  # t-th move each way
        move = (pair < 0) & mutual.unsqueeze(2)
        movers = members.gather(2, idx)  # [B, K, m]
        current = labels.gather(1, movers.view(b, -1)).view(b, k, m)
        target = torch.where(move, partner.unsqueeze(2).expand(b, k, m), current)
        labels = labels.scatter(1, movers.view(b, -1), target.view(b, -1))
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
    """One balanced E-step: labels giving each of the K clusters exactly `size` rows of `cost`
    (`[n, K]` or `[B, n, K]`, lower is better), by `method`, then `exchange_rounds` of exchanges."""
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
# Lloyd iterations (all batched: x [B, n, d], centroids [B, K, d], labels [B, n])


def _sq_cost(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """||x - c||^2 - ||x||^2 = ||c||^2 - 2 x.c; the dropped term is constant per row."""
    return (centroids * centroids).sum(-1).unsqueeze(-2) - 2.0 * (x @ centroids.transpose(-1, -2))


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster row sums `[B, K, d]`, deterministic on every device.

    CPU: index_add_ (a serial, ordered accumulation; ~5x faster than a one-hot matmul at 16k x 4k).
    CUDA: index_add_ uses float atomics (run-to-run differences), so a one-hot matmul instead.
    """
    b, n, d = x.shape
    if _ordered_index_add(x.device):
        flat = (labels + _offsets(b, k, x.device)).reshape(-1)
        return torch.zeros(b * k, d, dtype=x.dtype).index_add_(0, flat, x.reshape(-1, d)).view(b, k, d)
    return F.one_hot(labels, k).to(x.dtype).transpose(1, 2) @ x


def _means_from_labels(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster means `[B, K, d]` and sizes `[B, K]` for arbitrary (possibly unbalanced) labels."""
    b = x.shape[0]
    flat = (labels + _offsets(b, k, x.device)).reshape(-1)
    counts = torch.bincount(flat, minlength=b * k).view(b, k).to(x.dtype)
    return _cluster_sums(x, labels, k) / counts.clamp_min(1.0).unsqueeze(2), counts


def _wcss_batch(x: torch.Tensor, labels: torch.Tensor, k: int) -> list:
    """Appendix A WCSS per problem: direct deviations from the means (no cancellation), float32 per
    row, float64 across rows."""
    b, n, d = x.shape
    means, _ = _means_from_labels(x, labels, k)
    total = torch.zeros(b, dtype=torch.float64, device=x.device)
    chunk = max(1, (1 << 22) // max(1, b * d))
    for s in range(0, n, chunk):
        lab = labels[:, s : s + chunk]
        diff = x[:, s : s + chunk] - means.gather(1, lab.unsqueeze(2).expand(-1, -1, d))
        total += (diff * diff).sum(2).double().sum(1)
    return total.tolist()


def wcss(w: torch.Tensor, labels: torch.Tensor, n_clusters: int, normalize: bool = True) -> float:
    """Appendix A WCSS of `labels` on the (L2-normalised) rows of `w` `[n, d]`; any labels in [0, N)."""
    x = normalize_rows(w) if normalize else w.detach().to(torch.float32)
    return _wcss_batch(x.unsqueeze(0), labels.to(device=x.device, dtype=torch.long).view(1, -1), n_clusters)[0]


def _kmeans_pp(x: torch.Tensor, k: int, seeds: Sequence[int], points_per_centroid: int = 64) -> torch.Tensor:
    """k-means++ seeding `[B, K, d]` with CPU-generated randomness per problem (same picks on every
    device), no host syncs. Seeds from a seeded subsample of at most `points_per_centroid * k` rows:
    k sequential passes over all 16k x 4k rows cost ~1 s on one core, and the Lloyd steps that
    follow use every row anyway."""
    b, n, d = x.shape
    m = min(n, points_per_centroid * k)
    subs, us = [], []
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        subs.append(torch.randperm(n, generator=gen)[:m].sort().values if m < n else torch.arange(n))
        us.append(torch.rand(k, generator=gen, dtype=torch.float64))
    sub = torch.stack(subs).to(x.device)
    u = torch.stack(us).to(x.device)  # [B, K]
    xs = x.gather(1, sub.unsqueeze(2).expand(b, m, d))  # [B, m, d]
    sq = (xs * xs).sum(2)

    def dist2(c):  # c: [B, d] -> [B, m]
        return (sq + (c * c).sum(1, keepdim=True) - 2.0 * (xs @ c.unsqueeze(2)).squeeze(2)).clamp_min(0).double()

    idx = (u[:, :1] * m).long().clamp_max(m - 1)  # [B, 1]
    picks = [idx]
    d2 = dist2(xs.gather(1, idx.unsqueeze(2).expand(b, 1, d)).squeeze(1))
    for i in range(1, k):
        cdf = torch.cumsum(d2, 1)
        idx = torch.searchsorted(cdf, (u[:, i : i + 1] * cdf[:, -1:]).contiguous()).clamp_max(m - 1)
        picks.append(idx)
        d2 = torch.minimum(d2, dist2(xs.gather(1, idx.unsqueeze(2).expand(b, 1, d)).squeeze(1)))
    sel = torch.cat(picks, dim=1)  # [B, K]
    return xs.gather(1, sel.unsqueeze(2).expand(b, k, d))


def _lloyd_unbalanced(x: torch.Tensor, cents: torch.Tensor, iters: int) -> torch.Tensor:
    k = cents.shape[1]
    for _ in range(iters):
        labels = _sq_cost(x, cents).argmin(2)
        means, counts = _means_from_labels(x, labels, k)
        cents = torch.where(counts.unsqueeze(2) > 0, means, cents)  # an empty cluster keeps its centroid
    return cents


def _faiss_kmeans(x: torch.Tensor, k: int, seed: int, iters: int) -> torch.Tensor:
    """faiss k-means centroids `[K, d]` for one problem `x` `[n, d]` (on x's device)."""
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


def _canonical(labels: torch.Tensor, cents: torch.Tensor, k: int):
    """Renumber clusters by their smallest neuron id (stable, representation-independent labels)."""
    b, n = labels.shape
    flat = (labels + _offsets(b, k, labels.device)).reshape(-1)
    ids = torch.arange(n, device=labels.device).repeat(b)
    first = torch.full((b * k,), n, dtype=torch.long, device=labels.device).scatter_reduce(
        0, flat, ids, reduce="amin", include_self=True
    ).view(b, k)
    order = torch.argsort(first, dim=1, stable=True)  # new id i <- old id order[:, i]
    new_id = torch.empty_like(order).scatter_(1, order, torch.arange(k, device=labels.device).expand(b, k))
    return new_id.gather(1, labels), cents.gather(1, order.unsqueeze(2).expand_as(cents))


def _refine(x, cents, size, iters, assignment, tol, start_labels, has_start, exchange_rounds):
    """Balanced Lloyd iterations for a batch; returns the best (labels, centroids, iterations) per
    problem. A problem stops improving its result once its labels repeat or its objective stalls
    (3 iterations without a relative gain of `tol`); the loop runs until every problem has stopped.
    `start_labels[b]` (where `has_start[b]`, e.g. the previous clustering) is itself a candidate, so
    a warm start never returns a partition worse than the one it started from."""
    b, n, _ = x.shape
    k = cents.shape[1]
    dev = x.device
    sq_norm = (x * x).sum(2).double().sum(1)  # [B]

    def objective(c):  # WCSS of balanced means: sum ||x||^2 - size * sum ||c||^2
        return sq_norm - size * (c * c).sum(2).double().sum(1)

    state = _SinkhornState(b, k, dev)
    best_labels = start_labels.clone()
    best_cents = cents.clone()
    best_obj = torch.where(has_start, objective(cents), torch.full((b,), math.inf, dtype=torch.float64, device=dev))
    stall = torch.zeros(b, dtype=torch.long, device=dev)
    stopped = torch.zeros(b, dtype=torch.bool, device=dev)
    iters_run = torch.zeros(b, dtype=torch.long, device=dev)
    prev = None
    for it in range(1, iters + 1):
        labels = balanced_assignment(_sq_cost(x, cents), size, assignment, exchange_rounds, state)
        cents = _cluster_sums(x, labels, k) / size
        obj = objective(cents)
        live = ~stopped
        better = live & (obj < best_obj - 1e-9 * obj.abs().clamp_min(1.0))
        gained = torch.where(better, best_obj - obj, torch.zeros_like(obj))
        best_obj = torch.where(better, obj, best_obj)
        best_labels = torch.where(better.unsqueeze(1), labels, best_labels)
        best_cents = torch.where(better.view(b, 1, 1), cents, best_cents)
        significant = gained > tol * obj.abs().clamp_min(1.0)
        stall = torch.where(live, torch.where(significant, torch.zeros_like(stall), stall + 1), stall)
        iters_run = torch.where(live, torch.full_like(iters_run, it), iters_run)
        repeat = (labels == prev).all(1) if prev is not None else torch.zeros_like(stopped)
        stopped = stopped | repeat | (stall >= 3)
        if bool(stopped.all()):
            break
        prev = labels
    return best_labels, best_cents, iters_run.tolist()


def _solve(ws, k, inits, seeds, *, iters, backend, assignment, init_iters, tol, exchange_rounds, normalize):
    """Balanced k-means for a list of same-shape problems; `inits[i]` is None (cold) or labels (warm)."""
    b = len(ws)
    xs = torch.stack([normalize_rows(w) if normalize else w.detach().to(torch.float32) for w in ws])
    _, n, d = xs.shape
    dev = xs.device
    size = n // k
    cents = torch.empty(b, k, d, device=dev)
    start_labels = torch.zeros(b, n, dtype=torch.long, device=dev)
    has_start = torch.zeros(b, dtype=torch.bool, device=dev)
    cold = [i for i in range(b) if inits[i] is None]
    warm = [i for i in range(b) if inits[i] is not None]
    if warm:
        lab = torch.stack([torch.as_tensor(inits[i]).to(device=dev, dtype=torch.long).reshape(-1) for i in warm])
        if lab.shape[1] != n or int(lab.min()) < 0 or int(lab.max()) >= k:
            raise ValueError(f"init labels must be {n} ints in [0, {k}), got shape {tuple(lab.shape)}")
        idx = torch.tensor(warm, device=dev)
        means, counts = _means_from_labels(xs[idx], lab, k)
        cents[idx] = means
        start_labels[idx] = lab
        has_start[idx] = (counts == size).all(1)
    if cold:
        idx = torch.tensor(cold, device=dev)
        if backend == "faiss":
            cents[idx] = torch.stack([_faiss_kmeans(xs[i], k, seeds[i], max(1, init_iters)) for i in cold])
        else:
            xc = xs[idx]
            cents[idx] = _lloyd_unbalanced(xc, _kmeans_pp(xc, k, [seeds[i] for i in cold]), init_iters)
    if k == 1:
        labels = torch.zeros(b, n, dtype=torch.long, device=dev)
        cents, iters_run = xs.mean(1, keepdim=True), [0] * b
    else:
        labels, cents, iters_run = _refine(
            xs, cents, size, max(1, iters), assignment, tol, start_labels, has_start, exchange_rounds
        )
    labels, cents = _canonical(labels, cents, k)
    values = _wcss_batch(xs, labels, k)
    return [
        (labels[i], values[i], cents[i], iters_run[i], "cold" if inits[i] is None else "warm") for i in range(b)
    ]


def _solve_chunked(ws, k, inits, seeds, **kw):
    """`_solve` over chunks of at most BATCH_BYTES of normalised rows, grouped by shape and device.

    On CPU every problem is solved alone: a batch's working set falls out of cache and the batch
    runs as long as its slowest member (measured ~2x slower per problem at 4 problems). On a GPU a
    6144 x 32 problem is launch-bound, and batching divides the launches by the batch size."""
    out: list = [None] * len(ws)
    groups: dict = {}
    for i, w in enumerate(ws):
        groups.setdefault((tuple(w.shape), w.device), []).append(i)
    for (shape, device), idx in groups.items():
        per = _problems_per_batch(device, shape[0], shape[1])
        for s in range(0, len(idx), per):
            part = idx[s : s + per]
            solved = _solve([ws[i] for i in part], k, [inits[i] for i in part], [seeds[i] for i in part], **kw)
            for i, r in zip(part, solved):
                out[i] = r
    return out


# --------------------------------------------------------------------------------------------------
# public API


def _kwargs(iters, backend, assignment, init_iters, tol, exchange_rounds, normalize) -> dict:
    return dict(iters=iters, backend=backend, assignment=assignment, init_iters=init_iters, tol=tol,
                exchange_rounds=exchange_rounds, normalize=normalize)


def balanced_kmeans(
    w: torch.Tensor,
    n_clusters: int,
    *,
    init_labels: Optional[torch.Tensor] = None,
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

    Initial centroids: the means implied by `init_labels` (warm start), else a cold start: k-means++
    (seeded) plus `init_iters` unbalanced Lloyd steps (backend "torch", on `w`'s device) or faiss
    k-means with `init_iters` iterations (backend "faiss"). Then at most `iters` balanced Lloyd
    iterations with the chosen `assignment`, each followed by at most `exchange_rounds` rounds of
    `polish_exchange` (0 = off); stops early when labels repeat or WCSS stops improving (relative
    `tol` for 3 iterations); returns the best iterate (a warm start's own partition included).
    """
    _check_args(w, n_clusters, backend, assignment)
    t0 = time.perf_counter()
    kw = _kwargs(iters, backend, assignment, init_iters, tol, exchange_rounds, normalize)
    labels, value, cents, its, start = _solve_chunked([w], n_clusters, [init_labels], [seed], **kw)[0]
    if labels.is_cuda:
        torch.cuda.synchronize(labels.device)
    return ClusteringResult(labels=labels, wcss=value, centroids=cents, seconds=time.perf_counter() - t0,
                            iterations=its, start=start, candidates={start: value})


def cluster_layers(
    ws: Sequence[torch.Tensor],
    n_clusters: int,
    prev_labels: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    seed: int = 0,
    warm_tolerance: float = 0.0,
    iters: int = DEFAULT_ITERS,
    backend: str = "torch",
    assignment: str = DEFAULT_ASSIGNMENT,
    init_iters: int = 10,
    tol: float = 1e-5,
    exchange_rounds: int = DEFAULT_EXCHANGE_ROUNDS,
    normalize: bool = True,
) -> list:
    """Paper eq. 3 for every layer at once: layer i gets a cold start (seed `seed + i`) and, when
    `prev_labels[i]` is given, a warm start from it; the lower WCSS is kept. All starts of all layers
    run as one batch (chunked by memory), which on a GPU is ~B times fewer kernel launches.

    Returns one ClusteringResult per layer: `start` says which won, `candidates` holds both WCSS
    values, ties go to the warm start. With the default `warm_tolerance=0` the returned WCSS is never
    above the cold start's (the paper's rule). `warm_tolerance > 0` (relative, opt-in) keeps the warm
    result unless the cold one is better by more than that fraction: on weakly clustered weights the
    two often differ by ~0.01% while the cold labels share little with the previous ones, which drags
    the monitor's ARI down.
    """
    ws = list(ws)
    if not ws:
        return []
    for w in ws:
        _check_args(w, n_clusters, backend, assignment)
    prev = list(prev_labels) if prev_labels is not None else [None] * len(ws)
    if len(prev) != len(ws):
        raise ValueError(f"got {len(prev)} previous labelings for {len(ws)} layers")
    if warm_tolerance < 0:
        raise UserError(f"ssd.warm_tolerance must be >= 0, got {warm_tolerance}")
    t0 = time.perf_counter()
    problems = [(i, None) for i in range(len(ws))] + [(i, p) for i, p in enumerate(prev) if p is not None]
    kw = _kwargs(iters, backend, assignment, init_iters, tol, exchange_rounds, normalize)
    solved = _solve_chunked([ws[i] for i, _ in problems], n_clusters, [p for _, p in problems],
                            [seed + i for i, _ in problems], **kw)
    if ws[0].is_cuda:
        torch.cuda.synchronize(ws[0].device)
    seconds = time.perf_counter() - t0
    best: list = [None] * len(ws)
    cands: list = [dict() for _ in ws]
    for (i, _), (labels, value, cents, its, start) in zip(problems, solved):
        cands[i][start] = value
        if start == "cold":
            best[i] = ClusteringResult(labels, value, cents, seconds, its, "cold")
        elif value <= cands[i]["cold"] * (1.0 + warm_tolerance):
            best[i] = ClusteringResult(labels, value, cents, seconds, its, "warm")
    for r, c in zip(best, cands):
        r.candidates = c
    return best


def cluster_neurons(
    w: torch.Tensor,
    n_clusters: int,
    prev_labels: Optional[torch.Tensor] = None,
    **kwargs,
) -> ClusteringResult:
    """Paper eq. 3 for one layer: cold start, plus a warm start from `prev_labels` when given; keep
    the lower WCSS. Same options as `cluster_layers` (one batch of one or two problems)."""
    kwargs.pop("init_labels", None)
    return cluster_layers([w], n_clusters, [prev_labels], **kwargs)[0]


def labels_to_permutation(labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """`expert_perm` for `SwitchableFFN`: neurons of expert c are `perm[c*E:(c+1)*E]`, ascending ids."""
    labels = labels.to(torch.long)
    counts = torch.bincount(labels, minlength=n_clusters)
    if counts.numel() != n_clusters or bool((counts != labels.numel() // n_clusters).any()):
        raise ValueError(f"labels are not a balanced partition into {n_clusters} clusters: {counts.tolist()}")
    return torch.argsort(labels, stable=True)
