"""Reference backend vs a float64 dense FFN, grouped_mm vs reference on CPU, and the registry."""
import subprocess
import sys

import pytest
import torch

from .backend_cases import compare, make_inputs, run, upcast
from ssd_megatron.errors import UserError
from ssd_megatron.ffn.activations import ACTIVATIONS, apply_activation, is_glu
from ssd_megatron.ffn.backends import BACKEND_NAMES, GroupedMMBackend, ReferenceBackend, get_backend


def _dense_as_experts(d_model, d_ff, N, activation, seed=0):
    """A float64 dense FFN (W_in, b_in, W_out) and its expert views through a random permutation."""
    g = torch.Generator().manual_seed(seed)
    glu = is_glu(activation)
    w_in = torch.randn(d_ff * (2 if glu else 1), d_model, generator=g, dtype=torch.float64, requires_grad=True)
    b_in = torch.randn(d_ff * (2 if glu else 1), generator=g, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(d_model, d_ff, generator=g, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(d_ff, generator=g)
    E = d_ff // N
    rows = torch.cat([perm.view(N, E), perm.view(N, E) + d_ff], 1).reshape(-1) if glu else perm
    w1 = w_in.index_select(0, rows).view(N, -1, d_model)
    b1 = b_in.index_select(0, rows).view(N, -1)
    w2 = w_out.t().index_select(0, perm).view(N, E, d_model)
    return (w_in, b_in, w_out), (w1, b1, w2)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_k_equals_n_is_dense_float64(activation):
    T, D, d_ff, N = 23, 16, 48, 6
    (w_in, b_in, w_out), (w1, b1, w2) = _dense_as_experts(D, d_ff, N, activation)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(T, N, dtype=torch.float64, requires_grad=True)
    top, idx = scores.topk(N, dim=1)
    gate = (top - top.detach()) + 1
    assert bool((gate == 1).all())
    dy = torch.randn(T, D, dtype=torch.float64)

    y = ReferenceBackend()(x, w1, b1, w2, idx, gate, activation)
    dense = apply_activation(x @ w_in.t() + b_in, activation) @ w_out.t()
    torch.testing.assert_close(y, dense, rtol=1e-12, atol=1e-12)

    # Gradients of the parameters through the permutation equal the dense ones (router path aside).
    params = (x, w_in, b_in, w_out)
    g_sparse = torch.autograd.grad(y, params, dy, retain_graph=True)
    g_dense = torch.autograd.grad(dense, params, dy)
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    # The gate's gradient is <dy_t, y_tk> for each selected expert.
    dgate = torch.autograd.grad(y, gate, dy)[0]
    E = d_ff // N
    for t in (0, T - 1):
        for k in range(N):
            e = idx[t, k]
            y_tk = apply_activation(x[t] @ w1[e].t() + b1[e], activation) @ w2[e]
            torch.testing.assert_close(dgate[t, k], (dy[t] * y_tk).sum(), rtol=1e-10, atol=1e-10)
    assert E * N == d_ff


@pytest.mark.parametrize("case", [
    dict(activation="relu"),
    dict(activation="gelu", routing="skewed"),
    dict(activation="squared_relu", routing="empty", K=1),
    dict(activation="swiglu", bias=False, K=4, N=4),
    dict(activation="geglu", T=1, K=1),
    dict(activation="reglu", T=50, N=8, K=3, routing="empty"),
])
def test_grouped_mm_matches_reference_cpu(case):
    inp = make_inputs(D=32, E=16, dtype=torch.float32, **case)
    want = run(ReferenceBackend(), upcast(inp))
    got = run(GroupedMMBackend(), inp)
    compare(got, want, tol=1e-5)


def test_reference_fp32_matches_float64():
    inp = make_inputs(activation="swiglu", routing="skewed", dtype=torch.float32)
    compare(run(ReferenceBackend(), inp), run(ReferenceBackend(), upcast(inp)), tol=1e-5)


def test_registry():
    assert set(BACKEND_NAMES) == {"auto", "reference", "grouped_mm", "triton", "megablocks"}
    with pytest.raises(UserError, match="accepted"):
        get_backend("cutlass")
    auto = get_backend("auto")
    assert auto.resolve(torch.zeros(2, 2)).name == "reference"  # CPU -> reference
    inp = make_inputs(activation="relu")
    compare(run(auto, inp), run(ReferenceBackend(), upcast(inp)), tol=1e-5)


def test_megablocks_missing_is_a_user_error():
    try:
        import megablocks.ops  # noqa: F401
        import grouped_gemm  # noqa: F401
        pytest.skip("megablocks is installed")
    except Exception:
        pass
    with pytest.raises(UserError, match="ssd.backend: megablocks needs"):
        get_backend("megablocks")


def test_backend_modules_import_without_gpu_packages():
    """Importing every backend module works with triton and megablocks hidden (a bare CPU machine)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('triton', 'megablocks', 'grouped_gemm', 'stk'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ssd_megatron.ffn.backends as b\n"
        "import ssd_megatron.ffn.backends.triton_backend, ssd_megatron.ffn.backends.megablocks_backend\n"
        "import ssd_megatron.ffn.backends.grouped_mm, ssd_megatron.ffn.backends.routing\n"
        "from ssd_megatron.errors import UserError\n"
        "assert b.available_backends('cpu') == ['reference', 'grouped_mm'], b.available_backends('cpu')\n"
        "for n in ('triton', 'megablocks'):\n"
        "    try:\n"
        "        b.get_backend(n)\n"
        "        raise SystemExit('no error for ' + n)\n"
        "    except UserError as e:\n"
        "        print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "ssd.backend: triton needs" in out.stdout and "ssd.backend: megablocks needs" in out.stdout


@pytest.mark.parametrize("glu", [False, True])
def test_gather_expert_weights_matches_index_select(glu):
    from ssd_megatron.ffn.backends.weights import gather_expert_weights
    D, d_ff, N = 5, 12, 3
    w_in = torch.randn(d_ff * (2 if glu else 1), D, dtype=torch.float64, requires_grad=True)
    b_in = torch.randn(w_in.shape[0], dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(D, d_ff, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(d_ff)
    w1, b1, w2 = gather_expert_weights(w_in, b_in, w_out, perm, N, glu)
    E = d_ff // N
    rows = torch.cat([perm.view(N, E), perm.view(N, E) + d_ff], 1).reshape(-1) if glu else perm
    assert torch.equal(w1, w_in[rows].view(N, -1, D)) and torch.equal(b1, b_in[rows].view(N, -1))
    assert torch.equal(w2, w_out.t()[perm].view(N, E, D))
    torch.autograd.gradcheck(lambda a, b, c: gather_expert_weights(a, b, c, perm, N, glu), (w_in, b_in, w_out))


def test_device_capability_lookup_compiles_without_a_warning(monkeypatch):
    """The per-device capability cache is read inside compiled sparse layers: torch.compile warned about
    the functools.lru_cache it used to be ("silent incorrectness is a potential risk") in every run."""
    import warnings

    from ssd_megatron.ffn import backends
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(backends, "_MAJOR", {})
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.compile(lambda x: x * 2 if backends._sm90(0) else x, backend="eager", fullgraph=True)(torch.ones(2))
    assert torch.equal(y, torch.full((2,), 2.0))
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("name", ["triton", "auto", "reference"])
def test_backend_offers_trace_without_a_graph_break(name):
    """The backends' optional offers are asked inside the compiled sparse layer; asking must not break its graph
    (the device image's torch 2.11 could not take a bound method's truth value: three breaks per sparse layer in
    the GPU step. CI's torch 2.13 traced that form too: the check bites where the suite runs under torch 2.11)."""
    from ssd_megatron.ffn.backends import master_weights_offered, output_bias_offered, router_fold_offered
    backend = get_backend(name)
    torch._dynamo.reset()

    def ask(x):
        offered = [f(backend, x) for f in (router_fold_offered, master_weights_offered, output_bias_offered)]
        return x * (1 + sum(offered))

    x = torch.ones(2, dtype=torch.bfloat16)
    got = torch.compile(ask, backend="eager", fullgraph=True)(x)
    assert torch.equal(got, ask(x))
