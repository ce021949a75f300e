"""The benchmark's sparse path is the SSD layer: with K = N it equals the dense path (CPU, fp32), whichever
way it gets the expert weights."""
import pytest
import torch

from ssd_megatron.bench import main as bench_main
from ssd_megatron.bench.ffn import Layer
from ssd_megatron.errors import UserError
from ssd_megatron.ffn.backends import GroupedMMBackend, ReferenceBackend


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_bench_sparse_path_k_equals_n_is_dense(activation):
    layer = Layer("tiny", activation, torch.device("cpu"), torch.float32, seed=0)
    layer.K = layer.N
    x = torch.randn(33, layer.D)
    dense = layer.dense(x)
    for mode in ("none", "permute", "index_select"):  # expert-major views and the two gathers
        layer.w2_mode = mode
        for be in (ReferenceBackend(), GroupedMMBackend()):
            torch.testing.assert_close(layer.sparse(x, be), dense, rtol=1e-4, atol=1e-5)


def test_bench_cli_errors():
    with pytest.raises(UserError, match="unknown sub-command"):
        bench_main(["nope"])
    with pytest.raises(UserError):
        bench_main(["ffn", "--shapes", "huge"])


def test_triton_variants_are_checked_without_a_gpu():
    """--triton-variants entries are built (and a bad one refused) before anything runs, so a typo in a GPU
    session's command fails on the first line, not after the tests."""
    from ssd_megatron.bench.ffn import _triton_variants
    pytest.importorskip("triton")
    built = _triton_variants("fold_router=off,fold_output=false+fused_forward=true,master_weights=false")
    assert built["triton[fold_output=false+fused_forward=true]"].fused_forward is True
    assert built["triton[fold_output=false+fused_forward=true]"].fold_output is False
    assert built["triton[fold_router=off]"].fold_router == "off"
    for bad in ("fused=true", "fold_router=sideways", "combine"):
        with pytest.raises(UserError, match="bad --triton-variants entry"):
            bench_main(["ffn", "--device", "cpu", "--triton-variants", bad])


def test_fused_dense_baseline_is_the_dense_relu_ffn():
    """`fused dense` (the training step's dense ReLU FFN, ffn/fused_relu_ffn.py) computes the plain dense layer,
    forward and every gradient (CPU, fp32: the op's plain torch path)."""
    layer = Layer("tiny", "relu", torch.device("cpu"), torch.float32, seed=0)
    x = torch.randn(33, layer.D, requires_grad=True)
    dy = torch.randn(33, layer.D)
    leaves = [x, layer.w_in, layer.b_in, layer.w_out, layer.b_out]
    want = torch.autograd.grad(layer.dense(x), leaves, dy)
    got = torch.autograd.grad(layer.dense_fused(x), leaves, dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_bench_records_the_fused_dense_baseline_for_relu(tmp_path):
    """ReLU records carry the fused dense times and the ratios against them beside the plain dense ones; SwiGLU's,
    which has no fused dense FFN, do not. The run's figure lands beside its JSON."""
    import json
    out = tmp_path / "ffn.json"
    assert bench_main(["ffn", "--device", "cpu", "--shapes", "tiny", "--activations", "relu,swiglu", "--backends",
                       "reference", "--tokens", "256", "--iters", "2", "--warmup", "1", "--rotations", "1",
                       "--routing", "realistic", "--no-breakdown", "--out", str(out)]) == 0
    recs = {r["activation"]: r for r in json.loads(out.read_text())["records"]}
    relu = recs["relu"]
    assert relu["fused_dense_fwd_bwd_ms"] > 0 and relu["dense_fwd_bwd_ms"] > 0
    assert relu["speedup_fwd_bwd_vs_fused_dense"] == pytest.approx(relu["fused_dense_fwd_bwd_ms"] / relu["fwd_bwd_ms"])
    assert relu["speedup_fwd_vs_fused_dense"] == pytest.approx(relu["fused_dense_fwd_ms"] / relu["fwd_ms"])
    assert not any(k.startswith("fused_dense") for k in recs["swiglu"])
    assert (tmp_path / "ffn.png").stat().st_size > 0


def test_time_calls_reports_each_groups_median(monkeypatch):
    """Calls i = 0, 2, 4 ... form group 0 and 1, 3, 5 ... group 1 (a Case's rotated layers): each group's median is
    its own calls' (here 1 ms and 20 ms sleeps), the overall median is over all calls."""
    import time

    from ssd_megatron.bench import timing
    from ssd_megatron.bench.timing import time_calls
    monkeypatch.setattr(timing, "CUDA", False)  # host timers (else only a `--device cpu` run before set it)
    t = time_calls(lambda i: time.sleep(0.001 if i % 2 == 0 else 0.02), 6, 1, groups=2)
    fast, slow = t["group_medians"]
    assert t["n"] == 6 and fast < 10 <= slow and t["min"] <= fast and slow <= t["max"]
    assert "group_medians" not in time_calls(lambda i: None, 3, 0)


def test_bench_records_routing_stats_per_rotated_layer(tmp_path):
    import json
    out = tmp_path / "ffn.json"
    assert bench_main(["ffn", "--device", "cpu", "--shapes", "tiny", "--activations", "relu", "--backends",
                       "reference", "--tokens", "256", "--iters", "2", "--warmup", "1", "--rotations", "2",
                       "--no-breakdown", "--no-plot", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    stats = next(iter(res["routing_stats"].values()))
    assert len(stats["per_rotation"]) == 2 and stats["per_rotation"][0] == {k: v for k, v in stats.items()
                                                                             if k != "per_rotation"}
    assert len(res["records"][0]["fwd_bwd_stats"]["group_medians"]) == 2
