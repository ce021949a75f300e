"""Tiny real data for the training tests: generated documents -> sentencepiece -> indexed datasets.

Made with the data package's own tokenizer trainer and preprocessor, once per test session (per xdist
worker), in a few seconds.
"""
import contextlib
import json
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega def return class import for while if else print self value index").split()


def _documents(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        lines = []
        for _ in range(rng.randint(4, 12)):
            # Some structure to learn: repeated bigrams, indentation, numbers.
            w = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
            if rng.random() < 0.5:
                w += [w[0], w[1]]
            lines.append("    " * rng.randint(0, 2) + " ".join(w) + f" {rng.randint(0, 99)}")
        docs.append("\n".join(lines))
    return docs


@contextlib.contextmanager
def one_thread():
    """Tiny models gain nothing from intra-op threads, and under `pytest -n 2` on two cores extra
    OpenMP threads oversubscribe the machine (several-fold slowdowns). Bit-exact comparisons also need
    every run at the same thread count (CPU matmul reductions depend on it), so module-scoped runs use
    this too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from ssd_megatron.data.preprocess import preprocess
    from ssd_megatron.data.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

    d = tmp_path_factory.mktemp("tiny_data")
    src = d / "docs.jsonl"
    with open(src, "w") as f:
        for text in _documents(240):
            f.write(json.dumps({"text": text}) + "\n")
    tok = train_tokenizer([src], MIN_VOCAB_SIZE + 40, d / "tok", num_threads=1)
    prefix = str(d / "data")
    preprocess([src], tok, prefix, valid_fraction=0.15, append_eos=True, progress=False, log=None)
    return {"prefix": prefix, "tokenizer": tok, "dir": d}


def tiny_overrides(tiny_data, run_dir, **extra) -> list[str]:
    """A 2-layer d=64 GPT on the tiny data, dense, quiet, small batches."""
    base = {
        "method": "dense", "data.path": tiny_data["prefix"], "data.tokenizer": tiny_data["tokenizer"],
        "data.seq_len": 32, "model.max_seq_len": 32, "model.n_layers": 2, "model.d_model": 64,
        "model.n_heads": 2, "model.d_ff": 128, "model.vocab_multiple": 64,
        "train.max_steps": 6, "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.device": "cpu",
        "train.eval_interval": 3, "train.eval_batches": 2, "train.output_dir": str(run_dir),
        "optim.schedule": "cosine", "optim.warmup_steps": 2, "optim.lr": 3e-3,
        "checkpoint.interval": 3, "checkpoint.keep_last": 3,
        "logging.progress": False, "logging.tensorboard": False, "logging.report": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
