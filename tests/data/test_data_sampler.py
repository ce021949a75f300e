"""Sampler: data-parallel size does not change global batches, resume continues exactly, epochs roll over."""
import numpy as np
import pytest
import torch

from ssd_megatron.data.sampler import DataIterator, SampleOrder, ValidationIterator
from ssd_megatron.errors import UserError


class IdentityDataset:
    """Sample i carries its own index, so batches show exactly which samples were taken."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": np.array([i, i + 1], dtype=np.int64), "labels": np.array([i, -100], dtype=np.int64)}


def _ids(micro_batches):
    return [int(x) for mb in micro_batches for x in mb["input_ids"][:, 0]]


def test_sample_order_is_a_permutation_per_epoch():
    order = SampleOrder(10, seed=4)
    e0 = [order.global_index(i) for i in range(10)]
    e1 = [order.global_index(i) for i in range(10, 20)]
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1
    assert order.global_indices(5, 23).tolist() == [order.global_index(i) for i in range(5, 23)]
    assert SampleOrder(10, seed=4).global_indices(0, 20).tolist() == e0 + e1
    assert SampleOrder(10, seed=5).global_indices(0, 10).tolist() != e0


def test_global_batches_independent_of_dp_size():
    ds, g = IdentityDataset(37), 12
    single = DataIterator(ds, g, micro_batch_size=3, dp_rank=0, dp_size=1, seed=1)
    ranks = [DataIterator(ds, g, micro_batch_size=3, dp_rank=r, dp_size=2, seed=1) for r in range(2)]
    quad = [DataIterator(ds, g, micro_batch_size=1, dp_rank=r, dp_size=4, seed=1) for r in range(4)]
    for _ in range(8):  # crosses several epochs (37 samples, 12 per batch)
        b1 = next(single)
        assert len(b1) == 4 and b1[0]["input_ids"].shape == (3, 2) and b1[0]["input_ids"].dtype == torch.int64
        parts = [next(it) for it in ranks]
        assert all(len(p) == 2 for p in parts)
        assert _ids(b1) == _ids(parts[0]) + _ids(parts[1])
        assert _ids(b1) == sum((_ids(next(it)) for it in quad), [])
    assert single.consumed_samples == 96 == ranks[1].consumed_samples and single.epoch == 2


def test_resume_continues_identically_and_epochs_roll_over():
    ds = IdentityDataset(25)
    full = DataIterator(ds, 10, 5, seed=7)
    batches = [_ids(next(full)) for _ in range(6)]
    resumed = DataIterator(ds, 10, 5, seed=7, start_sample=30)
    assert [_ids(next(resumed)) for _ in range(3)] == batches[3:]
    state = full.state_dict()
    again = DataIterator(ds, 10, 5, seed=7)
    again.load_state_dict(state)
    assert again.consumed_samples == 60
    flat = sum(batches, [])
    assert sorted(flat[:25]) == sorted(flat[25:50]) == list(range(25))  # every sample once per epoch
    assert flat[:25] != flat[25:50]  # reshuffled


def test_batch_size_validation_names_keys():
    ds = IdentityDataset(10)
    with pytest.raises(UserError, match="train.global_batch_size"):
        DataIterator(ds, 10, micro_batch_size=4, dp_rank=0, dp_size=1)
    with pytest.raises(UserError, match="train.global_batch_size"):
        DataIterator(ds, 8, micro_batch_size=4, dp_rank=0, dp_size=3)
    with pytest.raises(UserError, match="train.micro_batch_size"):
        DataIterator(ds, 8, micro_batch_size=0)


def test_validation_iterator_fixed_and_sharded():
    ds = IdentityDataset(23)
    v1 = ValidationIterator(ds, micro_batch_size=4)
    assert len(v1) == 5 and [_ids([b]) for b in v1] == [_ids([b]) for b in v1]
    assert sum((_ids([b]) for b in v1), []) == list(range(20))
    v2 = [ValidationIterator(ds, micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    merged = [x for b0, b1 in zip(*v2) for x in _ids([b0]) + _ids([b1])]
    assert merged == list(range(20))
    assert len(ValidationIterator(ds, 4, max_batches=2)) == 2
    with pytest.raises(UserError, match="validation set"):
        ValidationIterator(IdentityDataset(3), micro_batch_size=4)
