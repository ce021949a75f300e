"""The loop's view of the data: tokenizer, padded vocabulary, objective datasets and which samples a
rank takes at a given data position.

Data position = the number of global samples consumed (an int in every checkpoint). The global batch
starting at position `p` is global samples p .. p+G-1 of the deterministic sample order; data-parallel
rank r of W takes the contiguous slice p + r*G/W .. p + (r+1)*G/W - 1 and splits it into micro-batches
(docs/interfaces.md). Which samples form a global batch therefore depends on the position alone, not
on W or on the accumulation steps: a run resumed on another number of ranks trains on exactly the
same global batches.

Validation uses a fixed set: the first `n x micro_batch_size` samples of the validation split, in
order, split across ranks by whole micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError


def padded_vocab_size(tokenizer_size: int, mcfg) -> int:
    """`model.vocab_size` if set (must cover the tokenizer), else the tokenizer's size rounded up to a
    multiple of `model.vocab_multiple` (Megatron's padding: tensor-core friendly, TP-divisible)."""
    if mcfg.vocab_size:
        if mcfg.vocab_size < tokenizer_size:
            raise UserError(f"model.vocab_size: {mcfg.vocab_size} is smaller than the tokenizer's vocabulary "
                            f"({tokenizer_size}); accepted: 0 (derive it) or >= {tokenizer_size}")
        return mcfg.vocab_size
    m = mcfg.vocab_multiple
    return ((tokenizer_size + m - 1) // m) * m


def to_device(batch: dict, device) -> dict:
    non_blocking = getattr(device, "type", str(device)) == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


# --------------------------------------------------------------------------- sources


def resolve_sources(cfg) -> tuple[str, str]:
    """(data prefix, tokenizer model path): the embedded default corpus when `data.path` is empty."""
    d = cfg.data
    if d.path:
        prefix = d.path
        for split in ("train", "valid"):
            for ext in (".bin", ".idx"):
                f = Path(f"{prefix}_{split}{ext}")
                if not f.is_file():
                    raise UserError(f"data.path: {f} not found (expected PREFIX_train.{{bin,idx}} and "
                                    "PREFIX_valid.{bin,idx}; make them with `ssd-data preprocess`)")
        tok = d.tokenizer or _sibling_tokenizer(prefix)
        if not tok:
            raise UserError(f"data.tokenizer: not set and no tokenizer model found next to {prefix} "
                            "(expected PREFIX.model or tokenizer.model)")
        return prefix, tok
    from ..data import corpus

    info = corpus.ensure_default_corpus()
    prefix, tok = _corpus_paths(info)
    return prefix, d.tokenizer or tok


def _corpus_paths(info) -> tuple[str, str]:
    if isinstance(info, (tuple, list)):
        return str(info[0]), str(info[1])
    if isinstance(info, dict):
        return str(info["prefix"]), str(info["tokenizer"])
    return str(info.prefix), str(info.tokenizer)


def _sibling_tokenizer(prefix: str) -> str:
    p = Path(prefix)
    for cand in (Path(prefix + ".model"), p.parent / "tokenizer.model"):
        if cand.is_file():
            return str(cand)
    return ""


# --------------------------------------------------------------------------- the data object


@dataclass
class TrainData:
    tokenizer: object
    vocab_size: int
    train: object  # objective dataset: len(), [i] -> dict of 1-D int64 arrays
    valid: object
    seed: int

    def train_iterator(self, global_batch: int, micro_batch: int, dims, start_sample: int = 0):
        """The data package's DataIterator: next() -> this rank's micro-batches of the next global batch;
        `.consumed_samples` is the data position."""
        from ..data.sampler import DataIterator

        r, w = (dims.dp_rank, dims.dp_size) if dims is not None else (0, 1)
        return DataIterator(self.train, global_batch, micro_batch, dp_rank=r, dp_size=w, start_sample=start_sample,
                            seed=self.seed)

    def valid_batches(self, n_batches: int, micro_batch: int, dims) -> list[dict]:
        """The fixed validation set: micro-batches b = 0..n-1 of the first n x micro samples, in order;
        rank r of W takes b = r, r+W, ... The set does not depend on W."""
        from ..data.sampler import collate

        n_avail = len(self.valid) // micro_batch
        if n_avail == 0:
            raise UserError(f"the validation split has {len(self.valid)} samples, fewer than one micro-batch "
                            f"({micro_batch}); use more data or a smaller train.micro_batch_size")
        n = min(n_batches, n_avail)
        r, w = (dims.dp_rank, dims.dp_size) if dims is not None else (0, 1)
        return [collate([self.valid[j] for j in range(b * micro_batch, (b + 1) * micro_batch)])
                for b in range(r, n, w)]

    def first_train_batches(self, n_batches: int, micro_batch: int) -> list[dict]:
        it = self.train_iterator(n_batches * micro_batch, micro_batch, None)
        return next(it)


def build_train_data(cfg, dims=None, need_train: bool = True) -> TrainData:
    from ..data.indexed_dataset import IndexedDataset
    from ..data.tokenizer import Tokenizer

    prefix, tok_path = _serial(dims, lambda: resolve_sources(cfg))
    tok = Tokenizer(tok_path)
    vocab = padded_vocab_size(tok.vocab_size, cfg.model)
    train_docs = IndexedDataset(prefix + "_train")
    valid_docs = IndexedDataset(prefix + "_valid")
    train = objective_dataset(cfg, train_docs, tok, "train")
    valid = objective_dataset(cfg, valid_docs, tok, "valid")
    if len(train) == 0:
        raise UserError(f"{prefix}_train holds too few tokens for one sample of data.seq_len={cfg.data.seq_len}")
    return TrainData(tok, vocab, train, valid, cfg.data.seed)


def _serial(dims, fn):
    """Rank 0 first (it may build and cache the default corpus), then the others read the cache."""
    from ..parallel.distributed import barrier

    if dims is None or not dims.is_distributed:
        return fn()
    if dims.is_main:
        out = fn()
        barrier(dims)
        return out
    barrier(dims)
    return fn()


# --------------------------------------------------------------------------- objectives


def objective_dataset(cfg, docs, tok, split: str):
    from ..data.objectives import build_objective

    d = cfg.data
    # T5's noise density is the config's mask rate (paper: 15% for both MLM and span corruption).
    return build_objective(cfg.model.arch, docs, tok, d.seq_len, seed=d.seed + (0 if split == "train" else 1),
                           mask_rate=d.mask_rate, noise_density=d.mask_rate, mean_span=d.mean_span_length)


def raw_token_streams(cfg) -> tuple[np.ndarray, np.ndarray, int]:
    """(train tokens, valid tokens, padded vocab) of the run's data, for the unigram baseline."""
    from ..data.indexed_dataset import IndexedDataset
    from ..data.tokenizer import Tokenizer

    prefix, tok_path = resolve_sources(cfg)
    vocab = padded_vocab_size(Tokenizer(tok_path).vocab_size, cfg.model)

    def flat(p):
        ds = IndexedDataset(p)
        if getattr(ds, "tokens", None) is not None:  # the whole .bin as one memmap: no copy per document
            return np.asarray(ds.tokens)
        return np.concatenate([np.asarray(ds[i]) for i in range(len(ds))]) if len(ds) else np.zeros(0, np.int64)

    return flat(prefix + "_train"), flat(prefix + "_valid"), vocab
