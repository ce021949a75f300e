"""Tokenise raw text/jsonl corpora into indexed train/valid datasets (``ssd-data preprocess``).

Everything streams: documents are read one at a time, tokenised in chunks (optionally by a pool of
worker processes) and appended to the writers, so memory does not grow with the corpus. Output is
deterministic and independent of ``--workers``: chunks come back in submission order, and the
train/valid decision for a document is a hash of its ordinal (its position in the input stream), not
of timing or of the random state of any process.
"""
from __future__ import annotations

import collections
import contextlib
import gzip
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ssd_megatron.data.indexed_dataset import IndexedDatasetWriter, dtype_for_vocab
from ssd_megatron.data.tokenizer import Tokenizer
from ssd_megatron.errors import UserError

DOC_PER = ("file", "line", "blank-line")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
CHUNK_DOCS = 256          # documents per task sent to a worker
CHUNK_BYTES = 1 << 20     # ... or fewer, once their text reaches 1 MiB
_MASK64 = (1 << 64) - 1


def is_json_lines(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(JSON_SUFFIXES)


def _open_binary(path: Path):
    """(line iterator over raw bytes, function giving on-disk bytes consumed so far)."""
    raw = open(path, "rb")
    if str(path).lower().endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw, mode="rb"), raw.tell
    return raw, raw, raw.tell


def _decode(line: bytes, path: Path, lineno: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                        "accepted: UTF-8 text or JSON lines") from None


def iter_documents(path: str | os.PathLike, doc_per: str = "file") -> Iterator[tuple[str, int]]:
    """Yield ``(text, disk_bytes)`` for each non-empty document of `path`.

    ``disk_bytes`` is how far the file position moved since the previous document (compressed bytes
    for .gz), so summing it drives a byte progress bar. JSON-lines files (the Pile's format) hold one
    document per line in the ``"text"`` field and ignore `doc_per`.
    """
    path = Path(path)
    if doc_per not in DOC_PER:
        raise UserError(f"--doc-per: {doc_per!r} is not accepted (accepted: {', '.join(DOC_PER)})")
    if not path.is_file():
        raise UserError(f"input file {path} does not exist or is not a regular file")
    raw, stream, tell = _open_binary(path)
    last = 0

    def moved() -> int:
        nonlocal last
        pos = tell()
        d, last = pos - last, pos
        return d

    try:
        if is_json_lines(path):
            for lineno, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not a JSON object ({e.msg}); "
                                    'accepted: one JSON object per line with a "text" field') from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise UserError(f'{path}:{lineno}: JSON line has no string "text" field '
                                    '(accepted: {"text": "...", ...} per line)')
                if obj["text"]:
                    yield obj["text"], moved()
        elif doc_per == "file":
            text = _decode(stream.read(), path, 1)
            if text:
                yield text, moved()
        elif doc_per == "line":
            for lineno, line in enumerate(stream, 1):
                text = _decode(line, path, lineno).rstrip("\r\n")
                if text.strip():
                    yield text, moved()
        else:  # blank-line: paragraphs separated by one or more blank lines
            para: list[str] = []
            for lineno, line in enumerate(stream, 1):
                text = _decode(line, path, lineno)
                if text.strip():
                    para.append(text)
                elif para:
                    yield "".join(para).rstrip("\r\n"), moved()
                    para = []
            if para:
                yield "".join(para).rstrip("\r\n"), moved()
        tail = moved()
        if tail:
            yield "", tail  # empty text: only advances the progress bar
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"input file {path} could not be read ({e})") from None
    finally:
        stream.close()
        raw.close()


def is_valid_document(ordinal: int, valid_fraction: float) -> bool:
    """Deterministic split: splitmix64(ordinal) as a uniform number in [0, 1) below the fraction.

    A hash rather than an RNG stream, so the decision for document k never depends on how the
    documents before it were chunked or which worker tokenised them.
    """
    z = (ordinal + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z < int(valid_fraction * 2.0 ** 64)


def valid_mask(first_ordinal: int, count: int, valid_fraction: float) -> np.ndarray:
    """`is_valid_document` for ordinals [first, first+count), vectorised (uint64 arithmetic wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        z = np.arange(first_ordinal, first_ordinal + count, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    # Compare in integers: float64 cannot represent every uint64, and the split must match exactly.
    threshold = int(valid_fraction * 2.0 ** 64)
    if threshold >= 2 ** 64:
        return np.ones(count, dtype=bool)
    return z < np.uint64(threshold)


# --- tokenisation workers -------------------------------------------------------------------------

_worker_tok: Tokenizer | None = None
_worker_eos: int | None = None
_worker_dtype = None


def _init_worker(model_path: str, append_eos: bool) -> None:
    global _worker_tok, _worker_eos, _worker_dtype
    _worker_tok = Tokenizer(model_path)
    _worker_eos = _worker_tok.eos_id if append_eos else None
    _worker_dtype = dtype_for_vocab(_worker_tok.vocab_size)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One flat token array + per-document lengths: far cheaper to pickle than lists of ints."""
    docs = _worker_tok.encode_batch(texts)
    if _worker_eos is not None:
        for d in docs:
            d.append(_worker_eos)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter((t for d in docs for t in d), dtype=_worker_dtype, count=int(lengths.sum()))
    return flat, lengths


def make_pool(workers: int, initializer: Callable, initargs: tuple):
    """A worker pool, or None for in-process work.

    Fork where the platform has it: workers inherit the loaded modules instantly and never re-run the
    caller's ``__main__`` (spawn re-imports it, which fails for stdin scripts and notebooks). Create the
    pool before any helper thread (tqdm's monitor) exists, so no lock is copied mid-use.
    """
    if workers <= 1:
        initializer(*initargs)
        return None
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method).Pool(workers, initializer=initializer, initargs=initargs)


