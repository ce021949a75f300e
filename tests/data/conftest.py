"""Shared fixtures for the data tests: a small mixed corpus and a tokenizer trained on it (once)."""
import gzip
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from ssd_megatron.data.indexed_dataset import IndexedDatasetWriter
from ssd_megatron.data.tokenizer import SpecialIds, train_tokenizer

VOCAB = 800


def stdlib_texts(n: int, start: int = 0) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[start:start + n]
    return [f.read_text(encoding="utf-8") for f in files]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Plain-text documents (one per file), a .jsonl and a .jsonl.gz of further documents."""
    d = tmp_path_factory.mktemp("corpus")
    texts = stdlib_texts(6)
    text_files = []
    for i, t in enumerate(texts):
        p = d / f"doc{i}.py"
        p.write_text(t, encoding="utf-8")
        text_files.append(p)
    jdocs = [t[:3000] for t in stdlib_texts(8, start=6)] + ["héllo wörld ✓ — unicode", "x = 1\n\n\ty = 2\n"]
    jl = d / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "meta": {"i": i}}) + "\n" for i, t in enumerate(jdocs)),
                  encoding="utf-8")
    gz = d / "docs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        for t in jdocs[:5]:
            f.write(json.dumps({"text": t}) + "\n")
    return {"dir": d, "text_files": text_files, "texts": texts, "jsonl": jl, "jsonl_gz": gz, "jdocs": jdocs}


@pytest.fixture(scope="session")
def tokenizer_model(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer(corpus["text_files"] + [corpus["jsonl"]], VOCAB, out)


def synthetic_ids(vocab_size: int = 1000) -> SpecialIds:
    return SpecialIds(vocab_size=vocab_size)


def write_random_dataset(prefix, n_docs: int, vocab_size: int = 1000, seed: int = 0, max_len: int = 60,
                         ids: SpecialIds | None = None) -> list[np.ndarray]:
    """Documents of ordinary (non-special) random tokens; returns them for comparison."""
    ids = ids or synthetic_ids(vocab_size)
    ordinary = np.setdiff1d(np.arange(vocab_size), ids.all_special)
    rng = np.random.default_rng(seed)
    docs = [ordinary[rng.integers(0, len(ordinary), rng.integers(1, max_len))] for _ in range(n_docs)]
    with IndexedDatasetWriter(prefix, vocab_size) as w:
        for d in docs:
            w.add_document(d)
    return docs


@pytest.fixture
def make_random_dataset():
    """The `write_random_dataset` helper, as a fixture (test modules here are not a package)."""
    return write_random_dataset


@pytest.fixture
def special_ids():
    return synthetic_ids()
