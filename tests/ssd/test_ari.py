"""ARI equals sklearn's adjusted_rand_score (the reference) on random, structured and degenerate cases."""
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from ssd_megatron.ssd.ari import adjusted_rand_index, contingency_table, mean_ari, pairwise_ari

rng = np.random.default_rng(0)


def check(a, b):
    got = adjusted_rand_index(a, b)
    want = adjusted_rand_score(np.asarray(a), np.asarray(b))
    assert got == pytest.approx(want, abs=1e-12), (got, want)
    assert adjusted_rand_index(b, a) == pytest.approx(got, abs=1e-12)  # symmetric
    return got


@pytest.mark.parametrize("n,ka,kb", [(10, 2, 3), (100, 7, 7), (6144, 32, 32), (16384, 64, 64), (500, 1, 9)])
def test_random_labelings(n, ka, kb):
    for _ in range(3):
        check(rng.integers(0, ka, n), rng.integers(0, kb, n))


def test_balanced_random_partitions_near_zero():
    a = np.arange(6144) % 32
    b = rng.permutation(a)
    assert abs(check(a, b)) < 0.01


def test_identical_and_renamed():
    a = rng.integers(0, 32, 6144)
    assert check(a, a) == 1.0
    perm = rng.permutation(32)
    assert check(a, perm[a]) == 1.0  # cluster ids renamed
    assert check(a, perm[a] + 1000) == 1.0  # arbitrary ids


def test_structured_changes():
    a = np.repeat(np.arange(32), 192)  # balanced, like SSD
    split = a * 2 + (np.arange(a.size) % 2)  # every cluster split in two
    merged = a // 2  # pairs of clusters merged
    moved = a.copy()
    idx = rng.choice(a.size, 300, replace=False)
    moved[idx] = rng.integers(0, 32, 300)  # a few neurons move
    swapped = a.copy()
    swapped[[0, 200]] = swapped[[200, 0]]
    for b in (split, merged, moved, swapped):
        v = check(a, b)
        assert -0.5 <= v < 1.0
    assert check(a, moved) > check(a, rng.permutation(a))


def test_degenerate_cases_match_sklearn():
    cases = [
        ([0, 0, 0, 0], [1, 1, 1, 1]),  # both single cluster -> 1.0
        ([0, 1, 2, 3], [3, 2, 1, 0]),  # both all singletons -> 1.0
        ([0, 0, 0, 0], [0, 1, 2, 3]),  # 0.0
        ([0, 0, 1, 1], [0, 1, 0, 1]),  # -0.5
        ([0, 0, 1, 2], [0, 0, 1, 1]),  # 0.5714...
        ([5], [7]),
        ([], []),
    ]
    for a, b in cases:
        check(a, b)
    assert adjusted_rand_index([0, 0, 0], [2, 2, 2]) == 1.0


def test_accepts_tensors_and_other_label_types():
    a = torch.randint(0, 8, (300,))
    b = torch.randint(0, 8, (300,))
    assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a.numpy(), b.numpy()), abs=1e-12)
    names_a = np.array(["x", "y", "z"])[a.numpy() % 3]
    assert adjusted_rand_index(names_a, b) == pytest.approx(adjusted_rand_score(names_a, b.numpy()), abs=1e-12)
    neg = a.numpy() - 4  # negative ids
    assert adjusted_rand_index(neg, b) == pytest.approx(adjusted_rand_index(a, b), abs=1e-15)


def test_contingency_table():
    t = contingency_table([0, 0, 1, 2], [1, 1, 0, 0])
    assert t.tolist() == [[0, 2], [1, 0], [1, 0]]


def test_length_mismatch_and_shape_errors():
    with pytest.raises(ValueError):
        adjusted_rand_index([0, 1], [0, 1, 2])
    with pytest.raises(ValueError):
        adjusted_rand_index(np.zeros((2, 2)), np.zeros((2, 2)))


def test_pairwise_matrix():
    base = np.arange(600) % 12
    labelings = [base, rng.permutation(base), base.copy(), torch.from_numpy((base + 1) % 12)]
    m = pairwise_ari(labelings)
    assert m.shape == (4, 4)
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_allclose(np.diag(m), 1.0)
    for i in range(4):
        for j in range(4):
            assert m[i, j] == pytest.approx(adjusted_rand_score(np.asarray(labelings[i]), np.asarray(labelings[j])))
    assert m[0, 2] == 1.0 and m[0, 3] == 1.0


def test_mean_ari_over_layers():
    a = [np.arange(64) % 4, np.arange(64) % 8]
    b = [np.arange(64) % 4, rng.permutation(np.arange(64) % 8)]
    want = (1.0 + adjusted_rand_score(a[1], b[1])) / 2
    assert mean_ari(a, b) == pytest.approx(want)
    with pytest.raises(ValueError):
        mean_ari(a, b[:1])
