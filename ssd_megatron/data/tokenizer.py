"""SentencePiece tokenizer: training from text/jsonl files and a thin wrapper for the objectives.

One vocabulary serves every objective (causal LM, masked LM, T5 span corruption), so the special
tokens of all of them are reserved at training time: pad/unk/bos/eos as sentencepiece control
symbols (``encode`` never emits them, so an EOS in the data is always a real separator), and
``[MASK]``, ``[CLS]``, ``[SEP]`` plus 100 T5 sentinels ``<extra_id_k>`` as user-defined symbols.

Normalisation is the identity and byte fallback is on: any text round-trips exactly
(``decode(encode(t)) == t``), which matters for code corpora (indentation, newlines) and makes
"unknown" tokens essentially disappear.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ssd_megatron.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK_TOKEN, CLS_TOKEN, SEP_TOKEN = "[MASK]", "[CLS]", "[SEP]"
NUM_SENTINELS = 100
SENTINEL_TOKENS = [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]
USER_SYMBOLS = [MASK_TOKEN, CLS_TOKEN, SEP_TOKEN, *SENTINEL_TOKENS]
# 4 control symbols + user symbols + 256 byte pieces must fit, with room for real pieces.
MIN_VOCAB_SIZE = 4 + len(USER_SYMBOLS) + 256 + 32
MODEL_TYPES = ("bpe", "unigram")


@dataclass(frozen=True)
class SpecialIds:
    """The token ids the objectives need; a plain value so tests can build one without a model."""

    vocab_size: int
    pad_id: int = PAD_ID
    unk_id: int = UNK_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    mask_id: int = 4
    cls_id: int = 5
    sep_id: int = 6
    sentinel_ids: tuple[int, ...] = field(default_factory=lambda: tuple(range(7, 7 + NUM_SENTINELS)))

    @property
    def all_special(self) -> list[int]:
        """Ids that masking must never select nor draw as a random replacement."""
        base = [self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.mask_id, self.cls_id, self.sep_id]
        return sorted(set(base) | set(self.sentinel_ids))


def as_special_ids(obj) -> SpecialIds:
    """Accept a `Tokenizer`, a `SpecialIds`, or anything exposing the same attributes."""
    if isinstance(obj, SpecialIds):
        return obj
    if isinstance(obj, Tokenizer):
        return obj.special_ids
    return SpecialIds(
        vocab_size=int(obj.vocab_size), pad_id=int(obj.pad_id), unk_id=int(getattr(obj, "unk_id", UNK_ID)),
        bos_id=int(obj.bos_id), eos_id=int(obj.eos_id), mask_id=int(obj.mask_id), cls_id=int(obj.cls_id),
        sep_id=int(obj.sep_id), sentinel_ids=tuple(int(s) for s in obj.sentinel_ids),
    )


def _check_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    if not paths:
        raise UserError("--input: no input files given (accepted: text, .jsonl, .jsonl.gz, .json.gz files)")
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise UserError(f"input file {p} does not exist or is not a regular file")
        out.append(p)
    return out


def iter_training_sentences(paths: Sequence[str | os.PathLike], max_sentences: int | None = None) -> Iterator[str]:
    """Non-empty lines of every document, in file order, at most `max_sentences` of them.

    SentencePiece learns from "sentences"; lines are the natural unit for both prose and code.
    The cap keeps tokenizer training time bounded on large corpora (sentencepiece additionally
    reservoir-samples `input_sentence_size` of what it is given).
    """
    from ssd_megatron.data.preprocess import iter_documents  # local: preprocess imports us

    n = 0
    for path in _check_inputs(paths):
        for text, _ in iter_documents(path, doc_per="line"):
            for line in text.splitlines():
                if not line.strip():
                    continue
                yield line
                n += 1
                if max_sentences is not None and n >= max_sentences:
                    return


def train_tokenizer(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    output_prefix: str | os.PathLike,
    *,
    model_type: str = "bpe",
    input_sentence_size: int = 1_000_000,
    max_read_sentences: int | None = 5_000_000,
    character_coverage: float = 0.9999,
    num_threads: int | None = None,
    sentences: Iterable[str] | None = None,
) -> str:
    """Train a sentencepiece model on `inputs`; writes `output_prefix.model` (+ `.vocab`), returns its path.

    `sentences` overrides the file reader (used by tests and by callers that already hold text).
    Writes through a temporary file and renames, so a crash never leaves a half-written model.
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise UserError(f"--model-type: {model_type!r} is not accepted (accepted: {', '.join(MODEL_TYPES)})")
    if int(vocab_size) < MIN_VOCAB_SIZE:
        raise UserError(f"--vocab-size: {vocab_size} is too small (accepted: an integer >= {MIN_VOCAB_SIZE})")
    if sentences is None:
        sentences = iter_training_sentences(inputs, max_read_sentences)
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, vocab_size=int(vocab_size),
            model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            user_defined_symbols=USER_SYMBOLS, byte_fallback=True, add_dummy_prefix=False,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True, character_coverage=character_coverage,
            input_sentence_size=int(input_sentence_size), shuffle_input_sentence=True,
            num_threads=num_threads or max(1, os.cpu_count() or 1), minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is too high ... Please set it to a value <= N"
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"--vocab-size/--input: sentencepiece could not train on {len(inputs)} file(s): {msg}") from e
    model_path = out.with_name(out.name + ".model")
    tmp = model_path.with_name(model_path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, model_path)
    tok = Tokenizer(model_path)
    vocab_tmp = out.with_name(out.name + f".vocab.tmp-{os.getpid()}")
    with open(vocab_tmp, "w", encoding="utf-8") as f:
        for i in range(tok.vocab_size):
            f.write(f"{tok.sp.id_to_piece(i)}\t{tok.sp.get_score(i)}\n")
    os.replace(vocab_tmp, out.with_name(out.name + ".vocab"))
    return str(model_path)