def ordered_map(fn: Callable, items: Iterator, pool, max_pending: int | None = None) -> Iterator:
    """``map(fn, items)`` over `pool` (None: in process), in order, with at most `max_pending` in flight.

    ``Pool.imap`` would also keep order, but its feeder thread drains the whole input iterator into
    the task queue as fast as it can read, so memory grows with the corpus whenever reading outpaces
    tokenising. A bounded window of ``apply_async`` results gives the same order with flat memory.
    """
    if pool is None:
        yield from map(fn, items)
        return
    max_pending = max_pending or 2 * pool._processes + 2
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@dataclass
class PreprocessStats:
    documents: int = 0
    train_documents: int = 0
    valid_documents: int = 0
    train_tokens: int = 0
    valid_tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return self.train_tokens + self.valid_tokens

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens": self.tokens, "mb_per_s": round(self.mb_per_s, 3)}

    def summary(self, prefix: str) -> str:
        return (f"preprocessed {self.documents} docs ({self.train_documents} train / {self.valid_documents} "
                f"valid), {self.tokens} tokens ({self.train_tokens} / {self.valid_tokens}), "
                f"{self.input_bytes / 1e6:.2f} MB in {self.seconds:.2f} s = {self.mb_per_s:.2f} MB/s "
                f"-> {prefix}_{{train,valid}}.{{bin,idx}}")


def _chunks(inputs: Sequence[Path], doc_per: str) -> Iterator[tuple[list[str], int]]:
    """Group documents into (texts, disk_bytes) tasks of at most CHUNK_DOCS docs / CHUNK_BYTES chars."""
    texts: list[str] = []
    nbytes = size = 0
    for path in inputs:
        for text, moved in iter_documents(path, doc_per):
            nbytes += moved
            if text:
                texts.append(text)
                size += len(text)
            if len(texts) >= CHUNK_DOCS or size >= CHUNK_BYTES:
                yield texts, nbytes
                texts, nbytes, size = [], 0, 0
    if texts or nbytes:
        yield texts, nbytes


def preprocess(
    inputs: Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike | Tokenizer,
    output_prefix: str | os.PathLike,
    *,
    workers: int = 1,
    valid_fraction: float = 0.01,
    append_eos: bool = False,
    doc_per: str = "file",
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
) -> PreprocessStats:
    """Tokenise `inputs` into ``output_prefix_train`` and ``output_prefix_valid`` indexed datasets."""
    if not inputs:
        raise UserError("--input: no input files given (accepted: text, .jsonl, .jsonl.gz, .json.gz files)")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise UserError(f"input file {p} does not exist or is not a regular file")
    if doc_per not in DOC_PER:
        raise UserError(f"--doc-per: {doc_per!r} is not accepted (accepted: {', '.join(DOC_PER)})")
    if not 0.0 <= valid_fraction < 1.0:
        raise UserError(f"--valid-fraction: {valid_fraction} is not accepted (accepted: 0 <= x < 1)")
    if int(workers) < 1:
        raise UserError(f"--workers: {workers} is not accepted (accepted: an integer >= 1)")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)

    prefix = str(output_prefix)
    stats = PreprocessStats()
    total = sum(p.stat().st_size for p in paths)
    t0 = time.perf_counter()
    pool = make_pool(int(workers), _init_worker, (tok.path, append_eos))
    with contextlib.ExitStack() as stack:
        if pool is not None:
            stack.enter_context(pool)  # terminates workers on any exit path
        _write_splits(paths, doc_per, prefix, tok, pool, valid_fraction, total, progress, stats)
    stats.seconds = time.perf_counter() - t0
    if log is not None:
        log(stats.summary(prefix))
    return stats


def _write_splits(paths, doc_per, prefix, tok, pool, valid_fraction, total, progress, stats) -> None:
    from tqdm import tqdm

    with IndexedDatasetWriter(prefix + "_train", tok.vocab_size) as train_w, \
            IndexedDatasetWriter(prefix + "_valid", tok.vocab_size) as valid_w, \
            tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr, leave=False,
                 disable=None if progress is None else not progress) as bar:  # None: only on a terminal
        chunk_iter = _chunks(paths, doc_per)
        # Byte counts travel beside the texts so the bar advances when a chunk is *written*.
        byte_q: collections.deque = collections.deque()

        def texts_only():
            for texts, nbytes in chunk_iter:
                byte_q.append(nbytes)
                yield texts

        results = ordered_map(_encode_chunk, texts_only(), pool)
        for flat, lengths in results:
            valid = valid_mask(stats.documents, len(lengths), valid_fraction)
            token_valid = np.repeat(valid, lengths)
            if valid.any():
                valid_w.add_documents(flat[token_valid], lengths[valid])
            train_w.add_documents(flat[~token_valid], lengths[~valid])
            stats.documents += len(lengths)
            stats.valid_documents += int(valid.sum())
            stats.train_documents += int((~valid).sum())
            stats.valid_tokens += int(lengths[valid].sum())
            stats.train_tokens += int(lengths[~valid].sum())
            nbytes = byte_q.popleft()
            stats.input_bytes += nbytes
            bar.update(nbytes)
