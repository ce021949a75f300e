"""Tiny real data for the baseline training tests (made once per session with the data package)."""
import json
import random

import pytest

WORDS = ("def return class import for while if else print self value index alpha beta gamma delta "
         "lambda yield with as try except raise pass none true false").split()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from ssd_megatron.data.preprocess import preprocess
    from ssd_megatron.data.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

    d = tmp_path_factory.mktemp("baseline_data")
    rng = random.Random(0)
    src = d / "docs.jsonl"
    with open(src, "w") as f:
        for _ in range(200):
            lines = []
            for _ in range(rng.randint(4, 10)):
                w = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
                lines.append("    " * rng.randint(0, 2) + " ".join(w + w[:2]))
            f.write(json.dumps({"text": "\n".join(lines)}) + "\n")
    tok = train_tokenizer([src], MIN_VOCAB_SIZE + 40, d / "tok", num_threads=1)
    prefix = str(d / "data")
    preprocess([src], tok, prefix, valid_fraction=0.15, append_eos=True, progress=False, log=None)
    return {"prefix": prefix, "tokenizer": tok}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to OpenMP spin contention on a busy CI box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
