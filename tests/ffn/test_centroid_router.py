"""SSD's router (eq. 4) as one Triton kernel equals `(x @ c.T).topk(k)` in the chosen experts, their
scores and both gradients: interpreted on CPU here (TRITON_INTERPRET=1 in a subprocess), compiled on
the GPU (bf16 included), and inside torch.compile."""
import importlib.util
import json
import pathlib

import pytest
import torch

from ssd_megatron.ffn.centroid_router import centroid_topk

from ..interpreted import run_interpreted

# (T, D, N, k): partial row blocks, D not a multiple of the 64-wide slices, N padded to 16, k = 1 and k = N
CASES = [(37, 40, 32, 6), (5, 70, 5, 5), (64, 64, 64, 16), (9, 16, 3, 1)]
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _check(T, D, N, k, dtype, device, generator, ties=False):
    """Errors of the scores, dx and dc against float64 autograd (relative to each one's largest entry),
    and whether the choice is right: with `ties` (small integers, exact scores) exactly the descending
    order with equal scores by increasing id; otherwise no unchosen expert scores above a chosen one by
    more than the rounding of the scores (near-ties may go either way)."""
    if ties:
        x = torch.randint(-2, 3, (T, D), generator=generator).float()
        c = torch.randint(-2, 3, (N, D), generator=generator).float()
    else:
        x, c = torch.randn(T, D, generator=generator), torch.randn(N, D, generator=generator)
    x, c = x.to(device, dtype).requires_grad_(), c.to(device, dtype).requires_grad_()
    s, idx = centroid_topk(x, c, k)
    w = torch.randn(T, k, generator=generator).to(device, dtype)
    dx, dc = torch.autograd.grad((s * w).sum(), (x, c))
    xr, cr = x.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    full = xr @ cr.t()
    sr = full.gather(1, idx)  # the reference's scores of the kernel's choice
    dxr, dcr = torch.autograd.grad((sr * w.double()).sum(), (xr, cr))
    if ties:
        right = torch.equal(idx, torch.sort(-full, dim=1, stable=True).indices[:, :k])
    else:
        slack = (1e-5 if dtype == torch.float32 else 1e-2) * float(full.detach().abs().max())
        unchosen = full.detach().scatter(1, idx, float("-inf")).max(1).values
        right = k == N or bool((sr.detach().min(1).values >= unchosen - slack).all())

    def rel(a, b):
        return float((a.detach().double() - b).abs().max() / b.abs().max().clamp_min(1e-30))

    return [rel(s, sr), rel(dx, dxr), rel(dc, dcr), bool(right)]


def _bench_routing():
    """tools/bench_routing.py as a module (its ROUTER_TILES)."""
    spec = importlib.util.spec_from_file_location("bench_routing", ROOT / "tools" / "bench_routing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interpreted_main():  # runs in a subprocess with TRITON_INTERPRET=1 set before triton loads
    g = torch.Generator().manual_seed(0)
    out = [_check(*case, torch.float32, "cpu", g) for case in CASES]
    out.append(_check(33, 24, 8, 3, torch.float32, "cpu", g, ties=True))
    # degenerate scores (a diverged run): K distinct valid ids per row, NaN first
    x = torch.tensor([[float("-inf"), 0.0], [float("nan"), 0.0], [1.0, 0.0]])
    s, idx = centroid_topk(x, torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]), 3)
    distinct = all(sorted(row) == [0, 1, 2] for row in idx.tolist())
    out.append([0.0, 0.0, 0.0, distinct and idx[2].tolist() == [2, 1, 0] and bool(torch.isinf(s[0]).all())])
    # tools/bench_routing.py's tile candidates: the same scores and ids as the default tile (integer inputs, so
    # every summation order is exact), rows and D not multiples of either tile
    from ssd_megatron.ffn.centroid_router import _topk_launch
    bench_routing = _bench_routing()
    x = torch.randint(-2, 3, (37, 70), generator=g).float()
    c = torch.randint(-2, 3, (32, 70), generator=g).float()
    want = _topk_launch(x, c, 6)
    same = [all(torch.equal(a, b) for a, b in zip(_topk_launch(x, c, 6, tile), want))
            for tile in bench_routing.ROUTER_TILES + [(16, 32, 2, 2)]]
    ordered = torch.equal(want[1], torch.sort(-(x @ c.t()), dim=1, stable=True).indices[:, :6])
    out.append([0.0, 0.0, 0.0, all(same) and ordered])
    print(json.dumps(out))


def test_torch_path_is_topk_of_scores():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(11, 8, generator=g), torch.randn(5, 8, generator=g)
    s, idx = centroid_topk(x, c, 3)
    ref = (x @ c.t()).topk(3, dim=-1)
    assert torch.equal(idx, ref.indices) and torch.equal(s, ref.values)
    with pytest.raises(ValueError, match="top_k=6"):
        centroid_topk(x, c, 6)


def test_interpreted_kernel_matches_torch():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the kernel is checked compiled")
    results = run_interpreted(__file__, "_interpreted_main")
    assert len(results) == len(CASES) + 3
    for es, edx, edc, right in results:
        assert right and max(es, edx, edc) < 1e-5


