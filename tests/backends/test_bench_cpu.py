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
