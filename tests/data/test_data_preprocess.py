"""Preprocess: exact token round trip for text/jsonl inputs, worker-count independence, split by
document hash, flat memory on 10^5 documents, and one-line errors with exit code 2."""
import filecmp
import gzip
import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from ssd_megatron.data.cli import main
from ssd_megatron.data.indexed_dataset import IndexedDataset
from ssd_megatron.data.preprocess import is_valid_document, iter_documents, preprocess
from ssd_megatron.data.tokenizer import Tokenizer
from ssd_megatron.errors import UserError


def _expected_docs(corpus):
    return corpus["texts"] + corpus["jdocs"] + corpus["jdocs"][:5]


def _inputs(corpus):
    return corpus["text_files"] + [corpus["jsonl"], corpus["jsonl_gz"]]


def _read_split(prefix):
    return [list(IndexedDataset(f"{prefix}_{s}")[i]) for s in ("train", "valid")
            for i in range(len(IndexedDataset(f"{prefix}_{s}")))]


def test_roundtrip_text_and_jsonl(tmp_path, corpus, tokenizer_model):
    tok = Tokenizer(tokenizer_model)
    stats = preprocess(_inputs(corpus), tokenizer_model, tmp_path / "out", valid_fraction=0.3, log=None)
    docs = _expected_docs(corpus)
    expected = [tok.encode(t) for t in docs]
    is_valid = [is_valid_document(k, 0.3) for k in range(len(docs))]
    assert 0 < sum(is_valid) < len(docs)  # both splits populated by this fraction
    train, valid = IndexedDataset(tmp_path / "out_train"), IndexedDataset(tmp_path / "out_valid")
    want_train = [e for e, v in zip(expected, is_valid) if not v]
    want_valid = [e for e, v in zip(expected, is_valid) if v]
    assert [list(train[i]) for i in range(len(train))] == want_train
    assert [list(valid[i]) for i in range(len(valid))] == want_valid
    assert stats.documents == len(docs) and stats.tokens == sum(map(len, expected))
    assert stats.train_tokens == train.num_tokens and stats.valid_tokens == valid.num_tokens
    assert tok.decode(train[0]) == docs[is_valid.index(False)]


def test_workers_give_identical_bytes(tmp_path, corpus, tokenizer_model, monkeypatch):
    import ssd_megatron.data.preprocess as pp

    monkeypatch.setattr(pp, "CHUNK_DOCS", 3)  # many small chunks: order across workers really matters
    for w in (1, 2):
        preprocess(_inputs(corpus), tokenizer_model, tmp_path / f"w{w}", workers=w, valid_fraction=0.2,
                   append_eos=True, log=None)
    for split in ("train", "valid"):
        for ext in ("bin", "idx"):
            assert filecmp.cmp(tmp_path / f"w1_{split}.{ext}", tmp_path / f"w2_{split}.{ext}", shallow=False)
    eos = Tokenizer(tokenizer_model).eos_id
    ds = IndexedDataset(tmp_path / "w1_train")
    assert all(ds[i][-1] == eos for i in range(len(ds)))


def test_doc_per_modes(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("a b\nc\n\n\nd e\n  \nf\n", encoding="utf-8")
    assert [t for t, _ in iter_documents(p, "file") if t] == ["a b\nc\n\n\nd e\n  \nf\n"]
    assert [t for t, _ in iter_documents(p, "line") if t] == ["a b", "c", "d e", "f"]
    assert [t for t, _ in iter_documents(p, "blank-line") if t] == ["a b\nc", "d e", "f"]
    assert sum(n for _, n in iter_documents(p, "line")) == p.stat().st_size  # progress sums to file size
    with pytest.raises(UserError, match="--doc-per"):
        list(iter_documents(p, "page"))


def test_jsonl_line_without_text(tmp_path, tokenizer_model):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2:.*\"text\""):
        preprocess([p], tokenizer_model, tmp_path / "o", log=None)
    g = tmp_path / "bad.json.gz"
    with gzip.open(g, "wt") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match=r"bad\.json\.gz:1:"):
        preprocess([g], tokenizer_model, tmp_path / "o", log=None)
    assert not (tmp_path / "o_train.idx").exists()  # nothing half-written


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ssd_megatron.data.cli", *args], capture_output=True, text=True)


