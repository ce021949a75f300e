"""`ssd-bench step --tiny` runs on CPU and writes the JSON record the GPU runs will produce."""
import json

from ssd_megatron.bench.step import main


def test_bench_step_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert main(["--tiny", "--phase", "both", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"gpu", "date", "torch", "records"} <= set(res)
    got = {(r["model"], r["phase"]) for r in res["records"]}
    assert got == {("ssd-megatron", "dense"), ("ssd-megatron", "sparse"), ("hf-gpt2", "dense")}
    by = {(r["model"], r["phase"]): r for r in res["records"]}
    dense, sparse = by[("ssd-megatron", "dense")], by[("ssd-megatron", "sparse")]
    assert dense["flops_per_step"] == by[("hf-gpt2", "dense")]["flops_per_step"]
    assert sparse["flops_per_step"] < dense["flops_per_step"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in res["records"])  # no MFU on CPU
    assert "speedup_dense_vs_hf" in res and "speedup_sparse_vs_dense" in res
    assert "tokens/s" in capsys.readouterr().out


def test_bench_step_counts_graphs_and_graph_breaks(tmp_path, capsys):
    """Each record says how many graphs torch.compile built and how many graph breaks it met for that run
    (docs/kernels.md v30: three breaks per sparse layer had doubled the eager GPU step). The dense GPT block traces
    whole; the CPU's reference expert backend breaks at its data-dependent bincount (a known, CPU-only break, which
    the count must see), and the run says so."""
    out = tmp_path / "step.json"
    assert main(["--tiny", "--phase", "both", "--steps", "1", "--warmup", "1", "--device", "cpu", "--compile",
                 "--no-hf", "--out", str(out)]) == 0
    by = {r["phase"]: r for r in json.loads(out.read_text())["records"]}
    assert by["dense"]["graph_breaks"] == 0 and by["dense"]["compiled_graphs"] >= 1
    assert by["sparse"]["graph_breaks"] > 0 and by["sparse"]["compiled_graphs"] > by["sparse"]["graph_breaks"]
    assert "ssd-megatron sparse loop: torch.compile met" in capsys.readouterr().err


def test_idle_gaps_merges_overlapping_kernels():
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    from ssd_megatron.bench.step import _idle_gaps

    def k(s, e, name):
        return NS(time_range=NS(start=s, end=e), name=name, device_type=DeviceType.CUDA)

    cpu = NS(time_range=NS(start=0, end=10_000), name="cpu op", device_type=DeviceType.CPU)
    # a [0,100] b [50,300] (overlaps a) | gap 700 | c [1000,1100] | gap 400 | d [1500,2000]; over 2 steps
    prof = NS(events=lambda: [k(1000, 1100, "c"), k(0, 100, "a"), cpu, k(50, 300, "b"), k(1500, 2000, "d")])
    res = _idle_gaps(prof, n=2)
    assert res["idle_ms_per_step"] == (0.7 + 0.4) / 2
    assert res["span_ms_per_step"] == 2.0 / 2
    assert res["largest"] == [(0.7, "b", "c"), (0.4, "c", "d")]
    assert res["kernels_per_step"] == 2.0
    assert res["gaps_per_step_by_size"][">=20us"] == [1.0, 0.55]  # both gaps (0.7, 0.4 ms), per step
    assert res["gaps_per_step_by_size"]["<2us"] == [0.0, 0.0]


def test_inductor_options_are_set_recorded_and_checked(tmp_path):
    import pytest
    import torch._inductor.config as cfg

    from ssd_megatron.errors import UserError

    before = cfg.aggressive_fusion
    out = tmp_path / "step.json"
    try:
        assert main(["--tiny", "--no-hf", "--steps", "1", "--warmup", "0", "--device", "cpu", "--out", str(out),
                     "--inductor", f"aggressive_fusion={not before}"]) == 0
        assert cfg.aggressive_fusion is (not before)
    finally:
        cfg.aggressive_fusion = before
    assert json.loads(out.read_text())["inductor_options"] == {"aggressive_fusion": not before}
    with pytest.raises(UserError, match="no_such_option"):
        main(["--tiny", "--device", "cpu", "--inductor", "no_such_option=1"])
    with pytest.raises(UserError, match="Python literal"):
        main(["--tiny", "--device", "cpu", "--inductor", "aggressive_fusion=yes please"])


def test_sparse_only_variant_skips_the_dense_phase(tmp_path):
    """A sparse-only variant is not run for the dense phase; on CPU (auto -> the reference backend) it
    cannot change anything, so it is reported as failed with the reason rather than timed as a no-op."""
    from ssd_megatron.bench.step import SPARSE_ONLY
    out = tmp_path / "step.json"
    sparse_only = [a for v in SPARSE_ONLY for a in ("--variant", v)]
    assert main(["--tiny", "--phase", "both", "--steps", "1", "--warmup", "0", "--device", "cpu", "--no-hf",
                 "--variant", "loop", *sparse_only, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {(r["phase"], r["variant"]) for r in res["records"]} == {("dense", "loop"), ("sparse", "loop")}
    assert [r["expert_backend"] for r in res["records"] if r["phase"] == "sparse"] == ["reference"]
    assert set(res["failed"]) == set(SPARSE_ONLY)  # each was accepted, run for the sparse phase only, and refused
    assert all("needs the triton expert backend, not reference" in m for m in res["failed"].values())


def test_profile_categories_name_the_sparse_phase_kernels():
    """The profile's categories put the expert kernels (Triton and Gluon) and the routing kernels of the sparse
    phase in their own rows, cuBLAS's GEMMs and the dense FFN's masked GEMM under gemm, inductor's under fused."""
    from ssd_megatron.bench.step import _category
    for name in ("_mlp_kernel", "_wgrad_kernel", "wgrad_ws_kernel", "mlp_ws_kernel", "_down_tma_kernel", "_up_kernel"):
        assert _category(name) == "sparse FFN: expert kernels", name
    for name in ("centroid_topk_kernel", "_plan_count_kernel", "_plan_scatter_kernel", "_expert_tiles_kernel"):
        assert _category(name) == "sparse FFN: routing", name
    assert _category("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert _category("relu_mask_gemm_pingpong_kernel") == "gemm"
    assert _category("triton_per_fused__to_copy_add_native_layer_norm_0") == "layernorm (fused by inductor)"
    assert _category("triton_poi_fused_add_view_8") == "fused elementwise (inductor)"
