"""Deterministic, resumable, world-size-independent sample order and batch iteration.

The training data position is one integer: the number of global samples consumed. Global sample `i`
maps to a dataset index through a per-epoch permutation seeded by (seed, epoch), and a data-parallel
rank takes a contiguous slice of every global batch. Hence:

* the union of all ranks' samples in a global batch is the same for any number of ranks (and in the
  same order), so changing the data-parallel size keeps the training trajectory;
* resuming from ``consumed_samples`` continues exactly where the interrupted run would have gone,
  with no state beyond that integer.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ssd_megatron.errors import UserError

_EPOCH_TAG = 0x5A3D  # separates the epoch-permutation RNG stream from the objectives' per-sample streams


class SampleOrder:
    """Maps the i-th consumed sample (counted over all epochs) to a dataset index."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        if int(num_samples) <= 0:
            raise UserError(f"dataset has {num_samples} samples; at least one is needed (check data paths/seq_len)")
        self.num_samples, self.seed, self.shuffle = int(num_samples), int(seed), bool(shuffle)
        self._epoch, self._perm = -1, None

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The dataset indices of epoch `epoch`, in consumption order (one epoch cached)."""
        if epoch != self._epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, _EPOCH_TAG, int(epoch)])
                self._perm = rng.permutation(self.num_samples)
            else:
                self._perm = np.arange(self.num_samples, dtype=np.int64)
            self._epoch = epoch
        return self._perm

    def global_index(self, i: int) -> int:
        epoch, j = divmod(int(i), self.num_samples)
        return int(self.epoch_permutation(epoch)[j])

    def global_indices(self, start: int, stop: int) -> np.ndarray:
        """Dataset indices of consumed samples [start, stop), crossing epoch boundaries as needed."""
        out, i = [], int(start)
        while i < stop:
            epoch, j = divmod(i, self.num_samples)
            take = min(stop - i, self.num_samples - j)
            out.append(self.epoch_permutation(epoch)[j:j + take])
            i += take
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack equal-length samples into int64 tensors ``[B, L]``."""
    return {k: torch.from_numpy(np.stack([s[k] for s in samples]).astype(np.int64, copy=False))
            for k in samples[0]}


def _check_batching(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if int(micro_batch_size) < 1:
        raise UserError(f"train.micro_batch_size: {micro_batch_size} is not accepted (accepted: an integer >= 1)")
    if int(dp_size) < 1 or not 0 <= int(dp_rank) < int(dp_size):
        raise ValueError(f"dp_rank {dp_rank} / dp_size {dp_size} is not a valid data-parallel position")
    if int(global_batch_size) < 1 or int(global_batch_size) % (int(micro_batch_size) * int(dp_size)):
        raise UserError(f"train.global_batch_size: {global_batch_size} is not accepted (accepted: a positive "
                        f"multiple of train.micro_batch_size ({micro_batch_size}) x data-parallel size ({dp_size}))")


class DataIterator:
    """Yields, per global batch, this rank's micro-batches (a list of `accum` dicts of tensors).

    Global batch b (counted from `start_sample`) covers consumed samples
    ``[start + b*G, start + (b+1)*G)``; rank r takes ``[.. + r*G/W, .. + (r+1)*G/W)`` and splits it into
    ``accum = G / (micro * W)`` micro-batches. `consumed_samples` already counts a batch once it has
    been yielded, so saving it after the optimizer step is exactly the resume position.
    """

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, start_sample: int = 0, seed: int = 0, shuffle: bool = True):
        _check_batching(global_batch_size, micro_batch_size, dp_rank, dp_size)
        if int(start_sample) < 0:
            raise UserError(f"consumed_samples: {start_sample} is not accepted (accepted: >= 0)")
        self.dataset = dataset
        self.global_batch_size, self.micro_batch_size = int(global_batch_size), int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.accum = self.global_batch_size // (self.micro_batch_size * self.dp_size)
        self.order = SampleOrder(len(dataset), seed, shuffle)
        self.consumed_samples = int(start_sample)

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.order.num_samples

    def rank_indices(self, batch_start: int) -> np.ndarray:
        """Dataset indices this rank reads for the global batch starting at consumed sample `batch_start`."""
        per_rank = self.global_batch_size // self.dp_size
        lo = batch_start + self.dp_rank * per_rank
        return self.order.global_indices(lo, lo + per_rank)

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        idx = self.rank_indices(self.consumed_samples)
        samples = [self.dataset[int(i)] for i in idx]
        m = self.micro_batch_size
        micro = [collate(samples[j * m:(j + 1) * m]) for j in range(self.accum)]
        self.consumed_samples += self.global_batch_size
        return micro

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


class ValidationIterator:
    """A fixed, ordered evaluation set: step s gives rank r samples ``s*m*W + r*m ... + m - 1`` (no shuffle).

    Re-iterable: every pass yields the same micro-batches, so validation losses are comparable across
    a run, across resumes and across data-parallel sizes (for the same ``m*W``).
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 max_batches: int | None = None):
        _check_batching(int(micro_batch_size) * int(dp_size), micro_batch_size, dp_rank, dp_size)
        self.dataset = dataset
        self.micro_batch_size, self.dp_rank, self.dp_size = int(micro_batch_size), int(dp_rank), int(dp_size)
        per_step = self.micro_batch_size * self.dp_size
        self.num_batches = len(dataset) // per_step
        if max_batches is not None:
            self.num_batches = min(self.num_batches, int(max_batches))
        if self.num_batches == 0:
            raise UserError(f"train.micro_batch_size: validation set has {len(dataset)} samples, fewer than "
                            f"micro_batch_size x data-parallel size = {per_step} (accepted: a smaller micro batch "
                            "or a larger validation split)")

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        m, per_step = self.micro_batch_size, self.micro_batch_size * self.dp_size
        for s in range(self.num_batches):
            lo = s * per_step + self.dp_rank * m
            yield collate([self.dataset[i] for i in range(lo, lo + m)])