def test_cli_errors_exit_2_with_one_line(tmp_path, tokenizer_model):
    r = _run_cli("preprocess", "--input", str(tmp_path / "missing.txt"), "--tokenizer", tokenizer_model,
                 "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "missing.txt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    src = tmp_path / "in.txt"
    src.write_text("hello")
    with pytest.raises(SystemExit) as e:
        main(["preprocess", "--input", str(src), "--tokenizer", str(tmp_path / "none.model"), "--output",
              str(tmp_path / "o")])
    assert e.value.code == 2
    bad = tmp_path / "nt.jsonl"
    bad.write_text('{"title": "x"}\n')
    r = _run_cli("preprocess", "--input", str(bad), "--tokenizer", tokenizer_model, "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "nt.jsonl:1" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_train_and_preprocess(tmp_path, corpus, capsys):
    assert main(["train-tokenizer", "--input", *map(str, corpus["text_files"]), "--vocab-size", "500",
                 "--output", str(tmp_path / "tk")]) == 0
    assert main(["preprocess", "--input", str(corpus["jsonl"]), "--tokenizer", str(tmp_path / "tk.model"),
                 "--output", str(tmp_path / "p"), "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "preprocessed 10 docs" in out and "MB/s" in out
    assert len(IndexedDataset(tmp_path / "p_train")) + len(IndexedDataset(tmp_path / "p_valid")) == 10


def _peak_bytes(tmp_path, tokenizer_model, n_docs):
    src = tmp_path / f"lines{n_docs}.txt"
    with open(src, "w") as f:
        for i in range(n_docs):
            f.write(f"doc {i} x\n")
    tracemalloc.start()
    try:
        stats = preprocess([src], tokenizer_model, tmp_path / f"m{n_docs}", doc_per="line", log=None,
                           valid_fraction=0.01)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.documents == n_docs
    return peak


def test_flat_memory_on_many_documents(tmp_path, tokenizer_model):
    small = _peak_bytes(tmp_path, tokenizer_model, 20_000)
    large = _peak_bytes(tmp_path, tokenizer_model, 100_000)
    # Holding 10^5 documents (as Python strings alone) would take ~6 MB; the streaming peak is a
    # chunk's worth plus fixed buffers, and must not grow with 5x more documents.
    all_docs = sum(sys.getsizeof(f"doc {i} x") for i in range(100_000))
    assert large < all_docs / 8, (large, all_docs)
    assert large < small * 1.3 + 256 * 1024, (small, large)
    tok = Tokenizer(tokenizer_model)
    train, valid = IndexedDataset(tmp_path / "m100000_train"), IndexedDataset(tmp_path / "m100000_valid")
    assert len(train) + len(valid) == 100_000
    k_train = [k for k in range(100_000) if not is_valid_document(k, 0.01)]
    for j in (0, 1, 5000, len(train) - 1):
        assert list(train[j]) == tok.encode(f"doc {k_train[j]} x")
    assert np.array_equal(train.sizes[:100], [len(tok.encode(f"doc {k} x")) for k in k_train[:100]])


def test_vectorised_split_matches_scalar_hash():
    from ssd_megatron.data.preprocess import valid_mask

    for frac in (0.0, 0.01, 0.5, 0.9):
        mask = valid_mask(123_456, 5000, frac)
        assert mask.tolist() == [is_valid_document(k, frac) for k in range(123_456, 128_456)]
    assert abs(valid_mask(0, 100_000, 0.1).mean() - 0.1) < 0.005
