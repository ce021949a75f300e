"""Balanced k-means of FFN neurons: balance, optimality of the assignment step, eq. 3, backends."""
import importlib.util
import itertools
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ssd_megatron.errors import UserError
from ssd_megatron.ssd import clustering as C
from ssd_megatron.ssd.ari import adjusted_rand_index

# faiss-cpu comes with the dev extra (CI has it); on machines without it the faiss cases are skipped.
HAVE_FAISS = importlib.util.find_spec("faiss") is not None
needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed (pip install -e .[dev])")

METHODS = C.ASSIGNMENTS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These ops are tiny: OpenMP fan-out only adds overhead (a lot of it on a shared 2-core box).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clustered_rows(n, d, groups, noise, seed=0):
    """Rows drawn around `groups` random directions with unequal group sizes (like trained W_i)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(groups, generator=g) ** 2 + 0.05
    z = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=g)
    centers = torch.randn(groups, d, generator=g)
    return centers[z] + noise * torch.randn(n, d, generator=g)


def brute_wcss(w, labels):
    x = w.double() / w.double().norm(dim=1, keepdim=True)
    total = 0.0
    for c in labels.unique():
        pts = x[labels == c]
        total += float(((pts - pts.mean(0)) ** 2).sum())
    return total


def kmeans_centroids(x, k, seed, iters):
    """k-means++ then `iters` unbalanced Lloyd steps for one problem (the cold-start init)."""
    return C._lloyd_unbalanced(x[None], C._kmeans_pp(x[None], k, [seed]), iters)[0]


def full_cost(x, cents):
    return ((x[:, None, :] - cents[None, :, :]) ** 2).sum(-1)  # [n, k] squared distances


def optimal_cost(cost, size):
    rows, cols = linear_sum_assignment(np.repeat(cost.double().numpy(), size, axis=1))
    return float(cost.double().numpy()[rows, cols // size].sum())


def naive_greedy(cost, size):
    n, k = cost.shape
    flat = cost.reshape(-1)
    order = torch.argsort(flat, stable=True)
    labels = torch.full((n,), -1, dtype=torch.long)
    room = [size] * k
    for idx in order.tolist():
        i, c = divmod(idx, k)
        if labels[i] < 0 and room[c] > 0:
            labels[i] = c
            room[c] -= 1
    return labels


# ------------------------------------------------------------------------------------- balance


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,k", [(96, 8), (256, 32), (60, 60), (64, 1), (384, 12)])
def test_exactly_balanced(method, n, k):
    w = clustered_rows(n, 24, groups=max(1, k // 2 + 1), noise=0.5, seed=n + k)
    res = C.balanced_kmeans(w, k, assignment=method, iters=4)
    assert res.labels.dtype == torch.long and res.labels.shape == (n,)
    assert torch.equal(torch.bincount(res.labels, minlength=k), torch.full((k,), n // k))
    assert res.centroids.shape == (k, 24)


@pytest.mark.parametrize("method", ["auction", "greedy", "sinkhorn"])
def test_assignment_step_balanced_on_adversarial_costs(method):
    # Every neuron prefers cluster 0: the assignment must still split them evenly.
    n, k = 120, 6
    cost = torch.rand(n, k) * 0.01
    cost[:, 0] -= 1.0
    labels = {"auction": lambda: C.assign_auction(cost, n // k), "greedy": lambda: C.assign_greedy(cost, n // k),
              "sinkhorn": lambda: C.assign_sinkhorn(cost, n // k)}[method]()
    assert torch.equal(torch.bincount(labels, minlength=k), torch.full((k,), n // k))


def test_greedy_equals_serial_global_greedy():
    g = torch.Generator().manual_seed(3)
    for n, k in [(40, 4), (90, 9), (64, 16)]:
        cost = torch.rand(n, k, generator=g)
        assert torch.equal(C.assign_greedy(cost, n // k), naive_greedy(cost, n // k))


def test_greedy_with_pinned_neurons_fills_remaining_room():
    n, k = 40, 4
    cost = torch.rand(n, k, generator=torch.Generator().manual_seed(1))
    fixed = torch.full((n,), -1, dtype=torch.long)
    fixed[:10] = 2  # cluster 2 is already full
    labels = C.assign_greedy(cost, n // k, fixed=fixed)
    assert torch.equal(labels[:10], fixed[:10])
    assert not bool((labels[10:] == 2).any())
    assert torch.equal(torch.bincount(labels, minlength=k), torch.full((k,), 10))


def tiny_problem(n, k, seed):
    w = clustered_rows(n, 16, groups=k + 3, noise=0.8, seed=seed)
    x = C.normalize_rows(w)
    cents = kmeans_centroids(x, k, seed, 3)  # unbalanced centroids: balance binds
    return full_cost(x, cents)


@pytest.mark.parametrize("method", METHODS)
def test_assignment_step_close_to_exact_optimum(method):
    """The E-step as used by balanced_kmeans vs scipy's exact linear_sum_assignment on tiny sizes."""
    for seed, (n, k) in enumerate([(96, 8), (128, 16), (120, 4)]):
        cost = tiny_problem(n, k, seed)
        labels = C.balanced_assignment(cost, n // k, method)
        got = float(cost.double()[torch.arange(n), labels].sum())
        opt = optimal_cost(cost, n // k)
        assert got >= opt - 1e-6
        assert got <= opt * 1.02, (method, n, k, got, opt)


def test_raw_methods_vs_exact_optimum():
    """Without the exchange polish: auction is near-exact, sinkhorn+rounding and greedy within a few %
    on these adversarially small instances (greedy is exactly the textbook greedy, tested above)."""
    bounds = {"auction": 1.01, "sinkhorn": 1.06, "greedy": 1.08}
    for seed, (n, k) in enumerate([(96, 8), (128, 16), (120, 4)]):
        cost = tiny_problem(n, k, seed)
        opt = optimal_cost(cost, n // k)
        for method, bound in bounds.items():
            labels = C.balanced_assignment(cost, n // k, method, exchange_rounds=0)
            assert float(cost.double()[torch.arange(n), labels].sum()) <= opt * bound, method


def test_exchange_polish_never_increases_cost_and_keeps_balance():
    for seed in range(3):
        cost = tiny_problem(128, 16, seed)
        start = C.assign_greedy(cost, 8)
        polished = C.polish_exchange(cost, start, 8, rounds=20)
        assert torch.equal(torch.bincount(polished, minlength=16), torch.full((16,), 8))
        total = lambda lab: float(cost.double()[torch.arange(128), lab].sum())  # noqa: E731
        assert total(polished) <= total(start) + 1e-9


def test_auction_is_near_exact_with_enough_rounds():
    n, k = 120, 6
    w = clustered_rows(n, 16, groups=9, noise=0.8, seed=5)
    x = C.normalize_rows(w)
    cost = full_cost(x, kmeans_centroids(x, k, 0, 0))
    labels = C.assign_auction(cost, n // k, eps=0.01, max_rounds=5000)
    got = float(cost.double()[torch.arange(n), labels].sum())
    assert got <= optimal_cost(cost, n // k) * 1.002


def test_balanced_kmeans_close_to_exhaustive_optimum():
    """Tiny instance: every balanced partition of 8 points into 2 clusters of 4."""
    w = clustered_rows(8, 5, groups=3, noise=0.7, seed=11)
    best = min(
        brute_wcss(w, torch.tensor([0 if i in s else 1 for i in range(8)]))
        for s in itertools.combinations(range(8), 4)
    )
    for method in METHODS:
        res = C.cluster_neurons(w, 2, assignment=method, prev_labels=torch.arange(8) % 2)
        assert res.wcss <= best * 1.02


# ------------------------------------------------------------------------------------- WCSS


def test_wcss_matches_definition_and_reported():
    w = clustered_rows(96, 12, groups=5, noise=0.6, seed=2)
    for method in METHODS:
        res = C.balanced_kmeans(w, 8, assignment=method, iters=8)
        assert res.wcss == pytest.approx(brute_wcss(w, res.labels), rel=1e-6)
        assert C.wcss(w, res.labels, 8) == pytest.approx(res.wcss, rel=1e-12)
        # centroids are the cluster means of the normalised rows
        x = C.normalize_rows(w)
        for c in range(8):
            torch.testing.assert_close(res.centroids[c], x[res.labels == c].mean(0), rtol=1e-5, atol=1e-6)


def test_rows_are_normalised_before_clustering():
    w = clustered_rows(64, 10, groups=4, noise=0.5, seed=4)
    scale = torch.rand(64, 1) * 100 + 0.01  # per-neuron scale must not matter
    a = C.balanced_kmeans(w, 8)
    b = C.balanced_kmeans(w * scale, 8)
    assert torch.equal(a.labels, b.labels)
    assert a.wcss == pytest.approx(b.wcss, rel=1e-4)


def test_recovers_planted_balanced_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 32, generator=g)
    truth = torch.randperm(256, generator=g) % 8
    w = centers[truth] + 0.05 * torch.randn(256, 32, generator=g)
    for method in METHODS:
        for backend in ("torch", "faiss") if HAVE_FAISS else ("torch",):
            res = C.balanced_kmeans(w, 8, assignment=method, backend=backend)
            assert adjusted_rand_index(res.labels, truth) == 1.0


# ------------------------------------------------------------------------------------- eq. 3


@pytest.mark.parametrize("method", METHODS)
def test_warm_start_never_worse_than_cold(method):
    w0 = clustered_rows(192, 24, groups=12, noise=1.0, seed=7)
    prev = C.cluster_neurons(w0, 12, assignment=method, seed=1).labels
    for step in range(4):
        w = w0 + 0.3 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(100 + step))
        res = C.cluster_neurons(w, 12, prev_labels=prev, assignment=method, seed=step)
        assert set(res.candidates) == {"cold", "warm"}
        assert res.wcss <= res.candidates["cold"]
        assert res.wcss == min(res.candidates.values())
        assert res.start in ("cold", "warm")
        assert res.wcss == pytest.approx(res.candidates[res.start])
        assert torch.equal(torch.bincount(res.labels, minlength=12), torch.full((12,), 16))
        # the warm run also never ends above the previous partition's WCSS on the new weights
        assert res.candidates["warm"] <= C.wcss(w, prev, 12) + 1e-9
        prev = res.labels


def test_cold_only_without_prev_labels():
    w = clustered_rows(64, 8, groups=5, noise=0.5)
    res = C.cluster_neurons(w, 4)
    assert res.start == "cold" and set(res.candidates) == {"cold"}


def test_warm_start_from_converged_labels_keeps_them():
    w = clustered_rows(128, 16, groups=6, noise=0.6, seed=9)
    first = C.balanced_kmeans(w, 8)
    again = C.balanced_kmeans(w, 8, init_labels=first.labels)
    assert again.start == "warm"
    assert again.wcss <= first.wcss + 1e-9
    assert adjusted_rand_index(first.labels, again.labels) > 0.95


# ------------------------------------------------------------------------------------- backends


@needs_faiss
@pytest.mark.parametrize("method", METHODS)
def test_torch_and_faiss_agree_on_wcss(method):
    w = clustered_rows(512, 32, groups=24, noise=1.5, seed=13)
    a = C.balanced_kmeans(w, 16, backend="torch", assignment=method)
    b = C.balanced_kmeans(w, 16, backend="faiss", assignment=method)
    assert abs(a.wcss - b.wcss) <= 0.02 * min(a.wcss, b.wcss)


def test_faiss_missing_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(UserError, match="faiss"):
        C.balanced_kmeans(torch.randn(32, 4), 4, backend="faiss")


# ------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
@pytest.mark.parametrize("method", METHODS)
def test_deterministic(backend, method):
    w = clustered_rows(256, 16, groups=10, noise=1.0, seed=21)
    prev = torch.randperm(256, generator=torch.Generator().manual_seed(0)) % 16
    a = C.cluster_neurons(w, 16, prev_labels=prev, seed=5, backend=backend, assignment=method)
    b = C.cluster_neurons(w.clone(), 16, prev_labels=prev.clone(), seed=5, backend=backend, assignment=method)
    assert torch.equal(a.labels, b.labels) and a.wcss == b.wcss and a.start == b.start


def test_labels_are_canonical_and_give_expert_permutation():
    w = clustered_rows(96, 8, groups=5, noise=0.5, seed=1)
    res = C.balanced_kmeans(w, 6)
    first_seen = []
    for lab in res.labels.tolist():
        if lab not in first_seen:
            first_seen.append(lab)
    assert first_seen == list(range(6))  # cluster ids in order of their smallest neuron
    perm = C.labels_to_permutation(res.labels, 6)
    assert torch.equal(torch.sort(perm).values, torch.arange(96))
    for e in range(6):
        block = perm[e * 16 : (e + 1) * 16]
        assert bool((res.labels[block] == e).all()) and bool((block[1:] > block[:-1]).all())
    with pytest.raises(ValueError):
        C.labels_to_permutation(torch.zeros(96, dtype=torch.long), 6)


def test_glu_rows_and_low_precision_weights():
    gate_up = torch.cat([clustered_rows(64, 8, 4, 0.5, 1), clustered_rows(64, 8, 4, 0.5, 2)], dim=1)
    res = C.balanced_kmeans(gate_up.to(torch.bfloat16), 8)  # [d_ff, 2*d_model], bf16 parameters
    assert res.centroids.shape == (8, 16) and res.centroids.dtype == torch.float32
    assert torch.equal(torch.bincount(res.labels), torch.full((8,), 8))


# ------------------------------------------------------------------------------------- errors


def test_user_errors():
    w = torch.randn(48, 4)
    with pytest.raises(UserError, match="48"):
        C.balanced_kmeans(w, 5)
    with pytest.raises(UserError):
        C.balanced_kmeans(w, 0)
    with pytest.raises(UserError, match="accepted"):
        C.balanced_kmeans(w, 4, backend="sklearn")
    with pytest.raises(UserError, match="accepted"):
        C.balanced_kmeans(w, 4, assignment="hungarian")
    with pytest.raises(UserError):
        C.balanced_kmeans(torch.randn(48), 4)
    with pytest.raises(ValueError):
        C.balanced_kmeans(w, 4, init_labels=torch.arange(10))


def test_warm_tolerance_prefers_warm_within_margin():
    w0 = clustered_rows(192, 24, groups=12, noise=1.0, seed=7)
    prev = C.cluster_neurons(w0, 12).labels
    w = w0 + 0.3 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(5))
    strict = C.cluster_neurons(w, 12, prev_labels=prev)
    loose = C.cluster_neurons(w, 12, prev_labels=prev, warm_tolerance=1.0)  # warm always kept
    assert loose.start == "warm" and loose.candidates == strict.candidates
    assert strict.wcss == min(strict.candidates.values())
    with pytest.raises(UserError):
        C.cluster_neurons(w, 12, prev_labels=prev, warm_tolerance=-0.1)


# ------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("method", METHODS)
def test_batched_assignment_equals_per_problem(method):
    costs = torch.stack([tiny_problem(96, 8, seed) for seed in range(3)])
    batched = C.balanced_assignment(costs, 12, method)
    for b in range(3):
        assert torch.equal(batched[b], C.balanced_assignment(costs[b], 12, method))


def test_cluster_layers_equals_per_layer_eq3(monkeypatch):
    ws = [clustered_rows(128, 16, groups=10, noise=1.0, seed=s) for s in range(4)]
    prev = [C.cluster_neurons(w, 8, seed=s).labels for s, w in enumerate(ws)]
    prev[1] = None  # a layer without a previous clustering: cold start only
    batch = C.cluster_layers(ws, 8, prev, seed=10)
    for i, (w, p) in enumerate(zip(ws, prev)):
        single = C.cluster_neurons(w, 8, p, seed=10 + i)
        assert torch.equal(batch[i].labels, single.labels)
        assert batch[i].candidates == single.candidates and batch[i].start == single.start
    assert set(batch[1].candidates) == {"cold"}
    monkeypatch.setattr(C, "BATCH_BYTES", 128 * 16 * 4 * 2)  # two problems per chunk
    chunked = C.cluster_layers(ws, 8, prev, seed=10)
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(batch, chunked))


def test_cluster_layers_mixed_shapes_and_errors():
    ws = [clustered_rows(64, 8, 5, 0.5, 1), clustered_rows(96, 12, 5, 0.5, 2), clustered_rows(64, 8, 5, 0.5, 3)]
    res = C.cluster_layers(ws, 4)
    assert [r.labels.shape[0] for r in res] == [64, 96, 64]
    assert all(torch.equal(torch.bincount(r.labels), torch.full((4,), r.labels.shape[0] // 4)) for r in res)
    with pytest.raises(ValueError):
        C.cluster_layers(ws, 4, prev_labels=[None])
    with pytest.raises(UserError):
        C.cluster_layers(ws, 5)
    assert C.cluster_layers([], 4) == []


def test_gpu_code_paths_on_cpu(monkeypatch):
    """The CUDA policy (one-hot cluster sums, a termination check every 8 rounds, many problems per
    batch) gives balanced, deterministic results of the same quality as the CPU policy."""
    ws = [clustered_rows(256, 16, groups=12, noise=1.0, seed=s) for s in range(3)]
    prev = [C.cluster_neurons(w, 16, seed=s).labels for s, w in enumerate(ws)]
    cpu = C.cluster_layers(ws, 16, prev, seed=3)
    monkeypatch.setattr(C, "_ordered_index_add", lambda device: False)
    monkeypatch.setattr(C, "_sync_every", lambda device: 8)
    monkeypatch.setattr(C, "_problems_per_batch", lambda device, rows, cols: 64)
    gpu_like = C.cluster_layers(ws, 16, prev, seed=3)
    again = C.cluster_layers(ws, 16, prev, seed=3)
    for a, b, c in zip(cpu, gpu_like, again):
        assert torch.equal(b.labels, c.labels) and b.wcss == c.wcss
        assert torch.equal(torch.bincount(b.labels, minlength=16), torch.full((16,), 16))
        assert abs(a.wcss - b.wcss) <= 0.02 * a.wcss
        assert b.wcss <= b.candidates["cold"]
    for method in METHODS:
        costs = torch.stack([tiny_problem(96, 8, seed) for seed in range(3)])
        batched = C.balanced_assignment(costs, 12, method)
        for i in range(3):
            assert torch.equal(torch.bincount(batched[i], minlength=8), torch.full((8,), 12))
