"""The embedded default corpus: the Python standard library's own source, tokenised and indexed.

Every machine that runs this project has it, it needs no network, it is a few MB of real, varied text
(code, docstrings, comments), and it is identical for everyone with the same Python version — so
``ssd-train`` works out of the box and small experiments are reproducible without downloading data.

The build is cached under ``$SSD_MEGATRON_CACHE`` (default ``~/.cache/ssd_megatron``). It happens in a
private temporary directory that is renamed into place at the end: concurrent builders (e.g. every rank
of a job starting at once) never see a half-built corpus; the first rename wins and the others discard
their copy.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Callable

from ssd_megatron.errors import UserError

CORPUS_FORMAT = 1           # bump when the build recipe changes, so stale caches are not reused
DEFAULT_VOCAB_SIZE = 8000
DEFAULT_VALID_FRACTION = 0.02
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def default_cache_dir() -> Path:
    env = os.environ.get("SSD_MEGATRON_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ssd_megatron"


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The standard library's *.py files, sorted, without test suites or installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(f"Python standard library directory {root} not found; configure data.path to your own data")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place: site-packages alone can hold gigabytes of installed packages.
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    files = sorted(f for f in files if f.is_file())
    return files[:max_files] if max_files is not None else files


def corpus_dir(cache_dir: str | os.PathLike | None = None, max_files: int | None = None,
               vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Where a given build lives: one directory per Python version / file cap / vocabulary / recipe."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    tag = "all" if max_files is None else f"n{max_files}"
    return root / f"stdlib-py{sys.version_info[0]}{sys.version_info[1]}-{tag}-v{vocab_size}-f{CORPUS_FORMAT}"


def _paths(d: Path) -> tuple[str, str]:
    return str(d / "corpus"), str(d / "tokenizer.model")


def ensure_default_corpus(cache_dir: str | os.PathLike | None = None, *, max_files: int | None = None,
                          vocab_size: int = DEFAULT_VOCAB_SIZE, valid_fraction: float = DEFAULT_VALID_FRACTION,
                          workers: int | None = None, progress: bool | None = None,
                          log: Callable[[str], None] | None = print) -> tuple[str, str]:
    """Build (once) and return ``(prefix, tokenizer_path)``: ``prefix_train``/``prefix_valid`` datasets.

    `cache_dir` is the cache root (a subdirectory per Python version / file cap / vocabulary is used).
    `max_files` keeps only the first N files (tests). Idempotent and safe under concurrent calls.
    """
    final = corpus_dir(cache_dir, max_files, vocab_size)
    root = final.parent
    if (final / "corpus.json").is_file():
        return _paths(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cache directory {root} cannot be created ({e.strerror}); set SSD_MEGATRON_CACHE "
                        "to a writable directory") from None
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _build(tmp, max_files, vocab_size, valid_fraction, workers, progress, log)
        try:
            os.rename(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            if not (final / "corpus.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(final)


def _build(out: Path, max_files, vocab_size, valid_fraction, workers, progress, log) -> None:
    from tqdm import tqdm

    from ssd_megatron.data.preprocess import preprocess
    from ssd_megatron.data.tokenizer import train_tokenizer

    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    files = stdlib_files(max_files)
    if not files:
        raise UserError("max_files: the default corpus needs at least one standard-library file")
    n_bytes = sum(f.stat().st_size for f in files)
    say(f"building the default corpus from {len(files)} standard-library files ({n_bytes / 1e6:.1f} MB) in {out}")

    def sentences():
        # Lines are the tokenizer's sentences; 300k lines (all of CPython 3.11's stdlib) train in seconds.
        n = 0
        for f in tqdm(files, desc="tokenizer: reading", unit="file", file=sys.stderr, leave=False,
                      disable=None if progress is None else not progress):
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.strip():
                    yield line
                    n += 1
                    if n >= 400_000:
                        return

    model = train_tokenizer(files, vocab_size, out / "tokenizer", input_sentence_size=400_000,
                            sentences=sentences())
    say(f"trained a {vocab_size}-piece BPE tokenizer in {time.perf_counter() - t0:.1f} s")
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    stats = preprocess(files, model, out / "corpus", workers=workers, valid_fraction=valid_fraction,
                       doc_per="file", progress=progress, log=log)
    info = {
        "source": "python-stdlib", "python": sys.version.split()[0], "format": CORPUS_FORMAT,
        "files": len(files), "bytes": n_bytes, "vocab_size": vocab_size, "valid_fraction": valid_fraction,
        **stats.to_dict(), "build_seconds": round(time.perf_counter() - t0, 2),
    }
    tmp = out / "corpus.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / "corpus.json")  # written last: its presence marks a complete build


def corpus_info(prefix: str) -> dict:
    """The build statistics stored beside a default corpus (files, bytes, documents, tokens)."""
    return json.loads((Path(prefix).parent / "corpus.json").read_text())
