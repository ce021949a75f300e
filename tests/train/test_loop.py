"""The training loop end to end on tiny data: bit-exact resume, DDP == single process, 2 -> 1 rank resume,
phase agreement, method hooks, BERT/T5, ssd-eval, report."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, one_thread, tiny_overrides
from ssd_megatron import cli
from ssd_megatron.config import load_config
from ssd_megatron.errors import UserError
from ssd_megatron.parallel.distributed import ParallelDims
from ssd_megatron.train import loop as loop_mod
from ssd_megatron.train.metrics import read_metrics
from ssd_megatron.train.method import TrainingMethod, register_method

CONFIG = ROOT / "configs" / "gpt_tiny.yaml"


def _cfg(tiny_data, run_dir, **extra):
    return load_config(CONFIG, tiny_overrides(tiny_data, run_dir, **extra))


def _records(run_dir, kind):
    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("kind") == kind]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _records(run_dir, "train")}


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    """The uninterrupted single-process run every other run is compared with."""
    run = tmp_path_factory.mktemp("ref") / "run"
    with one_thread():
        summary = loop_mod.train(_cfg(tiny_data, run, **{"logging.report": True}))
    return run, summary


def test_reference_run_contract(reference_run):
    run, summary = reference_run
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    train = _records(run, "train")
    assert [r["step"] for r in train] == list(range(6))
    for r in train:
        for key in ("loss", "ppl", "lr", "grad_norm", "tokens", "tokens_per_s", "phase", "flops", "flops_total"):
            assert key in r, key
        assert "mfu" not in r  # CPU: no peak, no MFU
    assert train[-1]["tokens"] == 6 * 8 * 32
    assert train[-1]["flops_total"] == pytest.approx(6 * train[0]["flops"])
    valid = _records(run, "valid")
    assert [r["step"] for r in valid] == [3, 6]
    assert summary["valid_ppl"] == pytest.approx(valid[-1]["valid_ppl"])
    assert train[-1]["loss"] < train[0]["loss"]
    report = (run / "report" / "report.md").read_text()
    assert "unigram baseline ppl" in report and "final valid ppl" in report
    assert (run / "report" / "loss.png").stat().st_size > 0 and (run / "report" / "ppl.png").stat().st_size > 0


def test_resume_is_bit_exact(tiny_data, tmp_path, reference_run, monkeypatch):
    ref_run, _ = reference_run
    run = tmp_path / "run"
    cfg = _cfg(tiny_data, run)
    real_step = loop_mod.Trainer.train_step

    def crashing(self, step):
        if step == 4:  # after the checkpoint at 3 steps and after step 3 was logged
            raise RuntimeError("simulated crash")
        return real_step(self, step)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop_mod.train(cfg)
    assert max(_losses(run)) == 3  # step 3 was logged before the crash
    monkeypatch.setattr(loop_mod.Trainer, "train_step", real_step)
    loop_mod.train(cfg)  # checkpoint.resume: auto
    ref, got = _records(ref_run, "train"), _records(run, "train")
    assert [r["step"] for r in got] == list(range(6))  # the stale step-3 record was dropped, not duplicated
    for a, b in zip(ref, got):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"], a["step"]
        assert a["consumed_samples"] == b["consumed_samples"] and a["tokens"] == b["tokens"]
    assert [r["valid_loss"] for r in _records(ref_run, "valid")] == [r["valid_loss"] for r in _records(run, "valid")]


def test_sigterm_checkpoints_and_stops_then_resumes_exactly(tiny_data, tmp_path, reference_run, monkeypatch):
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    ref_run, _ = reference_run
    run = tmp_path / "run"
    cfg = _cfg(tiny_data, run, **{"checkpoint.interval": 100})
    real_step = loop_mod.Trainer.train_step

    def preempted(self, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, mid-run
        return real_step(self, step)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", preempted)
    summary = loop_mod.train(cfg)
    assert summary["stopped_at"] == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    monkeypatch.setattr(loop_mod.Trainer, "train_step", real_step)
    loop_mod.train(cfg)
    assert _losses(run) == _losses(ref_run)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def _torchrun(tiny_data, run_dir, nproc, **extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "ssd_megatron", "train", str(CONFIG), *tiny_overrides(tiny_data, run_dir, **extra)]
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_two_ranks_match_single_and_resume_on_one(tiny_data, tmp_path, reference_run, data_parallel):
    ref_run, _ = reference_run
    ddp_run = tmp_path / "ddp"
    _torchrun(tiny_data, ddp_run, 2, **{"parallel.backend": "gloo", "parallel.data_parallel": data_parallel})
    ref, ddp = _losses(ref_run), _losses(ddp_run)
    assert sorted(ddp) == sorted(ref)
    for s in ref:
        assert ddp[s] == pytest.approx(ref[s], rel=1e-5), s
    assert {r["phase"] for r in _records(ddp_run, "train")} == {"dense"}
    ref_v = [r["valid_loss"] for r in _records(ref_run, "valid")]
    assert [r["valid_loss"] for r in _records(ddp_run, "valid")] == pytest.approx(ref_v, rel=1e-5)
    # The 2-rank checkpoint has one RNG file per rank.
    assert sorted(p.name for p in (ddp_run / "checkpoints" / "step_0000003" / "rng").iterdir()) == \
        ["rank_00000.pt", "rank_00001.pt"]

    # Resume the 2-rank run's mid checkpoint on one process: the same global batches follow.
    one_run = tmp_path / "one"
    loop_mod.train(_cfg(tiny_data, one_run, **{"checkpoint.resume": str(ddp_run / "checkpoints" / "step_0000003")}))
    got = _records(one_run, "train")
    assert [r["step"] for r in got] == [3, 4, 5]
    ddp_recs = {r["step"]: r for r in _records(ddp_run, "train")}
    for r in got:
        assert r["consumed_samples"] == ddp_recs[r["step"]]["consumed_samples"]
        assert r["loss"] == pytest.approx(ddp_recs[r["step"]]["loss"], rel=1e-5)
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-5)


def test_global_batches_do_not_depend_on_world_size(tiny_data, tmp_path):
    from ssd_megatron.train.data import build_train_data

    cfg = _cfg(tiny_data, tmp_path)
    data = build_train_data(cfg)
    for pos in (0, 8, 48, 8 * len(data.train)):  # the last crosses an epoch boundary
        one = list(data.train_iterator(8, 4, ParallelDims(), pos).rank_indices(pos))
        two = [i for r in range(2)
               for i in data.train_iterator(8, 4, ParallelDims(world_size=2, dp_size=2, rank=r, dp_rank=r),
                                            pos).rank_indices(pos)]
        assert one == two


def test_ranks_disagreeing_on_phase_is_an_error(tiny_data, tmp_path, monkeypatch):
    def fake_gather(t, dims, **_):
        other = t.clone()
        other[1] += 1
        return torch.stack([t, other])

    monkeypatch.setattr(loop_mod, "all_gather_rows", fake_gather)
    with pytest.raises(RuntimeError, match="disagree on the phase"):
        loop_mod.train(_cfg(tiny_data, tmp_path / "run"))


@register_method("_test_recorder")
class _Recorder(TrainingMethod):
    calls: list = []

    def before_step(self, step):
        self.calls.append(("before", step))

    def after_step(self, step):
        self.calls.append(("after", step))
        return {"recorder_step": step}

    def phase(self):
        return "sparse" if any(c == ("eval",) for c in self.calls) else "dense"

    def extra_loss(self):
        p = next(self.model.parameters())
        return 0.0 * p.sum() + 0.5

    def eval_mode(self):
        self.calls.append(("eval",))

    def train_mode(self):
        self.calls.append(("train",))

    def state_dict(self):
        return {"n": len(self.calls)}


def test_method_hooks_phase_and_extra_loss(tiny_data, tmp_path, monkeypatch):
    from ssd_megatron.config import METHODS

    _Recorder.calls = []
    cfg = _cfg(tiny_data, tmp_path / "run")
    monkeypatch.setattr(cfg, "method", "_test_recorder")
    assert "_test_recorder" not in METHODS
    loop_mod.train(cfg)
    calls = _Recorder.calls
    assert calls[:3] == [("before", 0), ("after", 0), ("before", 1)]
    assert calls.count(("eval",)) == 2 and calls.count(("train",)) == 2
    assert calls.index(("eval",)) == calls.index(("after", 2)) + 1
    recs = _records(tmp_path / "run", "train")
    assert [r["phase"] for r in recs] == ["dense"] * 3 + ["sparse"] * 3
    assert all(r["recorder_step"] == r["step"] for r in recs)
    assert all(r["extra_loss"] == pytest.approx(0.5) for r in recs)


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_other_architectures_train_and_eval(tiny_data, tmp_path, arch, capsys):
    run = tmp_path / "run"
    extra = {"model.arch": arch, "train.max_steps": 3, "train.eval_interval": 3, "checkpoint.interval": 3}
    if arch == "t5":
        extra.update({"model.n_decoder_layers": 1, "model.bias": False, "model.norm": "rmsnorm"})
    summary = loop_mod.train(_cfg(tiny_data, run, **extra))
    assert summary["valid_ppl"] > 1
    valid = _records(run, "valid")[-1]
    if arch == "bert":
        assert 0.0 <= valid["valid_acc"] <= 1.0
    capsys.readouterr()
    assert cli.eval_main([str(run), "--batches", "2", "--device", "cpu"]) == 0  # same device as training
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["arch"] == arch and res["loss"] == pytest.approx(valid["valid_loss"], rel=1e-5)


def test_ssd_eval_prints_json_last(reference_run, capsys):
    run, _ = reference_run
    capsys.readouterr()
    assert cli.eval_main([str(run / "checkpoints" / "step_0000003"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert {"loss", "ppl", "step", "checkpoint"} <= set(res) and res["step"] == 3
    valid = {r["step"]: r for r in _records(run, "valid")}
    assert res["loss"] == pytest.approx(valid[3]["valid_loss"], rel=1e-6)


def test_incompatible_resume_is_a_user_error(tiny_data, tmp_path, reference_run):
    ref_run, _ = reference_run
    ckpt = ref_run / "checkpoints" / "step_0000003"
    with pytest.raises(UserError, match="model.pt"):
        loop_mod.train(_cfg(tiny_data, tmp_path / "a", **{"model.d_model": 32, "checkpoint.resume": str(ckpt)}))
    with pytest.raises(UserError, match="trainer.pt"):
        loop_mod.train(_cfg(tiny_data, tmp_path / "b", **{"model.arch": "bert", "checkpoint.resume": str(ckpt)}))
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    with open(broken / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="optimizer.pt"):
        loop_mod.train(_cfg(tiny_data, tmp_path / "c", **{"checkpoint.resume": str(broken)}))


def test_unsupported_parallelism_and_batch_split(tiny_data, tmp_path):
    with pytest.raises(UserError, match="expert_model_parallel_size"):
        loop_mod.train(_cfg(tiny_data, tmp_path, **{"parallel.expert_model_parallel_size": 2}))
    with pytest.raises(UserError, match="sequence_parallel"):
        loop_mod.train(_cfg(tiny_data, tmp_path, **{"parallel.sequence_parallel": True}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run via tools/gpu_bench.sh)")
def test_cuda_metrics_read_one_step_late_stay_complete_and_ordered(tiny_data, tmp_path):
    """On CUDA a step's loss / norm are read while the next step runs; every record still arrives, in
    step order, before the validation and checkpoint of its step, with a GPU-clock step time."""
    run = tmp_path / "run"
    loop_mod.train(_cfg(tiny_data, run, **{"train.device": "cuda"}))
    seq = [(r["kind"], r["step"]) for r in read_metrics(run / "metrics.jsonl") if r.get("kind") in ("train", "valid")]
    assert seq == [("train", 0), ("train", 1), ("train", 2), ("valid", 3), ("train", 3), ("train", 4),
                   ("train", 5), ("valid", 6)]
    train = _records(run, "train")
    assert all(r["step_time"] > 0 and r["tokens_per_s"] > 0 and "mfu" in r for r in train)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in train)
    assert train[-1]["loss"] < train[0]["loss"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_nccl_two_gpus_match_one_gpu(tiny_data, tmp_path, data_parallel):
    """torchrun with NCCL on two GPUs takes the same steps as one GPU with the same global batch."""
    fp32 = {"train.device": "cuda", "train.precision": "fp32"}
    one = tmp_path / "one"
    loop_mod.train(_cfg(tiny_data, one, **fp32))
    two = tmp_path / "two"
    _torchrun(tiny_data, two, 2, **fp32, **{"parallel.backend": "nccl", "parallel.data_parallel": data_parallel})
    ref, got = _losses(one), _losses(two)
    assert sorted(got) == sorted(ref) == list(range(6))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-3), s  # TF32 matmuls, other reduction order
    ref_v = [r["valid_loss"] for r in _records(one, "valid")]
    assert [r["valid_loss"] for r in _records(two, "valid")] == pytest.approx(ref_v, rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
@pytest.mark.parametrize("method", ["dense", "ssd"])
def test_nccl_two_gpus_captured_ddp_step_matches_eager(tiny_data, tmp_path, method):
    """train.cuda_graph: true with DDP on two GPUs (experimental, train/step_graph.py): the captured step,
    all-reduces included, takes the same steps as eager DDP. 48 steps: each kind of step runs 11 eager
    steps, is captured, then replayed (SSD, as this config runs on CPU: dense 0-15, sparse 16-35, dense
    36-47)."""
    run = {"train.device": "cuda", "train.precision": "fp32", "train.max_steps": 48, "train.eval_interval": 20,
           "checkpoint.interval": 20, "parallel.backend": "nccl", "parallel.data_parallel": "ddp", "method": method}
    if method == "ssd":
        run.update({"ssd.num_experts": 8, "ssd.top_k": 2, "ssd.monitor_interval": 8, "ssd.threshold": 0.0})
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    _torchrun(tiny_data, eager, 2, **run)
    p = _torchrun(tiny_data, graphed, 2, **run, **{"train.cuda_graph": True})
    assert "captures the DDP step" in p.stdout + p.stderr
    ref, got = _losses(eager), _losses(graphed)
    assert sorted(got) == sorted(ref) == list(range(48))
    phases = {r["step"]: r["phase"] for r in _records(graphed, "train")}
    assert phases == {r["step"]: r["phase"] for r in _records(eager, "train")}
    if method == "ssd":
        assert sum(p == "sparse" for p in phases.values()) >= 12  # its graph was captured and replayed
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-3), s  # fp32 atomics in the expert kernels
