"""Objectives: packing, label alignment, masking statistics, span-corruption reconstruction, determinism."""
import numpy as np
import pytest

from ssd_megatron.data.indexed_dataset import IndexedDataset
from ssd_megatron.data.objectives import (IGNORE_INDEX, CausalLMDataset, MaskedLMDataset, SpanCorruptionDataset,
                                          build_objective, span_corruption_lengths)
from ssd_megatron.errors import UserError


@pytest.fixture
def data(tmp_path, make_random_dataset, special_ids):
    docs = make_random_dataset(tmp_path / "ds", 400, ids=special_ids)
    return IndexedDataset(tmp_path / "ds"), docs, special_ids


def _stream(docs, order, eos):
    return np.concatenate([np.append(docs[k], eos) for k in order])


def test_causal_windows_and_shifted_labels(data):
    ds, docs, ids = data
    for shuffle in (False, True):
        o = CausalLMDataset(ds, 32, ids, seed=3, shuffle_documents=shuffle)
        order = o.stream.order if shuffle else range(len(docs))
        stream = _stream(docs, order, ids.eos_id)
        assert len(o) == (len(stream) - 1) // 32
        for i in (0, 1, 7, len(o) - 1):
            s = o[i]
            assert s["input_ids"].dtype == np.int64 and s["input_ids"].shape == s["labels"].shape == (32,)
            assert np.array_equal(s["input_ids"], stream[i * 32:(i + 1) * 32])
            assert np.array_equal(s["labels"], stream[i * 32 + 1:(i + 1) * 32 + 1])
    assert not np.array_equal(CausalLMDataset(ds, 32, ids, seed=3).stream.order, np.arange(len(docs)))
    doc_k, off = o.sample_index(np.arange(len(o)))  # vectorised sample index agrees with the reader
    i = 11
    assert o[i]["input_ids"][0] == (docs[o.stream.order[doc_k[i]]][off[i]]
                                    if off[i] < len(docs[o.stream.order[doc_k[i]]]) else ids.eos_id)


def test_documents_already_ending_in_eos_are_not_doubled(tmp_path, special_ids, make_random_dataset):
    docs = make_random_dataset(tmp_path / "a", 50, ids=special_ids)
    from ssd_megatron.data.indexed_dataset import IndexedDatasetWriter

    with IndexedDatasetWriter(tmp_path / "b", 1000) as w:
        for d in docs:
            w.add_document(np.append(d, special_ids.eos_id))
    a = CausalLMDataset(IndexedDataset(tmp_path / "a"), 16, special_ids, shuffle_documents=False)
    b = CausalLMDataset(IndexedDataset(tmp_path / "b"), 16, special_ids, shuffle_documents=False)
    assert len(a) == len(b) and all(np.array_equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(len(a)))
    with IndexedDatasetWriter(tmp_path / "c", 1000) as w:  # mixed: every other document ends in EOS
        for j, d in enumerate(docs):
            w.add_document(np.append(d, special_ids.eos_id) if j % 2 else d)
        w.add_document([])  # empty documents add nothing, not even a separator
    c = CausalLMDataset(IndexedDataset(tmp_path / "c"), 16, special_ids, shuffle_documents=False)
    assert c.stream.total == a.stream.total
    assert all(np.array_equal(a[i]["labels"], c[i]["labels"]) for i in range(len(a)))


def test_mlm_rates_and_special_tokens(data):
    ds, docs, ids = data
    o = MaskedLMDataset(ds, 64, ids, seed=5, shuffle_documents=False)
    stream = _stream(docs, range(len(docs)), ids.eos_id)
    special = set(ids.all_special)
    chosen = masked = randomised = kept = candidates = 0
    for i in range(len(o)):
        s = o[i]
        inp, lab = s["input_ids"], s["labels"]
        assert inp.shape == lab.shape == s["attention_mask"].shape == (64,) and s["attention_mask"].all()
        assert inp[0] == ids.cls_id and inp[-1] == ids.sep_id
        original = np.concatenate([[ids.cls_id], stream[i * 62:(i + 1) * 62], [ids.sep_id]])
        sel = lab != IGNORE_INDEX
        assert np.array_equal(lab[sel], original[sel]) and np.array_equal(inp[~sel], original[~sel])
        assert not any(int(t) in special for t in original[sel])  # specials are never selected
        ordinary = np.array([int(t) not in special for t in original])
        candidates += ordinary.sum()
        chosen += sel.sum()
        masked += (inp[sel] == ids.mask_id).sum()
        rnd = sel & (inp != original) & (inp != ids.mask_id)
        assert not any(int(t) in special for t in inp[rnd])  # random replacements are ordinary tokens
        randomised += rnd.sum()
        kept += (sel & (inp == original)).sum()
    assert abs(chosen / candidates - 0.15) < 0.005
    assert abs(masked / chosen - 0.8) < 0.03
    assert abs(randomised / chosen - 0.1) < 0.025
    assert abs(kept / chosen - 0.1) < 0.025


