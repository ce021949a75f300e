"""train.cuda_graph: blocks, CUDA graphs per transformer block (train/block_graphs.py).

CPU (CI): the runs it serves and refuses; the gradient handling on its own (kept and zeroed in place with
several micro-batches, set to None with one; a parameter without a gradient named on the first step of a
kind); an SSD run with two micro-batches per step takes the plain compiled run's steps (to 1e-6); two gloo
ranks with DDP take one process's steps. CUDA: the same with the blocks' CUDA graphs replayed, SSD's phases
included, against the compiled run without graphs, and DDP's two ranks sharing one GPU over gloo."""
import pytest
import torch
from torch import nn

from ssd_megatron.errors import UserError
from ssd_megatron.train import loop as loop_mod
from ssd_megatron.train.block_graphs import BlockGraphs
from ssd_megatron.train.step_graph import resolve

from .test_loop import _cfg, _losses, _records, _torchrun
from .test_loop_ssd import SSD

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run via tools/gpu_bench.sh)")
BLOCKS = {"train.cuda_graph": "blocks"}


def test_resolve_serves_one_process_and_ddp_and_names_what_it_refuses(tiny_data, tmp_path):
    for device in ("cpu", "cuda"):  # on the CPU too: compiled blocks with the same gradient handling
        assert resolve(_cfg(tiny_data, tmp_path, method="ssd", **BLOCKS), torch.device(device), 1) == ("blocks", None)
    kind, note = resolve(_cfg(tiny_data, tmp_path, **BLOCKS), torch.device("cuda"), world_size=2)
    assert kind == "blocks" and "DDP" in note
    with pytest.raises(UserError, match=r"train.cuda_graph: blocks does not fit this run: method 'pld'.*"
                                        r"set train.cuda_graph: false"):
        resolve(_cfg(tiny_data, tmp_path, method="pld", **BLOCKS), torch.device("cuda"), world_size=1)
    with pytest.raises(UserError, match=r"train.cuda_graph: blocks does not fit this run: 2 processes with fsdp"):
        resolve(_cfg(tiny_data, tmp_path, **BLOCKS, **{"parallel.data_parallel": "fsdp"}), torch.device("cuda"), 2)
    with pytest.raises(UserError, match="train.cuda_graph.*accepted: false, true, auto, blocks"):
        _cfg(tiny_data, tmp_path, **{"train.cuda_graph": "block"})


class _TwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x).sum()


def test_kept_gradients_are_zeroed_in_place_and_a_missing_one_is_named():
    model = _TwoPaths()
    opt = torch.optim.AdamW(model.parameters())
    graphs = BlockGraphs(model, accum=2)
    graphs.begin_step("dense")
    kept = [p.grad for p in model.parameters()]
    assert all(g is not None and not g.any() for g in kept)  # zeroed buffers before the first forward
    for _ in range(2):
        model(torch.ones(2, 3)).backward()
    with pytest.raises(UserError, match=r"a 'dense' step gave none to unused.weight, unused.bias"):
        graphs.end_backward()
    graphs.zero_grad(opt)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), kept))  # the same memory, zeroed
    graphs.begin_step("dense")  # a kind is checked once
    model(torch.ones(2, 3)).backward()
    graphs.end_backward()

    one = BlockGraphs(model, accum=1)  # one micro-batch: gradients handed over and set to None, as eager runs
    one.zero_grad(opt)
    one.begin_step("dense")
    assert all(p.grad is None for p in model.parameters())
    model(torch.ones(2, 3)).backward()
    one.end_backward()  # nothing to check: a parameter without a gradient keeps None, which AdamW skips
    assert model.unused.weight.grad is None


def test_ssd_run_with_two_micro_batches_takes_the_compiled_runs_steps(tiny_data, tmp_path):
    """Two micro-batches per step (global 8 = 4 x 2), SSD's phases: the kept gradients start at exact zeros, so the
    run repeats `train.compile: true` (bit for bit for this GPT here; mode reduce-overhead compiles slightly other
    code, which put BERT's step 5 one float32 ulp off with a single micro-batch, where nothing else differs)."""
    run = {**SSD, "train.max_steps": 8}
    compiled, blocks = tmp_path / "compiled", tmp_path / "blocks"
    loop_mod.train(_cfg(tiny_data, compiled, **run, **{"train.compile": True}))
    loop_mod.train(_cfg(tiny_data, blocks, **run, **BLOCKS))
    phases = [r["phase"] for r in _records(blocks, "train")]
    assert "sparse" in phases and phases == [r["phase"] for r in _records(compiled, "train")]
    ref, got = _losses(compiled), _losses(blocks)
    assert sorted(got) == sorted(ref) and all(got[s] == pytest.approx(ref[s], rel=1e-6, abs=0) for s in ref), (got, ref)
    sparsity = [r["sparsity"] for r in _records(blocks, "train") if "sparsity" in r]  # the probe saw the run's FFNs
    assert sparsity and sparsity == pytest.approx([r["sparsity"] for r in _records(compiled, "train") if "sparsity" in r],
                                                  abs=1e-3)


