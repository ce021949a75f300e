"""The embedded default corpus builds end to end, is cached, and survives concurrent builders."""
import multiprocessing as mp

from pathlib import Path

import numpy as np

from ssd_megatron.data.cli import main
from ssd_megatron.data.corpus import corpus_info, ensure_default_corpus, stdlib_files
from ssd_megatron.data.indexed_dataset import IndexedDataset
from ssd_megatron.data.objectives import build_objective
from ssd_megatron.data.tokenizer import Tokenizer


def test_stdlib_file_selection():
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.parts[-4:-1])
    assert stdlib_files(5) == files[:5]


def test_tiny_default_corpus_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSD_MEGATRON_CACHE", str(tmp_path / "cache"))
    prefix, tok_path = ensure_default_corpus(max_files=12, vocab_size=600, log=None)
    assert str(tmp_path / "cache") in prefix
    tok = Tokenizer(tok_path)
    train, valid = IndexedDataset(prefix + "_train"), IndexedDataset(prefix + "_valid")
    info = corpus_info(prefix)
    assert info["files"] == 12 and info["documents"] == len(train) + len(valid) > 0
    assert info["train_tokens"] == train.num_tokens and info["valid_tokens"] == valid.num_tokens
    assert tok.vocab_size == 600 and train.dtype == np.uint16
    first = next(f for f in stdlib_files(12) if f.stat().st_size)
    assert tok.decode(train[0]) == first.read_text() or tok.decode(valid[0]) == first.read_text()
    assert build_objective("gpt", train, tok, 64, seed=0)[0]["input_ids"].shape == (64,)
    built = {p: p.stat().st_mtime_ns for p in Path(prefix).parent.iterdir()}
    # second call: cached, nothing rebuilt (same files, untouched)
    assert ensure_default_corpus(max_files=12, vocab_size=600, log=None) == (prefix, tok_path)
    assert {p: p.stat().st_mtime_ns for p in Path(prefix).parent.iterdir()} == built
    assert main(["build-default", "--max-files", "12", "--vocab-size", "600"]) == 0
    assert "default corpus" in capsys.readouterr().out


def _build(cache, q):
    q.put(ensure_default_corpus(cache, max_files=6, vocab_size=500, workers=1, log=None, progress=False))


def test_concurrent_builders_agree(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build, args=(tmp_path, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [results[0][1].split("/")[-2]]  # no temp dirs left
    assert len(IndexedDataset(results[0][0] + "_train")) > 0
