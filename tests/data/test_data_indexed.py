"""Indexed dataset: exact round trip, Megatron header layout, and corrupt files named in UserErrors."""
import os
import struct

import numpy as np
import pytest

from ssd_megatron.data.indexed_dataset import MAGIC, IndexedDataset, IndexedDatasetWriter
from ssd_megatron.errors import UserError


def _write(prefix, docs, vocab_size=1000):
    with IndexedDatasetWriter(prefix, vocab_size) as w:
        for d in docs:
            w.add_document(d)


def test_roundtrip_and_layout(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, rng.integers(0, 50)) for _ in range(300)]  # includes empty documents
    prefix = str(tmp_path / "sub" / "ds")
    _write(prefix, docs)
    ds = IndexedDataset(prefix)
    assert len(ds) == 300 and ds.dtype == np.uint16
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert np.array_equal(ds.sizes, [len(d) for d in docs])
    for i in (0, 1, 17, 299, -1):
        assert np.array_equal(ds[i], docs[i])
    assert np.array_equal(ds.get(5, 2, 3), docs[5][2:5])
    with pytest.raises(IndexError):
        ds[300]
    with open(prefix + ".idx", "rb") as f:  # Megatron-LM MMapIndexedDataset header
        magic, version, code, n, n_doc = struct.unpack("<9sQBQQ", f.read(34))
    assert (magic, version, code, n, n_doc) == (MAGIC, 1, 8, 300, 301)
    assert np.array_equal(ds.document_indices, np.arange(301))
    assert [p.name for p in tmp_path.joinpath("sub").iterdir() if p.name.startswith(".")] == []
    assert IndexedDataset(prefix + ".bin").num_tokens == ds.num_tokens  # PREFIX.bin / .idx accepted


def test_large_vocab_uses_int32_and_empty_dataset(tmp_path):
    _write(tmp_path / "big", [[70000, 1, 2]], vocab_size=100000)
    ds = IndexedDataset(tmp_path / "big")
    assert ds.dtype == np.int32 and list(ds[0]) == [70000, 1, 2]
    _write(tmp_path / "empty", [])
    assert len(IndexedDataset(tmp_path / "empty")) == 0


def test_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x", 1000) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "ds")
    _write(prefix, [np.arange(10), np.arange(7), np.arange(3)])
    return prefix


def _expect_error(prefix, filename):
    with pytest.raises(UserError) as e:
        IndexedDataset(prefix)
    assert filename in str(e.value) and "\n" not in str(e.value)


def test_truncated_bin(good):
    with open(good + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(good + ".bin") - 2)
    _expect_error(good, "ds.bin")


def test_truncated_idx(good):
    for size in (os.path.getsize(good + ".idx") - 8, 20):
        with open(good + ".idx", "r+b") as f:
            f.truncate(size)
        _expect_error(good, "ds.idx")


def test_flipped_magic_and_bad_version(good):
    raw = bytearray(open(good + ".idx", "rb").read())
    raw[0] ^= 0xFF
    open(good + ".idx", "wb").write(bytes(raw))
    _expect_error(good, "ds.idx")
    raw[0] ^= 0xFF
    raw[9] = 7  # version
    open(good + ".idx", "wb").write(bytes(raw))
    _expect_error(good, "ds.idx")


def test_inconsistent_sizes(good):
    raw = bytearray(open(good + ".idx", "rb").read())
    raw[34:38] = struct.pack("<i", 9)  # first size 10 -> 9: .bin no longer matches
    open(good + ".idx", "wb").write(bytes(raw))
    _expect_error(good, "ds")


def test_missing_files(good):
    os.unlink(good + ".bin")
    _expect_error(good, "ds.bin")
    _expect_error(good + "_nope", "ds_nope.idx")