class Tokenizer:
    """A loaded sentencepiece model plus the special-token ids every objective needs."""

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        self.path = str(model_path)
        p = Path(model_path)
        if not p.is_file():
            raise UserError(f"tokenizer model {p} does not exist (expected a sentencepiece .model file; "
                            "train one with `ssd-data train-tokenizer`)")
        self.sp = spm.SentencePieceProcessor()
        try:
            ok = self.sp.Load(str(p))
        except (RuntimeError, OSError) as e:
            ok = False
            err = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        else:
            err = ""
        if not ok:
            raise UserError(f"tokenizer model {p} is not a valid sentencepiece model ({err or 'failed to load'})")
        self.vocab_size = int(self.sp.get_piece_size())
        self.pad_id, self.unk_id = int(self.sp.pad_id()), int(self.sp.unk_id())
        self.bos_id, self.eos_id = int(self.sp.bos_id()), int(self.sp.eos_id())
        missing = [name for name, i in (("pad", self.pad_id), ("bos", self.bos_id), ("eos", self.eos_id)) if i < 0]
        self.mask_id = self._symbol(MASK_TOKEN, missing)
        self.cls_id = self._symbol(CLS_TOKEN, missing)
        self.sep_id = self._symbol(SEP_TOKEN, missing)
        self.sentinel_ids = [self._symbol(t, missing) for t in SENTINEL_TOKENS]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise UserError(f"tokenizer model {p} lacks special tokens ({shown}); "
                            "train it with `ssd-data train-tokenizer` so every objective's tokens exist")

    def _symbol(self, piece: str, missing: list[str]) -> int:
        i = int(self.sp.piece_to_id(piece))
        if i == self.sp.unk_id() or self.sp.id_to_piece(i) != piece:
            missing.append(piece)
        return i

    @property
    def special_ids(self) -> SpecialIds:
        return SpecialIds(
            vocab_size=self.vocab_size, pad_id=self.pad_id, unk_id=self.unk_id, bos_id=self.bos_id,
            eos_id=self.eos_id, mask_id=self.mask_id, cls_id=self.cls_id, sep_id=self.sep_id,
            sentinel_ids=tuple(self.sentinel_ids),
        )

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Single-threaded batch encode: parallelism belongs to the caller (preprocess workers)."""
        return self.sp.encode(texts, out_type=int, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    def __getstate__(self):  # workers receive the path and reload: SentencePieceProcessor isn't picklable
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])
