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
