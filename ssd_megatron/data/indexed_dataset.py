"""Memory-mapped indexed token dataset: ``PREFIX.bin`` + ``PREFIX.idx`` (Megatron-LM layout).

``.bin`` is every document's token ids concatenated, in one fixed-width dtype. ``.idx`` is:

    magic      9 bytes  b"MMIDIDX\\x00\\x00"
    version    uint64   1
    dtype      uint8    code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    n_seq      uint64   number of sequences (= documents here)
    n_doc_idx  uint64   length of the document-index array (n_seq + 1)
    sizes      int32[n_seq]      tokens per document
    pointers   int64[n_seq]      byte offset of each document in .bin
    doc_idx    int64[n_doc_idx]  sequence ids where documents start (0, 1, ..., n_seq)

The layout is byte-compatible with Megatron-LM's ``MMapIndexedDataset``, so corpora built by either
tool can be read by the other. Reading is zero-copy (numpy memmap); opening validates the whole index
so a truncated or corrupt file fails early with a message naming it, instead of producing garbage
samples hours into a run.
"""
from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

import numpy as np

from ssd_megatron.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n_seq, n_doc_idx
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_CHUNK = 1 << 13  # entries per buffered write: bounds writer memory (~0.3 MB) regardless of corpus size


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 halves the file for vocabularies below 65500 (Megatron's threshold); int32 otherwise."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def split_prefix(path: str | os.PathLike) -> str:
    """Accept ``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx``."""
    s = str(path)
    return s[:-4] if s.endswith((".bin", ".idx")) else s


def _open_temp(parent: Path, base: str, what: str):
    """A fresh hidden file beside the target (same filesystem, so the final rename is atomic).

    Opened with mode "xb" rather than via `tempfile`, so permissions follow the umask like any
    ordinary output file instead of being 0600.
    """
    while True:
        path = parent / f".{base}.{what}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            return open(path, "xb")
        except FileExistsError:
            continue


class IndexedDatasetWriter:
    """Streams documents into ``PREFIX.bin``/``PREFIX.idx`` with memory independent of corpus size.

    Token ids go straight to a temporary ``.bin``; sizes go through a small buffer to a temporary side
    file. `finalize()` writes the index in chunks and renames both files into place (``.idx`` last, so
    an existing ``.idx`` always describes a complete ``.bin``). Use as a context manager to have the
    temporary files removed if an exception interrupts writing.
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int | None = None, dtype=None):
        self.prefix = split_prefix(prefix)
        if dtype is None:
            if vocab_size is None:
                raise ValueError("IndexedDatasetWriter needs vocab_size or dtype")
            dtype = dtype_for_vocab(vocab_size)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES:
            raise ValueError(f"unsupported dtype {self.dtype}")
        self._max_id = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None
        parent = Path(self.prefix).parent
        base = Path(self.prefix).name
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._bin_tmp = _open_temp(parent, base, "bin")
            self._sizes_tmp = _open_temp(parent, base, "sizes")
        except OSError as e:
            raise UserError(f"output {self.prefix}: cannot write in {parent} ({e.strerror})") from None
        self._sizes_buf = np.empty(_CHUNK, dtype=np.int32)
        self._n_buf = 0
        self.num_docs = 0
        self.num_tokens = 0
        self._done = False

    def _tokens(self, ids) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError("expected a 1-D sequence of token ids")
        if arr.dtype != self.dtype and arr.size and self._max_id is not None and \
                (arr.max() > self._max_id or arr.min() < 0):
            raise ValueError(f"token id out of range for {self.dtype} (ids {int(arr.min())}..{int(arr.max())})")
        return arr.astype(self.dtype, copy=False)

    def add_document(self, ids) -> None:
        self.add_documents(ids, [len(ids)])

    def add_documents(self, flat_ids, lengths) -> None:
        """Append several documents given as one flat token array plus their lengths (one write)."""
        arr = self._tokens(flat_ids)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != arr.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {arr.size} token ids were given")
        self._bin_tmp.write(arr.tobytes())
        done = 0
        while done < len(lengths):
            take = min(len(lengths) - done, _CHUNK - self._n_buf)
            self._sizes_buf[self._n_buf:self._n_buf + take] = lengths[done:done + take]
            self._n_buf += take
            done += take
            if self._n_buf == _CHUNK:
                self._flush_sizes()
        self.num_docs += len(lengths)
        self.num_tokens += arr.size

    def _flush_sizes(self) -> None:
        self._sizes_tmp.write(self._sizes_buf[: self._n_buf].tobytes())
        self._n_buf = 0

    def finalize(self) -> None:
        """Write the index and atomically move ``.bin`` and ``.idx`` into place."""
        if self._done:
            return
        self._flush_sizes()
        self._bin_tmp.flush()
        os.fsync(self._bin_tmp.fileno())  # the rename below must never expose unwritten data after a crash
        self._bin_tmp.close()
        self._sizes_tmp.close()
        n = self.num_docs
        parent, base = Path(self.prefix).parent, Path(self.prefix).name
        idx_tmp = _open_temp(parent, base, "idx")
        try:
            with idx_tmp as f, open(self._sizes_tmp.name, "rb") as sizes_f:
                f.write(_HEADER.pack(MAGIC, VERSION, _CODES[self.dtype], n, n + 1))
                # Three streaming passes over the sizes file: sizes, pointers (running byte offset), doc_idx.
                while chunk := sizes_f.read(4 * _CHUNK):
                    f.write(chunk)
                sizes_f.seek(0)
                offset = 0
                while chunk := sizes_f.read(4 * _CHUNK):
                    sizes = np.frombuffer(chunk, dtype=np.int32).astype(np.int64) * self.dtype.itemsize
                    ends = np.cumsum(sizes) + offset
                    f.write((ends - sizes).tobytes())
                    offset = int(ends[-1])
                for start in range(0, n + 1, _CHUNK):
                    f.write(np.arange(start, min(n + 1, start + _CHUNK), dtype=np.int64).tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._bin_tmp.name, self.prefix + ".bin")
            os.replace(idx_tmp.name, self.prefix + ".idx")
        finally:
            for p in (idx_tmp.name, self._sizes_tmp.name):
                if os.path.exists(p):
                    os.unlink(p)
        self._done = True

    def abort(self) -> None:
        """Drop everything written so far (nothing ever appears under the final names)."""
        for f in (self._bin_tmp, self._sizes_tmp):
            f.close()
            if os.path.exists(f.name):
                os.unlink(f.name)
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False


class IndexedDataset:
    """Read-only, memory-mapped view of ``PREFIX.bin``/``PREFIX.idx``; ``ds[i]`` is document i's ids."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = split_prefix(prefix)
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise UserError(f"indexed dataset file {p} does not exist (build it with `ssd-data preprocess`)")
        idx_size = os.path.getsize(idx_path)
        if idx_size < _HEADER.size:
            raise UserError(f"indexed dataset index {idx_path} is truncated ({idx_size} bytes, header needs "
                            f"{_HEADER.size})")
        with open(idx_path, "rb") as f:
            magic, version, code, n, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise UserError(f"indexed dataset index {idx_path} has bad magic bytes {magic!r} "
                            f"(expected {MAGIC!r}: not an .idx file or corrupt)")
        if version != VERSION:
            raise UserError(f"indexed dataset index {idx_path} has version {version} (accepted: {VERSION})")
        if code not in DTYPES:
            raise UserError(f"indexed dataset index {idx_path} has unknown dtype code {code} "
                            f"(accepted: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        expected = _HEADER.size + 4 * n + 8 * n + 8 * n_doc
        if idx_size != expected:
            what = "truncated" if idx_size < expected else "corrupt (trailing bytes)"
            raise UserError(f"indexed dataset index {idx_path} is {what}: {idx_size} bytes, expected {expected} "
                            f"for {n} documents")
        self._idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        off = _HEADER.size
        self.sizes = np.frombuffer(self._idx, dtype=np.int32, count=n, offset=off)
        self.pointers = np.frombuffer(self._idx, dtype=np.int64, count=n, offset=off + 4 * n)
        self.document_indices = np.frombuffer(self._idx, dtype=np.int64, count=n_doc, offset=off + 12 * n)
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        bin_size = os.path.getsize(bin_path)
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise UserError(f"indexed dataset data {bin_path} has {bin_size} bytes but its index {idx_path} "
                            f"describes {self.num_tokens} tokens of {self.dtype} "
                            f"({self.num_tokens * self.dtype.itemsize} bytes): truncated or mismatched")
        if n and ((self.sizes < 0).any() or self.pointers[0] != 0 or
                  (np.diff(self.pointers) != self.sizes[:-1].astype(np.int64) * self.dtype.itemsize).any()):
            raise UserError(f"indexed dataset index {idx_path} is corrupt (sizes and offsets disagree)")
        self._bin = (np.memmap(bin_path, dtype=self.dtype, mode="r") if bin_size
                     else np.empty(0, dtype=self.dtype))

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._bin[start:start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Part of document `i` (tokens [offset, offset+length)) without touching the rest."""
        doc = self[i]
        end = len(doc) if length is None else min(len(doc), offset + length)
        return doc[offset:end]

    @property
    def token_offsets(self) -> np.ndarray:
        """Start of each document in units of tokens (for vectorised gathers over the whole .bin)."""
        return self.pointers // self.dtype.itemsize

    @property
    def tokens(self) -> np.ndarray:
        """The whole token stream, memory-mapped."""
        return self._bin

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, docs={len(self)}, tokens={self.num_tokens}, dtype={self.dtype})"
