"""Every baseline trains through the real loop (ssd_megatron.train.loop.train) for GPT, BERT and T5."""
import math
from pathlib import Path

import pytest

from ssd_megatron.config import load_config
from ssd_megatron.train.metrics import read_metrics

loop = pytest.importorskip("ssd_megatron.train.loop")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


def _overrides(tiny_data, run_dir, arch):
    o = {"data.path": tiny_data["prefix"], "data.tokenizer": tiny_data["tokenizer"], "data.seq_len": 32,
         "model.max_seq_len": 32, "model.n_layers": 2, "model.d_model": 32, "model.n_heads": 2,
         "model.d_ff": 64, "model.vocab_multiple": 64, "train.device": "cpu", "train.max_steps": STEPS,
         "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.eval_interval": STEPS,
         "train.eval_batches": 1, "train.output_dir": str(run_dir), "optim.schedule": "constant",
         "optim.warmup_steps": 0, "optim.lr": 1e-2, "checkpoint.interval": 1000,
         "logging.progress": False, "logging.tensorboard": False, "logging.report": False,
         # Make every method do something within 8 steps.
         "smoe.num_experts": 4, "smoe.top_k": 2, "moe_dropout.num_experts": 8, "moe_dropout.k_start": 2,
         "pld.gamma": 0.5}
    if arch == "t5":
        o["model.n_decoder_layers"] = 2
    return [f"{k}={v}" for k, v in o.items()]


@pytest.mark.parametrize("arch", ["gpt", "bert", "t5"])
@pytest.mark.parametrize("method", ["smoe", "moe_dropout", "pld"])
def test_method_trains(tiny_data, tmp_path, method, arch):
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / f"{arch}_tiny_{method}.yaml", _overrides(tiny_data, run, arch))
    summary = loop.train(cfg)
    recs = read_metrics(run / "metrics.jsonl")
    train = [r for r in recs if r.get("kind") == "train"]
    losses = [r["loss"] for r in train]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert math.isfinite(summary["valid_ppl"])
    if method == "smoe":
        assert all(r["phase"] == "sparse" and "smoe_lb_loss" in r and r["extra_loss"] > 0 for r in train)
    if method == "moe_dropout":
        ks = [r["k"] for r in train]
        assert ks[0] == 2 and ks == sorted(ks) and ks[-1] > ks[0]
    if method == "pld":
        kept = [r["layers_kept"] for r in train]
        n_blocks = 4 if arch == "t5" else 2
        assert kept[0] == n_blocks and min(kept) < n_blocks
        assert train[-1]["flops"] < train[0]["flops"] or kept[-1] == n_blocks
