"""Two gloo ranks give the single process's losses under PLD, whose dropped blocks leave parameters
without gradients (DDP needs find_unused_parameters; FSDP2 must skip their reduce-scatter).

SMoE and MoE-Dropout need nothing special from data parallelism (every parameter is in every step's
graph: experts are slices of whole w_in / w_out tensors, MoE-Dropout's router is a buffer); they are
checked under FSDP2, the stricter case (sharded parameters outside forward)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssd_megatron.config import load_config
from ssd_megatron.train.metrics import read_metrics

loop = pytest.importorskip("ssd_megatron.train.loop")
ROOT = Path(__file__).resolve().parents[2]


def _overrides(tiny_data, run, method, **extra):
    o = {"data.path": tiny_data["prefix"], "data.tokenizer": tiny_data["tokenizer"], "data.seq_len": 16,
         "model.max_seq_len": 16, "model.n_layers": 3, "model.d_model": 32, "model.n_heads": 2,
         "model.d_ff": 96, "model.vocab_multiple": 64, "train.device": "cpu", "train.max_steps": 5, "train.global_batch_size": 4,
         "train.micro_batch_size": 2, "train.eval_interval": 5, "train.eval_batches": 2,
         "train.output_dir": str(run), "optim.warmup_steps": 1, "checkpoint.interval": 100,
         "logging.progress": False, "logging.tensorboard": False, "logging.report": False,
         "smoe.num_experts": 3, "smoe.top_k": 2, "moe_dropout.num_experts": 4, "moe_dropout.k_start": 1,
         "pld.gamma": 0.5, "parallel.backend": "gloo"}
    o.update(extra)
    return [str(ROOT / "configs" / f"gpt_tiny_{method}.yaml")] + [f"{k}={v}" for k, v in o.items()]


def _train_records(run):
    return [r for r in read_metrics(Path(run) / "metrics.jsonl") if r.get("kind") == "train"]


@pytest.mark.parametrize("method,dp", [("pld", "ddp"), ("pld", "fsdp"), ("smoe", "fsdp"), ("moe_dropout", "fsdp")])
def test_two_ranks_match_one(tiny_data, tmp_path, method, dp):
    one, two = tmp_path / "one", tmp_path / "two"
    args = _overrides(tiny_data, one, method)
    loop.train(load_config(args[0], args[1:]))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ssd_megatron",
           "train", *_overrides(tiny_data, two, method, **{"parallel.data_parallel": dp})]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _train_records(one), _train_records(two)
    assert len(a) == len(b) == 5
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-5), ra["step"]
        for k in ("layers_kept", "k", "flops"):
            assert ra.get(k) == rb.get(k), (ra["step"], k)
    if method == "pld":
        assert min(r["layers_kept"] for r in a) < 3  # some steps really dropped blocks
