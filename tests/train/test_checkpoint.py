"""Checkpoint files: round trip, keep-last, atomic save under failure, stale temp dirs, corrupt files."""
import os
import random

import numpy as np
import pytest
import torch

from ssd_megatron.config import ModelConfig
from ssd_megatron.errors import UserError
from ssd_megatron.models import build_model
from ssd_megatron.parallel.distributed import ParallelDims
from ssd_megatron.train import checkpoint as ck

VOCAB = 64


class _C:
    interval = 1
    keep_last = 2


def _model(d=32, arch="gpt"):
    cfg = ModelConfig(arch=arch, n_layers=1, d_model=d, n_heads=2, d_ff=64, max_seq_len=16, vocab_size=VOCAB)
    return build_model(cfg, VOCAB)


def _trained(seed=0, d=32):
    torch.manual_seed(seed)
    m = _model(d)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(input_ids=torch.randint(0, VOCAB, (2, 8))).float().pow(2).mean().backward()
    opt.step()
    return m, opt


def _state(step, arch="gpt"):
    return {"consumed_samples": 16 * step, "config": {"model": {"arch": arch}}, "method": {}}


def _mgr(tmp_path, keep=2):
    c = _C()
    c.keep_last = keep
    return ck.CheckpointManager(tmp_path, c, ParallelDims())


def test_round_trip_is_exact(tmp_path):
    m, opt = _trained()
    mgr = _mgr(tmp_path)
    random.seed(5); np.random.seed(5); torch.manual_seed(5)
    path = mgr.save(3, m, opt, _state(3), "x: 1\n")
    expect = (random.random(), np.random.rand(), torch.rand(1))
    m2 = _model()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    random.seed(0); np.random.seed(0); torch.manual_seed(0)
    state = mgr.load(path, m2, opt2, "gpt")
    assert state["step"] == 3 and state["consumed_samples"] == 48
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for f in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][f], s2[k][f])


def test_keep_last_and_latest(tmp_path):
    m, opt = _trained()
    mgr = _mgr(tmp_path, keep=2)
    for s in (1, 2, 3):
        mgr.save(s, m, opt, _state(s), "")
    steps = [s for s, _ in ck.list_checkpoints(mgr.root)]
    assert steps == [2, 3]
    assert ck.latest_checkpoint(mgr.root).name == "step_0000003"
    assert ck.resolve_resume("auto", mgr.root).name == "step_0000003"
    assert ck.resolve_resume("none", mgr.root) is None
    assert ck.resolve_resume(str(tmp_path), mgr.root).name == "step_0000003"


def test_failed_save_keeps_latest_good(tmp_path, monkeypatch):
    m, opt = _trained()
    mgr = _mgr(tmp_path, keep=1)
    good = mgr.save(1, m, opt, _state(1), "")
    real = ck.write_file

    def flaky(obj, path):
        if path.name == "optimizer.pt":
            real(obj, path)
            with open(path, "r+b") as f:  # leave a half-written file behind, then die
                f.truncate(10)
            raise OSError("disk full (simulated)")
        real(obj, path)

    monkeypatch.setattr(ck, "write_file", flaky)
    with pytest.raises(OSError, match="simulated"):
        mgr.save(2, m, opt, _state(2), "")
    monkeypatch.setattr(ck, "write_file", real)
    assert [p.name for _, p in ck.list_checkpoints(mgr.root)] == [good.name]
    assert not [p for p in mgr.root.iterdir() if p.name.startswith(".tmp-")]
    m2 = _model()
    assert mgr.load(ck.latest_checkpoint(mgr.root), m2, torch.optim.AdamW(m2.parameters()), "gpt")["step"] == 1


def test_killed_save_leftovers_are_ignored_and_cleaned(tmp_path):
    m, opt = _trained()
    mgr = _mgr(tmp_path)
    good = mgr.save(1, m, opt, _state(1), "")
    # A process killed mid-save leaves a temp dir; one killed between the two renames leaves .old-*.
    tmp = mgr.root / ".tmp-step_0000002"
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"partial")
    os.replace(good, mgr.root / ".old-step_0000001")
    assert ck.latest_checkpoint(mgr.root) is None
    _mgr(tmp_path)  # a new run cleans up and repairs
    assert not tmp.exists()
    assert ck.latest_checkpoint(mgr.root) == good


