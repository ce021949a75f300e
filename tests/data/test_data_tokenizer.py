"""Tokenizer: special tokens of every objective exist, text round-trips, bad model files are UserErrors."""
import io

import pytest
import sentencepiece as spm

from ssd_megatron.data.tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer
from ssd_megatron.errors import UserError


def test_special_tokens_and_roundtrip(tokenizer_model, corpus):
    tok = Tokenizer(tokenizer_model)
    assert tok.vocab_size == 800
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    specials = [tok.mask_id, tok.cls_id, tok.sep_id, *tok.sentinel_ids]
    assert len(tok.sentinel_ids) == 100 and len(set(specials)) == 103
    assert tok.id_to_piece(tok.mask_id) == "[MASK]" and tok.id_to_piece(tok.sentinel_ids[99]) == "<extra_id_99>"
    for text in corpus["texts"][:3] + corpus["jdocs"][-2:]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text  # identity normalisation + byte fallback: lossless
        assert tok.eos_id not in ids and tok.pad_id not in ids  # control symbols never come from text
    assert tok.encode_batch(corpus["texts"][:2]) == [tok.encode(t) for t in corpus["texts"][:2]]
    sid = tok.special_ids
    assert sid.mask_id == tok.mask_id and sid.sentinel_ids == tuple(tok.sentinel_ids)


def test_missing_and_corrupt_model(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(UserError, match="nope.model"):
        Tokenizer(missing)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(UserError, match="bad.model"):
        Tokenizer(bad)


def test_model_without_special_tokens_is_rejected(tmp_path, corpus):
    buf = io.BytesIO()
    lines = [ln for t in corpus["texts"] for ln in t.splitlines() if ln.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=300,
                                   minloglevel=2)
    p = tmp_path / "plain.model"
    p.write_bytes(buf.getvalue())
    with pytest.raises(UserError, match=r"plain\.model.*lacks special tokens"):
        Tokenizer(p)


def test_bad_training_arguments(tmp_path, corpus):
    with pytest.raises(UserError, match="--vocab-size"):
        train_tokenizer(corpus["text_files"], MIN_VOCAB_SIZE - 1, tmp_path / "t")
    with pytest.raises(UserError, match="--model-type"):
        train_tokenizer(corpus["text_files"], 800, tmp_path / "t", model_type="wordpiece")
    with pytest.raises(UserError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], 800, tmp_path / "t")
    with pytest.raises(UserError, match="--vocab-size"):  # far more pieces than a tiny corpus supports
        train_tokenizer(corpus["text_files"][:1], 60000, tmp_path / "t")
