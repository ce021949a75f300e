"""Shared input builders and comparison helpers for the expert-backend tests (CPU and GPU)."""
from __future__ import annotations

import pytest
import torch

from ssd_megatron.ffn.activations import is_glu

GRAD_NAMES = ("x", "w1", "b1", "w2", "gate", "b2")


def make_inputs(T=37, D=32, E=16, N=4, K=2, activation="relu", bias=True, dtype=torch.float32,
                device="cpu", routing="random", seed=0):
    """Random inputs of the calling convention, plus the FFN's output bias b2 when `bias` (`expert_ffn` hands
    it to the backends that fold it). routing: random | skewed | empty | sequential."""
    g = torch.Generator().manual_seed(seed)
    F1 = 2 * E if is_glu(activation) else E
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    w1 = torch.randn(N, F1, D, generator=g, dtype=torch.float64) / D ** 0.5
    b1 = torch.randn(N, F1, generator=g, dtype=torch.float64) * 0.1 if bias else None
    w2 = torch.randn(N, E, D, generator=g, dtype=torch.float64) / E ** 0.5
    if routing == "random":
        scores = torch.rand(T, N, generator=g)
    elif routing == "skewed":  # most tokens want the first experts: very unbalanced loads
        scores = torch.rand(T, N, generator=g) + torch.linspace(3, 0, N)
    elif routing == "empty":  # experts N//2.. get nothing unless K forces them
        scores = torch.rand(T, N, generator=g)
        scores[:, N // 2:] -= 10
    else:
        raise ValueError(routing)
    idx = scores.topk(K, dim=1).indices
    gate = torch.rand(T, K, generator=g, dtype=torch.float64) + 0.5
    dy = torch.randn(T, D, generator=g, dtype=torch.float64)
    b2 = torch.randn(D, generator=g, dtype=torch.float64) * 0.1 if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return dict(x=cast(x), w1=cast(w1), b1=cast(b1), w2=cast(w2), gate=cast(gate), b2=cast(b2),
                topk_idx=idx.to(device), dy=dy.to(device=device, dtype=dtype), activation=activation)


def with_column_view_w2(inp):
    """w2 as the [N, E, D] view of a [D, N*E] (nn.Linear W_out-like) leaf, as weights.gather_expert_weights
    hands it to the backends (unit stride along E)."""
    w2 = inp["w2"].detach()
    leaf = w2.permute(2, 0, 1).contiguous().requires_grad_()  # [D, N, E]
    out = dict(inp)
    out["w2_leaf"] = leaf
    out["w2"] = leaf.permute(1, 2, 0)
    return out


def upcast(inp, dtype=torch.float64):
    out = dict(inp)
    out.pop("w2_leaf", None)
    for k in ("x", "w1", "b1", "w2", "gate", "b2", "dy"):
        if out.get(k) is not None:
            out[k] = out[k].detach().to(dtype).contiguous().requires_grad_(k != "dy")
    return out


def run(backend, inp):
    """(y, {name: grad}) of one forward + backward with the given output gradient; the output bias b2 goes
    through `expert_ffn` (into the backend where it folds it, else added after)."""
    from ssd_megatron.ffn.backends import expert_ffn
    leaf = inp.get("w2_leaf")
    for k in GRAD_NAMES:
        if inp.get(k) is not None and inp[k].is_leaf:
            inp[k].grad = None
    if leaf is not None:
        leaf.grad = None
    y = expert_ffn(backend, inp["x"], inp["w1"], inp["b1"], inp["w2"], inp["topk_idx"], inp["gate"],
                   inp["activation"], inp.get("b2"))
    y.backward(inp["dy"])
    grads = {k: inp[k].grad.detach().clone() for k in GRAD_NAMES if inp.get(k) is not None and inp[k].is_leaf}
    if leaf is not None:
        grads["w2"] = leaf.grad.permute(1, 2, 0).detach().clone()
    return y.detach(), grads


class Compiled:
    """`expert_backend` under torch.compile(fullgraph=True, **options), with the backend's optional offers (the
    output bias, the router's gradient), so that `run` and `run_router` call it as they call the backend."""

    def __init__(self, expert_backend, **options):
        self._fn = torch.compile(lambda *a, **k: expert_backend(*a, **k), fullgraph=True, **options)
        for offer in ("folds_output_bias", "folds_router"):
            if hasattr(expert_backend, offer):
                setattr(self, offer, getattr(expert_backend, offer))

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(got, want, tol):
    """Norm-relative error of output and every grad; returns the dict of errors, asserts <= tol."""
    (y, gy), (yr, gr) = got, want
    errs = {"y": rel_err(y, yr)}
    for k in gr:
        errs[k] = rel_err(gy[k], gr[k])
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"errors above {tol}: {errs}"
    return errs


def run_router(backend, inp, fold: bool):
    """(y, grads of x, w1, b1, w2, b2) with SSD's router in front of the backend: centroids c[n] = mean of
    the first E rows of w1[n], scores s[t, k] = x[t] . c[topk_idx[t, k]] and the straight-through gate
    (s - s.detach()) + 1 (inp's gate is not used). fold: the backend gets `router_centroids` and a gate
    of ones, and must add the router's gradient itself; else autograd differentiates the router."""
    from ssd_megatron.ffn.backends import call_router_folded, expert_ffn
    x, w1 = inp["x"], inp["w1"]
    names = [k for k in ("x", "w1", "b1", "w2", "b2") if inp.get(k) is not None]
    for k in names:
        inp[k].grad = None
    E = inp["w2"].shape[1]
    idx = inp["topk_idx"]
    if fold:
        c = w1[:, :E].mean(1).detach()
        y = call_router_folded(backend, x, w1, inp["b1"], inp["w2"], idx, inp["activation"], c, inp.get("b2"))
    else:
        c = w1[:, :E].mean(1)
        s = torch.einsum("td,tkd->tk", x, c[idx])
        y = expert_ffn(backend, x, w1, inp["b1"], inp["w2"], idx, (s - s.detach()) + 1, inp["activation"],
                       inp.get("b2"))
    y.backward(inp["dy"])
    return y.detach(), {k: inp[k].grad.detach().clone() for k in names}


def expert_major_sparse_ffn(d_model, d_ff, activation, num_experts, top_k, device="cpu", bias=True):
    """A SwitchableFFN (seed 0) as an SSD sparse phase runs it: random balanced clustering, stored
    expert-major, in sparse mode."""
    from ssd_megatron.ffn import SwitchableFFN
    from ssd_megatron.ffn.expert_layout import to_expert_major
    torch.manual_seed(0)
    ffn = SwitchableFFN(d_model, d_ff, activation, bias=bias, num_experts=num_experts, top_k=top_k).to(device)
    ffn.set_clustering(torch.randperm(d_ff, device=device) % num_experts)
    to_expert_major(ffn)
    ffn.set_mode("sparse")
    return ffn


def gluon_stand_in(monkeypatch, module, why: str) -> None:
    """For the Gluon launchers' fallback tests: the device counts as sm_90 unless `why` is "cpu", and `module`'s
    kernel (kernels/down_gluon.py or mlp_gluon.py) as not buildable when `why` is "older-triton"."""
    from ssd_megatron.ffn.backends.kernels import down_gluon  # (one sm_90 check for both kernels)
    if why != "cpu":
        monkeypatch.setattr(down_gluon, "_sm90", lambda t: True)
    if why == "older-triton":
        monkeypatch.setitem(module._STATE, "build", False)


def fresh_gluon_records(monkeypatch):
    """Empty kernels/gluon_launches.py records for one test: `auto`'s choices depend on what ran before in the process,
    and a test session's other Gluon launches (each shape and tile a key) can fill them to MAX_KEYS."""
    from ssd_megatron.ffn.backends.kernels import gluon_launches
    monkeypatch.setattr(gluon_launches, "_LAUNCHED", set())
    monkeypatch.setattr(gluon_launches, "_EAGER", set())


def auto_stand_in(monkeypatch, module_name: str, launcher_name: str, triton_kernel: str):
    """For `auto`'s policy tests of a Gluon kernel on CPU: skips where this Triton's Gluon does not build
    kernels/`module_name`.py; the device counts as sm_90 (`gluon_stand_in`); kernels/gluon_launches.py starts with
    no launch recorded and takes its CUDA-graph capture state from the returned dict's "capturing"; the module's
    `launch` and the launcher module's (kernels/`launcher_name`.py) `triton_kernel` record into the returned list as
    "ws" and "triton". Returns (the launcher module, the Gluon module, calls, state)."""
    import importlib

    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends.kernels import gluon_launches
    module = importlib.import_module(f"ssd_megatron.ffn.backends.kernels.{module_name}")
    launcher = importlib.import_module(f"ssd_megatron.ffn.backends.kernels.{launcher_name}")
    if module._build_once() is None:
        pytest.skip(f"this triton ({__import__('triton').__version__}) has no Gluon that builds {module_name}")
    calls, state = [], {"capturing": False}
    fresh_gluon_records(monkeypatch)
    monkeypatch.setattr(gluon_launches, "capturing", lambda t: state["capturing"])
    monkeypatch.setattr(launcher, triton_kernel, Recorder(calls, "triton"))
    monkeypatch.setattr(module, "launch", Recorder(calls, "ws"))
    gluon_stand_in(monkeypatch, module, "served")
    return launcher, module, calls, state


class Recorder:
    """Stands in for a kernel (`kernel[grid](...)`) or a launch function: records which ran, with what."""

    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        self.calls.append((self.name, args, kwargs))