def test_resave_same_step(tmp_path):
    m, opt = _trained()
    mgr = _mgr(tmp_path)
    mgr.save(1, m, opt, _state(1), "")
    mgr.save(1, m, opt, _state(1), "")
    assert [s for s, _ in ck.list_checkpoints(mgr.root)] == [1]


def _saved(tmp_path):
    m, opt = _trained()
    return _mgr(tmp_path).save(1, m, opt, _state(1), "")


def _load_err(path, model=None, arch="gpt"):
    model = model or _model()
    with pytest.raises(UserError) as ei:
        ck.load_checkpoint(path, model, torch.optim.AdamW(model.parameters()), arch, ParallelDims())
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_truncated_file_names_it(tmp_path):
    path = _saved(tmp_path)
    f = path / "model.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = _load_err(path)
    assert str(f) in msg and "truncated" in msg


def test_garbage_file_names_it(tmp_path):
    path = _saved(tmp_path)
    f = path / "optimizer.pt"
    f.write_bytes(os.urandom(f.stat().st_size))  # same size, so only the reader can tell
    msg = _load_err(path)
    assert str(f) in msg and "corrupt" in msg


def test_shape_mismatch_names_file(tmp_path):
    path = _saved(tmp_path)
    msg = _load_err(path, model=_model(d=48))
    assert str(path / "model.pt") in msg and "shape" in msg


def test_other_arch_names_file(tmp_path):
    path = _saved(tmp_path)
    msg = _load_err(path, arch="bert")
    assert str(path / "trainer.pt") in msg and "gpt" in msg and "bert" in msg


def test_missing_manifest(tmp_path):
    path = _saved(tmp_path)
    (path / "manifest.json").unlink()
    msg = _load_err(path)
    assert "manifest.json" in msg
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ck.resolve_resume(str(path), tmp_path)


def _expert_major_trained():
    """A model mid-sparse: SwiGLU FFN stored expert-major, with moments, after a sparse step."""
    from ssd_megatron.ffn.expert_layout import to_expert_major

    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=16, vocab_size=VOCAB,
                      activation="swiglu")
    m = build_model(cfg, VOCAB)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for ffn in m.ffn_layers():
        ffn.configure_experts(4, 2)
        ffn.set_clustering(torch.randperm(64) % 4)
        to_expert_major(ffn, opt)
        ffn.set_mode("sparse")
    m(input_ids=torch.randint(0, VOCAB, (2, 8))).float().pow(2).mean().backward()
    opt.step()
    return cfg, m, opt


def test_expert_major_storage_round_trips(tmp_path):
    cfg, m, opt = _expert_major_trained()
    path = _mgr(tmp_path).save(1, m, opt, _state(1), "")
    m2 = build_model(cfg, VOCAB)
    for ffn in m2.ffn_layers():
        ffn.configure_experts(4, 2)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    ck.load_checkpoint(path, m2, opt2, "gpt", ParallelDims())
    assert all(f.is_expert_major and f.act.glu_block == 16 for f in m2.ffn_layers())
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def test_checkpoint_without_expert_major_loads_as_neuron_order(tmp_path):
    """Checkpoints written before expert-major storage existed have no `*.expert_major` entries."""
    import json

    m, opt = _trained()
    path = _mgr(tmp_path).save(1, m, opt, _state(1), "")
    sd = torch.load(path / "model.pt")
    old = {k: v for k, v in sd.items() if not k.endswith(".expert_major")}
    assert len(old) < len(sd)
    torch.save(old, path / "model.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.pt"] = (path / "model.pt").stat().st_size
    (path / "manifest.json").write_text(json.dumps(manifest))
    m2 = _model()
    ck.load_checkpoint(path, m2, torch.optim.AdamW(m2.parameters(), lr=1e-3), "gpt", ParallelDims())
    assert not any(f.is_expert_major for f in m2.ffn_layers())
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
