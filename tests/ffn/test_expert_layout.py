"""Expert-major storage (ffn/expert_layout.py): the experts become views of permuted parameters, the
optimizer's moments move with their neurons, and neuron order comes back bit for bit."""
import copy

import pytest
import torch

from ssd_megatron.ffn import SwitchableFFN
from ssd_megatron.ffn.expert_layout import to_expert_major, to_neuron_order

ACTS = ["relu", "gelu", "swiglu", "geglu"]
D, F, N = 12, 48, 6


def _ffn(act, bias=True, k=2, seed=0):
    torch.manual_seed(seed)
    ffn = SwitchableFFN(D, F, act, bias=bias, num_experts=N, top_k=k).double()
    ffn.set_clustering(torch.randperm(F, generator=torch.Generator().manual_seed(seed + 1)) % N)
    return ffn


def _adam_steps(ffn, opt, x, steps=3):
    for _ in range(steps):
        ffn(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)


def _state(ffn, opt):
    out = {n: p.detach().clone() for n, p in ffn.named_parameters()}
    out.update({f"{n}.grad": p.grad.clone() for n, p in ffn.named_parameters() if p.grad is not None})
    for n, p in ffn.named_parameters():
        out.update({f"{n}.{k}": v.clone() for k, v in opt.state[p].items()})
    return out


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_is_bit_identical_with_moments_and_grads(act, bias):
    ffn = _ffn(act, bias)
    opt = torch.optim.AdamW(ffn.parameters(), lr=1e-2, foreach=True)
    ffn.set_mode("sparse")
    _adam_steps(ffn, opt, torch.randn(20, D, dtype=torch.float64))
    ffn(torch.randn(5, D, dtype=torch.float64)).sum().backward()  # leave a gradient in place too
    before = _state(ffn, opt)
    ptrs = [p.data_ptr() for p in ffn.parameters()]
    to_expert_major(ffn, opt)
    assert ffn.is_expert_major and int(ffn.expert_major) == F // N
    moved = _state(ffn, opt)
    assert any(not torch.equal(before[k], moved[k]) for k in before)  # it really moved
    to_neuron_order(ffn, opt)
    assert not ffn.is_expert_major and int(ffn.expert_major) == 0
    _assert_equal(before, _state(ffn, opt))
    assert [p.data_ptr() for p in ffn.parameters()] == ptrs  # in place: captured graphs stay valid


@pytest.mark.parametrize("act", ACTS)
def test_expert_major_computes_the_same_function_and_gradients(act):
    """Sparse (views, no gather) and dense (GLU split per expert block) forwards equal the neuron-order
    ones, and the gradients, moved back to neuron order, equal the gathered path's."""
    a = _ffn(act)
    b = copy.deepcopy(a)
    to_expert_major(b)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    for mode in ("dense", "sparse"):
        a.set_mode(mode)
        b.set_mode(mode)
        a.zero_grad()
        b.zero_grad()
        ya, yb = a(x), b(x)
        torch.testing.assert_close(yb, ya, rtol=0, atol=1e-13)
        ya.square().sum().backward()
        yb.square().sum().backward()
        to_neuron_order(b)  # moves the gradients with the parameters
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=1e-12, msg=f"{mode} {n}")
        to_expert_major(b)


@pytest.mark.parametrize("act", ["relu", "swiglu"])
def test_sparse_training_expert_major_matches_gathered(act):
    """AdamW steps on expert-major storage end where the same steps through the gather end."""
    a = _ffn(act, k=3)
    b = copy.deepcopy(a)
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2, foreach=True)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=True)
    to_expert_major(b, ob)
    for f in (a, b):
        f.set_mode("sparse")
    x = torch.randn(32, D, dtype=torch.float64)
    _adam_steps(a, oa, x)
    _adam_steps(b, ob, x)
    to_neuron_order(b, ob)
    sa, sb = _state(a, oa), _state(b, ob)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-12, msg=k)


@pytest.mark.parametrize("act", ["relu", "swiglu"])
def test_neuron_rows_and_labels_speak_neuron_ids(act):
    ffn = _ffn(act)
    rows, labels = ffn.neuron_rows().clone(), ffn.expert_labels().clone()
    to_expert_major(ffn)
    assert torch.equal(ffn.neuron_rows(), rows) and torch.equal(ffn.expert_labels(), labels)


def test_state_dict_carries_the_layout():
    src = _ffn("swiglu")
    to_expert_major(src)
    src.set_mode("sparse")
    x = torch.randn(9, D, dtype=torch.float64)
    dst = SwitchableFFN(D, F, "swiglu").double()  # one expert: the checkpoint's layout must win
    dst.load_state_dict(src.state_dict())
    assert dst.is_expert_major and dst.num_experts == N and dst.act.glu_block == F // N
    for mode in ("dense", "sparse"):
        src.set_mode(mode)
        dst.set_mode(mode)
        dst.top_k = src.top_k
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_state_dict_without_the_buffer_loads_as_neuron_order():
    """Checkpoints written before expert-major storage existed have no `expert_major` entry."""
    src = _ffn("relu")
    sd = {k: v for k, v in src.state_dict().items() if k != "expert_major"}
    dst = _ffn("relu", seed=5)
    to_expert_major(dst)
    dst.load_state_dict(sd)
    assert not dst.is_expert_major
    x = torch.randn(9, D, dtype=torch.float64)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_reclustering_or_resizing_expert_major_storage_is_refused():
    ffn = _ffn("relu")
    to_expert_major(ffn)
    with pytest.raises(ValueError, match="restore neuron order first"):
        ffn.set_clustering(torch.arange(F) % N)
    with pytest.raises(ValueError, match="restore neuron order first"):
        ffn.configure_experts(3, 1)
    ffn.configure_experts(N, 4)  # k may change: the layout depends on N only
    to_neuron_order(ffn)
    ffn.configure_experts(3, 1)


def test_expert_major_sparse_step_copies_no_weights():
    """The point of expert-major storage: forward and backward of the sparse path read the experts as
    views, so no op copies a weight-sized tensor (the gather path does, both ways)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.index_select, torch.ops.aten.gather, torch.ops.aten.index,
                                       torch.ops.aten.scatter, torch.ops.aten.index_put_):
                src = args[0]
                if torch.is_tensor(src) and src.numel() >= F * D:
                    self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    def ops(ffn):
        ffn.set_mode("sparse")
        x = torch.randn(40, D, dtype=torch.float64)
        with Copies() as mode:
            ffn(x).sum().backward()
        return mode.ops

    for act in ("relu", "swiglu"):
        gathered = _ffn(act)
        assert ops(gathered)  # the gather path does copy the weights (so this check can see them)
        em = _ffn(act)
        to_expert_major(em)
        assert ops(em) == [], act
