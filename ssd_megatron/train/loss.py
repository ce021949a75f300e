"""Language-model loss as (sum, count), so averaging can happen over the whole global batch.

Every objective (causal LM, masked LM, span corruption) is a token-level cross-entropy over the labels
that are not `IGNORE_INDEX`. Returning the *sum* and the number of valid tokens lets the loop divide
by the valid-token count of the entire global batch (all micro-batches, all ranks): a micro-batch with
more real targets then weighs more, exactly as in a single big batch, and the result does not depend
on how the batch was split across ranks or accumulation steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies in fp32, number of valid tokens as an int64 tensor)."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    n_valid = (flat_labels != IGNORE_INDEX).sum()
    return loss_sum, n_valid


def count_valid(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def masked_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) argmax predictions over valid labels (MLM accuracy)."""
    valid = labels != IGNORE_INDEX
    pred = logits.argmax(dim=-1)
    return int(((pred == labels) & valid).sum()), int(valid.sum())