def test_default_tiles_are_checked_candidates_that_fit_an_a100():
    # every tile the launch picks on its own is one the interpreted test compares (ROUTER_TILES), and its stages of x
    # and the centroids fit an A100's 164 kB of shared memory
    from ssd_megatron.ffn.centroid_router import default_tile
    bench_routing = _bench_routing()
    for d in (64, 768, 2048, 4096, 8192):
        for np2 in (16, 32, 64, 128):
            for itemsize in (2, 4):
                bt, bd, _, stages = tile = default_tile(d, np2, itemsize)
                assert tile in bench_routing.ROUTER_TILES, (d, np2, itemsize, tile)
                assert stages * (bt + np2) * bd * itemsize <= 164 * 1024, (d, np2, itemsize, tile)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run via tools/gpu_bench.sh)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_torch(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(2)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for case in CASES + [(16384, 768, 32, 6), (515, 2080, 64, 16)]:  # the last: default_tile's wide rows
        es, edx, edc, right = _check(*case, dtype, "cuda", g)
        assert right and max(es, edx, edc) < tol, (case, es, edx, edc, right)
    assert _check(33, 24, 8, 3, dtype, "cuda", g, ties=True)[3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run via tools/gpu_bench.sh)")
def test_cuda_kernel_under_compile():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 96, generator=g).cuda().requires_grad_()
    c = torch.randn(16, 96, generator=g).cuda().requires_grad_()

    def f(x, c):
        s, idx = centroid_topk(x, c, 4)
        return (s * (idx + 1)).sum()

    torch.compile(f, fullgraph=True)(x, c).backward()
    dx, dc = x.grad.clone(), c.grad.clone()
    x.grad = c.grad = None
    f(x, c).backward()
    assert torch.allclose(dx, x.grad, atol=1e-4) and torch.allclose(dc, c.grad, atol=1e-4)


def test_centroid_cache_keeps_values_only_without_autograd():
    from ssd_megatron.ffn.centroid_router import CentroidCache
    cache, calls = CentroidCache(), []

    def compute():
        calls.append(1)
        return torch.full((2,), float(len(calls)))

    with torch.no_grad():
        first = cache.get(("w", 0), compute)
        assert cache.get(("w", 0), compute) is first and len(calls) == 1  # a hit
        assert cache.get(("w", 1), compute).tolist() == [2.0, 2.0]  # a new version: recomputed
    cache.get(("w", 1), compute)  # autograd on: always computed (training differentiates the mean)
    assert len(calls) == 3


def test_sparsified_ffn_computes_centroids_once_per_weight_version(monkeypatch):
    """After infer.sparse.sparsify, forwards without autograd reuse the centroids while the weights are
    unchanged, and follow every change: an in-place update, load_state_dict, a new clustering, densify."""
    import copy

    from ssd_megatron.ffn import centroid_router, switchable_ffn
    from ssd_megatron.infer.sparse import densify, sparsify

    from ..backends.backend_cases import expert_major_sparse_ffn

    class Model(torch.nn.Module):
        def __init__(self, ffn):
            super().__init__()
            self.ffn = ffn

        def ffn_layers(self):
            return [self.ffn]

    calls = []

    def counted(w1, E, dtype):
        calls.append(1)
        return centroid_router.expert_centroids(w1, E, dtype)

    monkeypatch.setattr(switchable_ffn, "expert_centroids", counted)
    torch.manual_seed(0)
    model = Model(expert_major_sparse_ffn(16, 32, "swiglu", 4, 2))
    fresh = copy.deepcopy(model.ffn)  # the same layer without the cache
    labels = model.ffn.expert_labels()
    sparsify(model, 4, 2, labels=[labels])
    assert model.ffn.cache_centroids and not fresh.cache_centroids
    x = torch.randn(9, 16)

    def agree():
        with torch.no_grad():
            return torch.equal(model.ffn(x), fresh(x))

    with torch.no_grad():
        model.ffn(x), model.ffn(x)
    assert len(calls) == 1
    assert agree()
    step = torch.randn_like(fresh.w_in.weight)
    with torch.no_grad():  # an in-place update (as an optimizer's) bumps the version counter
        before = model.ffn(x)
        for f in (model.ffn, fresh):
            f.w_in.weight.add_(step)
        assert not torch.equal(model.ffn(x), before)  # (the update changes the routing)
    assert agree()
    other = expert_major_sparse_ffn(16, 32, "swiglu", 4, 2)
    with torch.no_grad():
        other.w_in.weight.normal_()
    model.ffn.load_state_dict(other.state_dict())
    fresh.load_state_dict(other.state_dict())
    assert agree()
    sparsify(model, 4, 2, labels=[torch.randperm(32) % 4])  # a new clustering
    fresh = copy.deepcopy(model.ffn)
    fresh.cache_centroids = False
    assert agree()
    n = len(calls)
    model.ffn(x).sum().backward()  # training: computed every forward
    model.ffn(x)
    assert len(calls) == n + 2
    densify(model)
    assert not model.ffn.cache_centroids
