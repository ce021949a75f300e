"""The loop with the SSD method: resume across phase switches is bit-exact on CPU (DESIGN contract 3),
and two gloo ranks take the same phase decisions and losses as one process (contract 6); the loop with
the triton expert backend (interpreted) matches the reference backend's run."""
import json
import os

import pytest
import torch

from ssd_megatron.train import loop as loop_mod

from .conftest import one_thread
from .test_loop import _cfg, _losses, _records, _torchrun

SSD = {"method": "ssd", "train.max_steps": 14, "ssd.num_experts": 8, "ssd.top_k": 2, "ssd.monitor_interval": 2,
       "ssd.threshold": 0.0, "ssd.backend": "reference", "train.eval_interval": 7, "checkpoint.interval": 4,
       "checkpoint.keep_last": 4}


@pytest.fixture(scope="module")
def ssd_reference(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ssd_ref") / "run"
    with one_thread():
        loop_mod.train(_cfg(tiny_data, run, **SSD))
    return run


def _phases(run):
    return {r["step"]: r["phase"] for r in _records(run, "train")}


def test_ssd_run_switches(ssd_reference):
    phases = _phases(ssd_reference)
    assert "sparse" in phases.values() and phases[13] == "dense"
    switches = [r for r in _records(ssd_reference, "train") if "switch" in r]
    assert [r["switch"] for r in switches][:2] == ["dense->sparse", "sparse->dense"]


@pytest.mark.parametrize("resume_at", [4, 12])
def test_ssd_resume_is_bit_exact(tiny_data, tmp_path, ssd_reference, resume_at):
    """4: dense, the checkpoint just before the first switch (taken by the resumed run); 12: mid-sparse,
    the checkpoint right after a dense->sparse switch."""
    phases = _phases(ssd_reference)
    switches = {r["step"]: r["switch"] for r in _records(ssd_reference, "train") if "switch" in r}
    if resume_at == 4:  # the setup this test needs
        assert phases[3] == "dense" and switches.get(4) == "dense->sparse"
    else:
        assert switches.get(resume_at - 1) == "dense->sparse" and phases[resume_at] == "sparse"
    ckpt = ssd_reference / "checkpoints" / f"step_{resume_at:07d}"
    run = tmp_path / "run"
    loop_mod.train(_cfg(tiny_data, run, **SSD, **{"checkpoint.resume": str(ckpt)}))
    ref, got = _losses(ssd_reference), _losses(run)
    assert sorted(got) == list(range(resume_at, 14))
    assert all(got[s] == ref[s] for s in got), [(s, got[s], ref[s]) for s in got if got[s] != ref[s]]
    assert {s: p for s, p in _phases(run).items()} == {s: phases[s] for s in got}


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_ssd_two_ranks_agree_with_one(tiny_data, tmp_path, ssd_reference, data_parallel):
    run = tmp_path / data_parallel
    _torchrun(tiny_data, run, 2, **SSD, **{"parallel.backend": "gloo", "parallel.data_parallel": data_parallel})
    assert _phases(run) == _phases(ssd_reference)
    ref, got = _losses(ssd_reference), _losses(run)
    assert all(got[s] == pytest.approx(ref[s], rel=1e-5) for s in ref)


def test_resume_mid_sparse_with_other_expert_count_is_a_clear_error(tiny_data, tmp_path, ssd_reference):
    """A mid-sparse checkpoint stores its FFNs expert-major for its own N: another ssd.num_experts is refused."""
    from ssd_megatron.errors import UserError

    ckpt = ssd_reference / "checkpoints" / "step_0000012"
    cfg = _cfg(tiny_data, tmp_path / "run", **{**SSD, "ssd.num_experts": 4, "checkpoint.resume": str(ckpt)})
    with pytest.raises(UserError, match=r"trainer.pt.*stored for 8 experts.*ssd.num_experts: 4"):
        loop_mod.train(cfg)


def test_ssd_glu_resume_mid_sparse_is_bit_exact(tiny_data, tmp_path):
    """SwiGLU: sparse phases store each expert's gate and up rows interleaved (expert-major), the dense
    phases in neuron order; a run resumed from a mid-sparse checkpoint repeats the uninterrupted one."""
    glu = {**SSD, "model.activation": "swiglu"}
    ref = tmp_path / "ref"
    with one_thread():
        loop_mod.train(_cfg(tiny_data, ref, **glu))
    switches = {r["step"]: r["switch"] for r in _records(ref, "train") if "switch" in r}
    assert "dense->sparse" in switches.values() and "sparse->dense" in switches.values()
    start = next(s + 1 for s, w in sorted(switches.items()) if w == "dense->sparse" and (s + 1) % 4 == 0)
    assert _phases(ref)[start] == "sparse"  # the checkpoint holds expert-major (interleaved) FFNs
    run = tmp_path / "run"
    with one_thread():
        loop_mod.train(_cfg(tiny_data, run, **glu, **{"checkpoint.resume": str(ref / "checkpoints" / f"step_{start:07d}")}))
    want, got = _losses(ref), _losses(run)
    assert sorted(got) == list(range(start, 14)) and all(got[s] == want[s] for s in got)


def _train_with_triton_backend():  # runs under TRITON_INTERPRET=1 (tests/interpreted.py)
    from ssd_megatron.config import load_config
    from tests.train.conftest import ROOT, tiny_overrides

    tiny = {"prefix": os.environ["SSD_TEST_DATA"], "tokenizer": os.environ["SSD_TEST_TOKENIZER"]}
    extra = {**SSD, "ssd.backend": "triton", "model.activation": os.environ["SSD_TEST_ACT"]}
    cfg = load_config(ROOT / "configs" / "gpt_tiny.yaml", tiny_overrides(tiny, os.environ["SSD_TEST_RUN"], **extra))
    with one_thread():
        loop_mod.train(cfg)
    print(json.dumps("done"))


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_ssd_run_with_the_triton_backend_matches_reference(tiny_data, tmp_path, ssd_reference, monkeypatch,
                                                           activation):
    """The whole SSD loop with the `triton` expert backend (its kernels interpreted on CPU, fp32): the
    dense -> sparse switch's expert-major moves of parameters and AdamW moments (GLU: gate and up rows
    interleaved per expert), the router gradient folded into the kernels, the split weight-gradient
    reduction, validation in the sparse phase, checkpoints of the expert-major layout, the switch back.
    Same phases as the `reference` backend's run and the same losses up to fp32 summation order."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the kernels run compiled there (tests/backends/test_backends_gpu.py)")
    from tests.interpreted import run_interpreted

    reference = ssd_reference
    if activation != "relu":
        reference = tmp_path / "reference"
        loop_mod.train(_cfg(tiny_data, reference, **SSD, **{"model.activation": activation}))
    run = tmp_path / "run"
    for k, v in (("DATA", tiny_data["prefix"]), ("TOKENIZER", tiny_data["tokenizer"]), ("RUN", run),
                 ("ACT", activation)):
        monkeypatch.setenv(f"SSD_TEST_{k}", str(v))
    assert run_interpreted(__file__, "_train_with_triton_backend") == "done"
    assert "sparse" in _phases(run).values() and _phases(run) == _phases(reference)
    ref, got = _losses(reference), _losses(run)
    assert sorted(got) == sorted(ref)
    # (equal to the last bit here; dropping the router's dW1 term moves them by up to 1e-4)
    assert all(got[s] == pytest.approx(ref[s], rel=1e-5) for s in ref), [(s, got[s], ref[s]) for s in ref]


def test_compiled_ssd_run_tells_its_graph_breaks(tiny_data, tmp_path, capsys):
    """train.compile: the loop says when a compiled block's graph breaks, once per reason, at the step where it first
    happens. The CPU's reference backend breaks at its data-dependent bincount, first in the first sparse step."""
    run = tmp_path / "run"
    # Dynamo counts a break only when it compiles; graphs an earlier test of this process compiled are reused
    # silently (tests/train/test_block_graphs.py ran first in CI's worker and this test saw no break).
    torch._dynamo.reset()
    loop_mod.train(_cfg(tiny_data, run, **{**SSD, "train.max_steps": 6, "train.compile": True}))
    out = capsys.readouterr().out
    notes = [ln for ln in out.splitlines() if ln.startswith("note: torch.compile broke")]
    first_sparse = min(s for s, p in _phases(run).items() if p == "sparse")
    assert notes and all(f"by step {first_sparse}:" in ln for ln in notes), (first_sparse, notes)
    assert len(notes) == len(set(notes)) and any("bincount" in ln for ln in notes), notes
