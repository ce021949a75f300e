"""Fixed-length training samples for each pretraining objective, over a packed token stream.

Documents are concatenated (in a seeded order) with an EOS after each one and cut into fixed windows,
Megatron-style: no padding, no wasted compute, and the number of samples is known up front. The sample
index (which document and offset a sample starts at) is a vectorised function of the sample number
(`searchsorted` on the cumulative document lengths) rather than a materialised table, so it costs
O(documents) memory whatever the number of samples.

Every random choice (masked positions, replacement tokens, noise spans) comes from
``np.random.default_rng([seed, idx])``: a sample is a pure function of (seed, sample index), so resuming,
or re-sharding over a different number of data-parallel ranks, reproduces the exact same tokens.
"""
from __future__ import annotations

import numpy as np

from ssd_megatron.data.indexed_dataset import IndexedDataset
from ssd_megatron.data.tokenizer import SpecialIds, as_special_ids
from ssd_megatron.errors import UserError

IGNORE_INDEX = -100
_DOC_ORDER_TAG = 2 ** 40 + 17  # keeps the document-order RNG stream apart from per-sample streams
ARCH_OBJECTIVE = {"gpt": "causal", "llama": "causal", "bert": "mlm", "t5": "span"}


class PackedStream:
    """Documents concatenated with EOS separators, read as one long virtual token sequence.

    A separator is added only after documents that don't already end in EOS (``--append-eos``
    corpora), and empty documents contribute nothing, so either way of preprocessing packs alike.
    Whether documents end in EOS is decided from up to 1024 documents spread over the corpus; only if
    those disagree is every document checked (one preprocessing run makes them all agree, and the full
    check would read a page of ``.bin`` per document: the whole file, for a large corpus).
    Memory: two integers per document (the packing order and cumulative ends).
    """

    def __init__(self, ds: IndexedDataset, eos_id: int, seed: int | None = None):
        self.ds, self.eos_id = ds, int(eos_id)
        sizes = np.asarray(ds.sizes, dtype=np.int64)
        n = len(sizes)
        sep = (sizes > 0).astype(np.int64)
        nonempty = np.flatnonzero(sizes > 0)
        if len(nonempty):
            probe = nonempty[np.unique(np.linspace(0, len(nonempty) - 1, min(1024, len(nonempty))).astype(np.int64))]
            ends_eos = self._ends_with_eos(probe, sizes)
            if ends_eos.all():
                sep[:] = 0
            elif ends_eos.any():
                sep[nonempty] = ~self._ends_with_eos(nonempty, sizes)
        index_dtype = np.int32 if n < 2 ** 31 else np.int64
        self.order = (np.arange(n, dtype=index_dtype) if seed is None
                      else np.random.default_rng([int(seed), _DOC_ORDER_TAG]).permutation(n).astype(index_dtype))
        self.ends = np.cumsum(sizes[self.order] + sep[self.order])
        self.total = int(self.ends[-1]) if n else 0

    def _ends_with_eos(self, docs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        last = self.ds.tokens[self.ds.token_offsets[docs] + sizes[docs] - 1]
        return np.asarray(last) == self.eos_id

    def _start(self, k: np.ndarray) -> np.ndarray:
        return np.where(k > 0, self.ends[np.maximum(k - 1, 0)], 0)

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised: (packed document number, offset inside it) of each stream position."""
        positions = np.asarray(positions, dtype=np.int64)
        k = np.searchsorted(self.ends, positions, side="right")
        return k, positions - self._start(k)

    def read(self, start: int, length: int) -> np.ndarray:
        """Stream tokens [start, start+length) as int64."""
        out = np.empty(length, dtype=np.int64)
        k, off = (int(v) for v in self.locate(start))
        filled = 0
        while filled < length:
            doc = int(self.order[k])
            n_real = int(self.ds.sizes[doc])
            if off < n_real:
                take = min(n_real - off, length - filled)
                out[filled:filled + take] = self.ds.get(doc, off, take)
            else:  # the separator after document k
                take = 1
                out[filled] = self.eos_id
            filled += take
            off += take
            if off >= int(self.ends[k]) - (int(self.ends[k - 1]) if k else 0):
                k, off = k + 1, 0
        return out


class _WindowDataset:
    """Base: sample i is stream window [i*stride, i*stride + window)."""

    objective = ""

    def __init__(self, ds: IndexedDataset, window: int, stride: int, ids, seed: int, shuffle_documents: bool,
                 seq_len: int):
        self.ids: SpecialIds = as_special_ids(ids)
        self.seed, self.seq_len, self.window, self.stride = int(seed), int(seq_len), int(window), int(stride)
        self.stream = PackedStream(ds, self.ids.eos_id, self.seed if shuffle_documents else None)
        self.num_samples = max(0, (self.stream.total - (window - stride)) // stride)
        if self.num_samples == 0:
            raise UserError(f"indexed dataset {getattr(ds, 'prefix', ds)} has {self.stream.total} tokens, fewer "
                            f"than one {self.objective} sample of data.seq_len={seq_len} needs ({window})")

    def __len__(self) -> int:
        return self.num_samples

    def sample_index(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """(packed document number, token offset) where each sample in `idx` starts."""
        return self.stream.locate(np.asarray(idx, dtype=np.int64) * self.stride)

    def raw_window(self, idx: int) -> np.ndarray:
        idx = int(idx)
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        return self.stream.read(idx * self.stride, self.window)

    def rng(self, idx: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(idx)])


class CausalLMDataset(_WindowDataset):
    """GPT/LLaMA: windows of L+1 tokens overlapping by one; labels[t] is the token after input_ids[t]."""

    objective = "causal"

    def __init__(self, ds, seq_len: int, tokenizer_ids, seed: int = 0, shuffle_documents: bool = True):
        super().__init__(ds, seq_len + 1, seq_len, tokenizer_ids, seed, shuffle_documents, seq_len)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        w = self.raw_window(idx)
        return {"input_ids": w[:-1].copy(), "labels": w[1:].copy()}


class MaskedLMDataset(_WindowDataset):
    """BERT: ``[CLS] window [SEP]``; 15% of ordinary tokens chosen, of those 80% [MASK] / 10% random / 10% kept."""

    objective = "mlm"

    def __init__(self, ds, seq_len: int, tokenizer_ids, mask_rate: float = 0.15, seed: int = 0,
                 shuffle_documents: bool = True):
        if seq_len < 3:
            raise UserError(f"data.seq_len: {seq_len} is too short for MLM (accepted: >= 3)")
        if not 0.0 < mask_rate < 1.0:
            raise UserError(f"data.mask_rate: {mask_rate} is not accepted (accepted: 0 < x < 1)")
        super().__init__(ds, seq_len - 2, seq_len - 2, tokenizer_ids, seed, shuffle_documents, seq_len)
        self.mask_rate = float(mask_rate)
        self.special = np.asarray(self.ids.all_special, dtype=np.int64)
        self.ordinary = np.setdiff1d(np.arange(self.ids.vocab_size, dtype=np.int64), self.special)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        body = self.raw_window(idx)
        tokens = np.concatenate([[self.ids.cls_id], body, [self.ids.sep_id]]).astype(np.int64)
        rng = self.rng(idx)
        candidates = np.flatnonzero(~np.isin(tokens, self.special))
        n_pick = min(len(candidates), max(1, int(round(self.mask_rate * len(candidates))))) if len(candidates) else 0
        chosen = np.sort(rng.choice(candidates, n_pick, replace=False)) if n_pick else candidates[:0]
        labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
        labels[chosen] = tokens[chosen]
        u = rng.random(n_pick)
        inputs = tokens.copy()
        inputs[chosen[u < 0.8]] = self.ids.mask_id
        rand_pos = chosen[(u >= 0.8) & (u < 0.9)]
        inputs[rand_pos] = self.ordinary[rng.integers(0, len(self.ordinary), len(rand_pos))]
        return {"input_ids": inputs, "labels": labels, "attention_mask": np.ones(len(tokens), dtype=np.int64)}


def _noise_counts(raw_len: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a window of raw_len tokens; the one rule both the length
    computation and the mask generator use, so their lengths always agree."""
    noise = min(max(int(round(raw_len * noise_density)), 1), raw_len - 1)
    return noise, max(1, int(round(noise / mean_span)))


def span_corruption_lengths(input_len: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(raw tokens per sample, decoder length) so that corrupted inputs (+EOS) fit in `input_len`.

    Corruption keeps the non-noise tokens and one sentinel per span, plus EOS; targets are one
    sentinel per span, the noise tokens, plus EOS. Both grow monotonically with the raw length, so
    the largest raw length whose encoder length fits is found by walking up from input_len - 1.
    """
    def encoded(raw: int) -> tuple[int, int]:
        noise, spans = _noise_counts(raw, noise_density, mean_span)
        return raw - noise + spans + 1, noise + spans + 1

    raw = max(2, input_len - 1)
    if encoded(raw)[0] > input_len:
        raise UserError(f"data.seq_len: {input_len} is too short for span corruption (accepted: >= 4)")
    while encoded(raw + 1)[0] <= input_len:
        raw += 1
    return raw, encoded(raw)[1]


def _segment(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random split of `total` items into `parts` non-empty runs (lengths)."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else np.empty(0, int)
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def span_noise_mask(raw_len: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask: alternating kept and noise runs, starting with a kept run, T5-style."""
    noise, spans = _noise_counts(raw_len, noise_density, mean_span)
    runs = np.stack([_segment(raw_len - noise, spans, rng), _segment(noise, spans, rng)], axis=1).ravel()
    return np.repeat(np.tile([False, True], spans), runs)


class SpanCorruptionDataset(_WindowDataset):
    """T5: noise spans replaced by sentinels in the encoder input; the decoder predicts them."""

    objective = "span"

    def __init__(self, ds, input_len: int, tokenizer_ids, noise_density: float = 0.15, mean_span: float = 3.0,
                 seed: int = 0, shuffle_documents: bool = True):
        if not 0.0 < noise_density < 1.0:
            raise UserError(f"data.mask_rate (T5 noise density): {noise_density} is not accepted (accepted: 0 < x < 1)")
        if mean_span < 1.0:
            raise UserError(f"data.mean_span_length: {mean_span} is not accepted (accepted: >= 1)")
        raw_len, target_len = span_corruption_lengths(input_len, noise_density, mean_span)
        noise, spans = _noise_counts(raw_len, noise_density, mean_span)
        ids = as_special_ids(tokenizer_ids)
        if spans > len(ids.sentinel_ids):
            raise UserError(f"data.seq_len: {input_len} needs {spans} noise spans but the tokenizer has "
                            f"{len(ids.sentinel_ids)} sentinels (accepted: a shorter seq_len or larger data.mean_span_length)")
        if raw_len - noise < spans:
            raise UserError(f"data.mask_rate (T5 noise density): {noise_density} leaves fewer kept tokens than spans "
                            "(accepted: a smaller density)")
        super().__init__(ds, raw_len, raw_len, ids, seed, shuffle_documents, input_len)
        self.noise_density, self.mean_span = float(noise_density), float(mean_span)
        self.input_len, self.raw_len, self.target_len = int(input_len), raw_len, target_len
        self.sentinels = np.asarray(self.ids.sentinel_ids, dtype=np.int64)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        tokens = self.raw_window(idx)
        noise = span_noise_mask(self.raw_len, self.noise_density, self.mean_span, self.rng(idx))
        prev = np.concatenate([[False], noise[:-1]])
        noise_start, keep_start = noise & ~prev, ~noise & np.concatenate([[True], prev[1:]])
        keep_start[0] = True
        # Encoder: kept tokens, each noise span collapsed to its sentinel. Decoder: each kept run
        # collapsed to the sentinel of the span that follows it (runs alternate kept/noise, starting
        # with kept and ending with noise, so kept run k always precedes span k).
        enc = np.where(noise_start, self.sentinels[np.cumsum(noise_start) - 1], tokens)[~noise | noise_start]
        tgt = np.where(keep_start, self.sentinels[np.cumsum(keep_start) - 1], tokens)[noise | keep_start]
        eos = [self.ids.eos_id]
        enc, tgt = np.concatenate([enc, eos]), np.concatenate([tgt, eos])
        input_ids = np.full(self.input_len, self.ids.pad_id, dtype=np.int64)
        input_ids[:len(enc)] = enc
        labels = np.full(self.target_len, IGNORE_INDEX, dtype=np.int64)
        labels[:len(tgt)] = tgt
        dec = np.full(self.target_len, self.ids.pad_id, dtype=np.int64)
        dec[1:len(tgt)] = tgt[:-1]  # decoder starts from pad, as in T5
        return {"input_ids": input_ids, "decoder_input_ids": dec, "labels": labels}


def build_objective(arch: str, ds: IndexedDataset, tokenizer, seq_len: int, seed: int = 0, *,
                    mask_rate: float = 0.15, noise_density: float = 0.15, mean_span: float = 3.0,
                    shuffle_documents: bool = True):
    """The sample dataset for a model family: gpt|llama causal LM, bert MLM, t5 span corruption."""
    kind = ARCH_OBJECTIVE.get(str(arch).lower())
    if kind is None:
        raise UserError(f"model.arch: {arch!r} has no data objective (accepted: {', '.join(ARCH_OBJECTIVE)})")
    if int(seq_len) < 2:
        raise UserError(f"data.seq_len: {seq_len} is not accepted (accepted: an integer >= 2)")
    if kind == "causal":
        return CausalLMDataset(ds, seq_len, tokenizer, seed=seed, shuffle_documents=shuffle_documents)
    if kind == "mlm":
        return MaskedLMDataset(ds, seq_len, tokenizer, mask_rate=mask_rate, seed=seed,
                               shuffle_documents=shuffle_documents)
    return SpanCorruptionDataset(ds, seq_len, tokenizer, noise_density=noise_density, mean_span=mean_span,
                                 seed=seed, shuffle_documents=shuffle_documents)
