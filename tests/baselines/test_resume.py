"""A baseline run resumed from a checkpoint reproduces the uninterrupted run bit for bit (CPU)."""
from pathlib import Path

import pytest

from ssd_megatron.config import load_config
from ssd_megatron.train.metrics import read_metrics

loop = pytest.importorskip("ssd_megatron.train.loop")
ROOT = Path(__file__).resolve().parents[2]


def _cfg(tiny_data, run, method):
    o = {"data.path": tiny_data["prefix"], "data.tokenizer": tiny_data["tokenizer"], "data.seq_len": 16,
         "model.max_seq_len": 16, "model.n_layers": 3, "model.d_model": 32, "model.n_heads": 2,
         "model.d_ff": 96, "model.vocab_multiple": 64, "train.device": "cpu", "train.max_steps": 6, "train.global_batch_size": 4,
         "train.micro_batch_size": 2, "train.eval_interval": 3, "train.eval_batches": 1,
         "train.output_dir": str(run), "optim.warmup_steps": 1, "checkpoint.interval": 3, "checkpoint.keep_last": 3,
         "logging.progress": False, "logging.tensorboard": False, "logging.report": False,
         "smoe.num_experts": 3, "smoe.top_k": 2, "smoe.z_loss_coef": 0.001, "moe_dropout.num_experts": 4,
         "moe_dropout.k_start": 1, "pld.gamma": 0.5}
    return load_config(ROOT / "configs" / f"gpt_tiny_{method}.yaml", [f"{k}={v}" for k, v in o.items()])


@pytest.mark.parametrize("method", ["smoe", "moe_dropout", "pld"])
def test_resume_bit_exact(tiny_data, tmp_path, monkeypatch, method):
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    loop.train(_cfg(tiny_data, ref_run, method))
    real_step = loop.Trainer.train_step

    def crashing(self, step):
        if step == 4:
            raise RuntimeError("simulated crash")
        return real_step(self, step)

    monkeypatch.setattr(loop.Trainer, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(_cfg(tiny_data, run, method))
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)
    loop.train(_cfg(tiny_data, run, method))  # resumes from the step-3 checkpoint
    keys = {"smoe": ["smoe_lb_loss", "smoe_z_loss", "extra_loss"], "moe_dropout": ["k"],
            "pld": ["layers_kept", "pld_theta", "flops"]}[method]
    ref = [r for r in read_metrics(ref_run / "metrics.jsonl") if r.get("kind") == "train"]
    got = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]
    assert [r["step"] for r in got] == list(range(6))
    for a, b in zip(ref, got):
        for k in ["loss", "grad_norm"] + keys:
            assert a[k] == b[k], (a["step"], k)
