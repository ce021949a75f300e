"""Activation sparsity: exact zeros for ReLU-like activations, |h| <= threshold otherwise; the probe."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssd_megatron.errors import UserError
from ssd_megatron.ffn.activations import apply_activation
from ssd_megatron.ssd.sparsity import SMOOTH_THRESHOLD, SparsityProbe, activation_sparsity, default_threshold


class Act(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, h):
        return apply_activation(h, self.name)


class TinyFFN(nn.Module):
    """Stand-in for SwitchableFFN: exposes `.act` (post-activation hidden) and `.activation`."""

    def __init__(self, d_model, d_ff, activation="relu"):
        super().__init__()
        glu = activation in ("swiglu", "geglu", "reglu")
        self.activation = activation
        self.w_in = nn.Linear(d_model, 2 * d_ff if glu else d_ff)
        self.act = Act(activation) if activation != "relu" else nn.ReLU()
        self.w_out = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.w_out(self.act(self.w_in(x)))


def test_relu_family_counts_exact_zeros():
    h = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 1e-30]])
    assert activation_sparsity(h, "relu") == pytest.approx(5 / 8)
    for name in ("reglu", "squared_relu"):
        assert activation_sparsity(h, name) == pytest.approx(5 / 8)


def test_relu_sparsity_of_real_activation():
    torch.manual_seed(0)
    pre = torch.randn(64, 256)
    h = F.relu(pre)
    assert activation_sparsity(h, "relu") == pytest.approx(float((pre <= 0).float().mean()))
    # reglu: relu(gate) * up is zero wherever the gate is off
    gate_up = torch.randn(64, 512)
    h = apply_activation(gate_up, "reglu")
    assert activation_sparsity(h, "reglu") == pytest.approx(float((gate_up[:, :256] <= 0).float().mean()))


def test_smooth_activations_use_threshold():
    assert default_threshold("gelu") == SMOOTH_THRESHOLD == default_threshold("swiglu") == default_threshold("geglu")
    h = torch.tensor([0.5, -0.0005, 0.0009, -0.2, 0.001, 0.0, 0.005])
    assert activation_sparsity(h, "gelu") == pytest.approx(4 / 7)  # |h| <= 1e-3
    assert activation_sparsity(h, "gelu", threshold=0.0) == pytest.approx(1 / 7)
    assert activation_sparsity(h, "swiglu", threshold=0.3) == pytest.approx(6 / 7)
    # GELU is essentially off for very negative inputs, not for small negative ones
    assert activation_sparsity(F.gelu(torch.full((10,), -4.0)), "gelu") == 1.0
    assert activation_sparsity(F.gelu(torch.full((10,), -1.0)), "gelu") == 0.0


def test_mask_excludes_padding():
    h = torch.zeros(2, 3, 4)
    h[0, 0] = 1.0  # one real token fully active
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert activation_sparsity(h, "relu", mask=mask) == 0.0
    assert activation_sparsity(h, "relu") == pytest.approx(20 / 24)
    assert activation_sparsity(h, "relu", mask=torch.zeros(2, 3)) == 0.0  # nothing counted


def test_unknown_activation_is_user_error():
    with pytest.raises(UserError, match="activation"):
        activation_sparsity(torch.zeros(3), "tanh")


def test_probe_accumulates_per_layer_over_batches():
    torch.manual_seed(0)
    ffns = [TinyFFN(8, 32, "relu"), TinyFFN(8, 32, "swiglu"), TinyFFN(8, 32, "reglu")]
    with torch.no_grad():
        ffns[0].w_in.bias.fill_(-100.0)  # layer 0: every neuron off
    batches = [torch.randn(4, 5, 8), torch.randn(2, 7, 8)]
    expected_off = [0, 0, 0]
    expected_tot = [0, 0, 0]
    with SparsityProbe(ffns) as probe:
        for x in batches:
            for i, f in enumerate(ffns):
                h = f.act(f.w_in(x))
                thr = 0.0 if f.activation != "swiglu" else SMOOTH_THRESHOLD
                expected_off[i] += int((h.abs() <= thr).sum()) if thr else int((h == 0).sum())
                expected_tot[i] += h.numel()
                f(x)
    # the manual calls inside the block went through the hooks too: each batch counted twice
    assert probe.counts() == [(2 * o, 2 * t) for o, t in zip(expected_off, expected_tot)]
    assert probe.per_layer()[0] == 1.0
    assert probe.mean() == pytest.approx(sum(o / t for o, t in zip(expected_off, expected_tot)) / 3)
    # hooks are gone after the block
    n_before = probe.counts()
    ffns[0](batches[0])
    assert probe.counts() == n_before


def test_probe_mask_and_reset():
    ffn = TinyFFN(4, 16)
    with torch.no_grad():
        ffn.w_in.bias.fill_(-100.0)
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with SparsityProbe([ffn]) as probe:
        probe.set_mask(mask)
        ffn(x)
    assert probe.counts() == [(3 * 16, 3 * 16)]
    probe.reset()
    assert probe.counts() == [(0, 0)] and probe.per_layer() == [0.0] and probe.mean() == 0.0


def test_probe_validation():
    with pytest.raises(ValueError, match="act"):
        SparsityProbe([nn.Linear(2, 2)])
    bare = nn.Module()
    bare.act = nn.ReLU()
    with pytest.raises(ValueError, match="activation"):
        SparsityProbe([bare])
    probe = SparsityProbe([bare], activation="relu")
    with probe:
        bare.act(torch.tensor([-1.0, 1.0]))
        with pytest.raises(RuntimeError):
            probe.__enter__()
    assert probe.per_layer() == [0.5]