def test_span_corruption_lengths_match_t5():
    assert span_corruption_lengths(512, 0.15, 3.0) == (568, 114)  # the values T5 uses for its 512 setting
    for n in (16, 64, 100, 256):
        raw, tgt = span_corruption_lengths(n)
        assert raw > n - 1 and tgt < n


def _reconstruct(inputs, labels, ids):
    """Splice each sentinel's target span back into the encoder input (EOS may occur inside the data)."""
    inputs = np.trim_zeros(np.asarray(inputs), "b") if ids.pad_id == 0 else np.asarray(inputs)
    labels = np.asarray(labels)
    labels = labels[labels != IGNORE_INDEX]
    assert inputs[-1] == ids.eos_id and labels[-1] == ids.eos_id
    sentinel_pos = {s: k for k, s in enumerate(ids.sentinel_ids)}
    spans, cur = {}, None
    for t in labels[:-1].tolist():
        if t in sentinel_pos:
            cur = sentinel_pos[t]
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inputs[:-1].tolist():
        out.extend(spans[sentinel_pos[t]] if t in sentinel_pos else [t])
    return out


def test_span_corruption_reconstructs_and_shifts(data):
    ds, _, ids = data
    o = SpanCorruptionDataset(ds, 64, ids, seed=9)
    noise_tokens = raw_tokens = 0
    for i in range(0, len(o), 3):
        s = o[i]
        raw = o.raw_window(i)
        assert s["input_ids"].shape == (64,) and s["labels"].shape == s["decoder_input_ids"].shape == (o.target_len,)
        assert _reconstruct(s["input_ids"].tolist(), s["labels"].tolist(), ids) == raw.tolist()
        lab = s["labels"][s["labels"] != IGNORE_INDEX]
        assert lab[-1] == ids.eos_id and lab[0] == ids.sentinel_ids[0]
        assert s["decoder_input_ids"][0] == ids.pad_id and np.array_equal(s["decoder_input_ids"][1:len(lab)], lab[:-1])
        n_spans = int(np.isin(lab, ids.sentinel_ids).sum())
        noise_tokens += len(lab) - 1 - n_spans
        raw_tokens += len(raw)
    assert abs(noise_tokens / raw_tokens - 0.15) < 0.01


def test_samples_are_pure_functions_of_seed_and_index(data):
    ds, _, ids = data
    for cls, kw in ((MaskedLMDataset, {"seq_len": 48}), (SpanCorruptionDataset, {"input_len": 48})):
        a, b, c = cls(ds, tokenizer_ids=ids, seed=1, **kw), cls(ds, tokenizer_ids=ids, seed=1, **kw), \
            cls(ds, tokenizer_ids=ids, seed=2, **kw)
        _ = [b[j] for j in range(20)]  # access history must not matter
        for i in (0, 5, 17):
            assert all(np.array_equal(a[i][k], b[i][k]) for k in a[i])
        assert any(not np.array_equal(a[i]["input_ids"], c[i]["input_ids"]) for i in range(5))


def test_factory_and_errors(data, tmp_path, make_random_dataset):
    ds, _, ids = data
    assert isinstance(build_objective("gpt", ds, ids, 32, seed=0), CausalLMDataset)
    assert isinstance(build_objective("llama", ds, ids, 32, seed=0), CausalLMDataset)
    assert isinstance(build_objective("bert", ds, ids, 32, seed=0), MaskedLMDataset)
    t5 = build_objective("t5", ds, ids, 32, seed=0)
    assert isinstance(t5, SpanCorruptionDataset) and t5[0]["input_ids"].shape == (32,)
    with pytest.raises(UserError, match="model.arch"):
        build_objective("rnn", ds, ids, 32)
    with pytest.raises(UserError, match="sentinels"):
        build_objective("t5", ds, ids, 4096)
    make_random_dataset(tmp_path / "tiny", 2, max_len=5, ids=ids)
    with pytest.raises(UserError, match="tiny"):
        build_objective("gpt", IndexedDataset(tmp_path / "tiny"), ids, 512)