def test_two_ddp_ranks_take_one_process_steps(tiny_data, tmp_path):
    """DDP over gloo, one micro-batch of 2 per rank and two per step each (no_sync on the first): the kept
    gradients under DDP's hooks."""
    run = {**SSD, "train.max_steps": 8, "train.micro_batch_size": 2, **BLOCKS}
    one, two = tmp_path / "one", tmp_path / "two"
    loop_mod.train(_cfg(tiny_data, one, **run))
    p = _torchrun(tiny_data, two, 2, **run, **{"parallel.backend": "gloo", "parallel.data_parallel": "ddp"})
    assert "train.cuda_graph: blocks: per-block CUDA graphs with DDP" in p.stdout
    ref, got = _losses(one), _losses(two)
    assert sorted(got) == sorted(ref) == list(range(8))
    assert [r["phase"] for r in _records(two, "train")] == [r["phase"] for r in _records(one, "train")]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), s


def _gpu(**extra):
    return {"train.device": "cuda", "train.precision": "fp32", **extra}


@pytest.fixture
def deterministic(monkeypatch):
    """As tests/train/test_step_graph.py: without atomic sums two SSD runs agree to the last digit."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)  # (tests/conftest.py restores the default)


CUDA_SSD = {"method": "ssd", "train.max_steps": 40, "ssd.num_experts": 8, "ssd.top_k": 2, "ssd.monitor_interval": 4,
            "ssd.threshold": 0.0, "ssd.backend": "auto", "train.eval_interval": 20, "checkpoint.interval": 20}


@needs_cuda
@pytest.mark.parametrize("micro_batch", [4, 8])
def test_cuda_ssd_run_with_block_graphs_takes_the_compiled_runs_steps(tiny_data, tmp_path, deterministic, micro_batch):
    """Per-block CUDA graphs replayed across SSD's phases (each phase its own graphs, a later sparse phase with a
    new clustering), validation and checkpoints between steps; two micro-batches per step (kept gradients) or
    one (gradients handed over): the steps of the compiled run without graphs."""
    run = _gpu(**CUDA_SSD, **{"train.micro_batch_size": micro_batch})
    compiled, blocks = tmp_path / "compiled", tmp_path / "blocks"
    loop_mod.train(_cfg(tiny_data, compiled, **run, **{"train.compile": True}))
    loop_mod.train(_cfg(tiny_data, blocks, **run, **BLOCKS))
    recs = {r["step"]: r for r in _records(blocks, "train")}
    ref = {r["step"]: r for r in _records(compiled, "train")}
    phases = [recs[s]["phase"] for s in sorted(recs)]
    assert phases == [ref[s]["phase"] for s in sorted(ref)]
    assert sum(1 for a, b in zip(["dense"] + phases, phases) if (a, b) == ("dense", "sparse")) >= 2, phases
    diffs = [(s, recs[s]["phase"], abs(recs[s]["loss"] / ref[s]["loss"] - 1)) for s in sorted(ref)]
    table = " ".join(f"{s}:{phase[0]}:{d:.1e}" for s, phase, d in diffs)
    for s, phase, d in diffs:
        assert d <= 1e-6, f"step {s} ({phase}): {d:.1e}; all steps: {table}"
    valid = [r["valid_loss"] for r in _records(blocks, "valid")]
    assert valid == pytest.approx([r["valid_loss"] for r in _records(compiled, "valid")], rel=1e-6)


@needs_cuda
def test_cuda_two_ddp_ranks_on_one_gpu_take_one_process_steps(tiny_data, tmp_path):
    """DDP's hooks and all-reduces between the blocks' CUDA graphs: two ranks over gloo share the one GPU (both
    take cuda:0), two micro-batches each per step, against one process with the same global batches."""
    run = _gpu(**{**CUDA_SSD, "train.max_steps": 24, "train.micro_batch_size": 2, **BLOCKS})
    one, two = tmp_path / "one", tmp_path / "two"
    loop_mod.train(_cfg(tiny_data, one, **run))
    _torchrun(tiny_data, two, 2, **run, **{"parallel.backend": "gloo", "parallel.data_parallel": "ddp"})
    ref, got = _losses(one), _losses(two)
    assert sorted(got) == sorted(ref) == list(range(24))
    phases = [r["phase"] for r in _records(two, "train")]
    assert "sparse" in phases and phases == [r["phase"] for r in _records(one, "train")]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-3), s  # fp32 atomics in the expert kernels, other sums
