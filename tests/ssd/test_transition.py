"""Contract 2: dense -> sparse -> dense with no step in between leaves parameters, optimizer moments
and RNG bit-identical; a phase switch never creates, drops or resets anything."""
import random

import numpy as np
import torch

from ssd_megatron.config import ModelConfig
from ssd_megatron.models import build_model
from ssd_megatron.ssd.monitor import ActivationMonitor
from ssd_megatron.ssd.transition import to_dense, to_sparse


def _trained_model():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", n_layers=2, d_model=32, n_heads=2, d_ff=128, max_seq_len=16)
    model = build_model(cfg, 96)
    for ffn in model.ffn_layers():
        ffn.configure_experts(8, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = {"input_ids": torch.randint(0, 96, (4, 16))}
    for _ in range(3):
        logits = model(**batch)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, batch


def _snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in opt.state.items()}
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    return params, moments, rng


def _assert_same(a, b):
    pa, ma, ra = a
    pb, mb, rb = b
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert all(torch.equal(ma[k][n], mb[k][n]) if torch.is_tensor(ma[k][n]) else ma[k][n] == mb[k][n] for n in ma[k])
    assert torch.equal(ra[0], rb[0]) and np.array_equal(ra[1], rb[1]) and ra[2] == rb[2]


def test_dense_sparse_dense_is_bit_identical():
    model, opt, batch = _trained_model()
    ffns = list(model.ffn_layers())
    n_params = len(list(model.parameters()))
    ptrs = [p.data_ptr() for p in model.parameters()]
    before = _snapshot(model, opt)

    monitor = ActivationMonitor(ffns, 8, seed=0)
    report = monitor.run(0, model, batch)  # clustering + sparsity probe, as at a real switch
    assert len(report.sparsity) == 2 and all(0 <= s <= 1 for s in report.sparsity)
    to_sparse(ffns, monitor.labels, opt)
    assert all(f.mode == "sparse" for f in ffns)
    to_dense(ffns, opt)
    assert all(f.mode == "dense" for f in ffns)

    _assert_same(before, _snapshot(model, opt))
    assert len(list(model.parameters())) == n_params and [p.data_ptr() for p in model.parameters()] == ptrs
    for ffn, lab in zip(ffns, monitor.labels):
        assert torch.equal(ffn.expert_labels(), lab)  # the layout is the clustering, by neuron id


def test_moments_follow_their_neurons_through_a_sparse_step():
    """A sparse step updates only the selected experts' moments, in place (the switch reordered the
    moments once, together with the parameters; the step itself moves nothing)."""
    model, opt, batch = _trained_model()
    ffns = list(model.ffn_layers())
    monitor = ActivationMonitor(ffns, 8, seed=0)
    monitor.run(0, model, None)
    to_sparse(ffns, monitor.labels, opt)
    for ffn in ffns:
        ffn.router_grad = False  # only the chosen experts' rows get gradient
    w = ffns[0].w_in.weight
    m_before = opt.state[w]["exp_avg"].clone()
    ids = batch["input_ids"][:1, :2]  # 2 tokens x top-2 of 8 experts: at least half the experts idle
    logits = model(input_ids=ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    grad_rows = w.grad.abs().sum(1) > 0
    opt.step()
    m_after = opt.state[w]["exp_avg"]
    # Rows with no gradient decay by beta1 exactly (AdamW's update of a zero gradient), rows with one move.
    torch.testing.assert_close(m_after[~grad_rows], m_before[~grad_rows] * 0.9, rtol=1e-6, atol=0)
    assert grad_rows.any() and not grad_rows.all()
