"""ssd-report's cross-run comparison on synthetic run directories."""
import json

import pytest
import yaml

from ssd_megatron.errors import UserError
from ssd_megatron.report.compare import load_run, main, write_comparison


def _run(tmp_path, name, method, flops_per_step, step_time, ppls, sweep=None, log_interval=1):
    d = tmp_path / name
    d.mkdir()
    cfg = {"name": name, "method": method, "model": {"arch": "gpt", "n_layers": 2, "d_model": 32, "n_heads": 2,
                                                     "d_ff": 64, "vocab_size": 128, "max_seq_len": 16},
           "data": {"seq_len": 16}, "smoe": {"num_experts": 4, "top_k": 2}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    recs, total = [], 0.0
    steps = 10
    for s in range(steps):
        total += flops_per_step
        if (s + 1) % log_interval == 0:
            recs.append({"kind": "train", "step": s, "loss": 3.0, "phase": "dense", "flops": flops_per_step,
                         "flops_total": total, "step_time": step_time, "elapsed": step_time * (s + 1) + 1.0,
                         "tokens": 16 * (s + 1)})
        if (s + 1) % 5 == 0:
            recs.append({"kind": "valid", "step": s + 1, "valid_loss": 1.0, "valid_ppl": ppls[(s + 1) // 5 - 1]})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"torn")
    if sweep is not None:
        (d / "report").mkdir()
        (d / "report" / "sweep_k.json").write_text(json.dumps(sweep))
    return d


def test_compare_tables_figures_and_ratios(tmp_path):
    dense = _run(tmp_path, "d", "dense", 100.0, 1.0, [20.0, 10.0])
    smoe = _run(tmp_path, "s", "smoe", 80.0, 0.5, [22.0, 11.0], log_interval=2)
    ssd = _run(tmp_path, "x", "ssd", 70.0, 0.8, [21.0, 9.5],
               sweep=[{"k": 4, "ppl": 12.0, "flops_per_token": 5e4}, {"k": 1, "ppl": 30.0, "flops_per_token": 2e4}])
    out = tmp_path / "cmp"
    res = write_comparison([dense, smoe, ssd], out)
    for f in ("fig3_ppl_vs_train_flops.png", "fig4a_ppl_vs_inference_flops.png", "compare.md", "compare.json"):
        assert (out / f).stat().st_size > 0
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["dense"]["train_flops"] == 1000.0 and rows["ssd"]["flops_speedup"] == pytest.approx(1000 / 700)
    assert rows["smoe"]["step_time_s"] == pytest.approx(5.0)  # 5 logged steps x 0.5 s, extrapolated to 10
    assert rows["smoe"]["time_speedup"] == pytest.approx(2.0)
    assert rows["ssd"]["ppl_vs_baseline"] == pytest.approx(0.95)
    # SMoE's final model computes K/N of the FFN plus its router: cheaper inference than dense.
    assert rows["smoe"]["inference_flops_vs_baseline"] < 1.0
    assert rows["ssd"]["inference_flops_vs_baseline"] == pytest.approx(1.0)
    run = load_run(ssd)
    assert [c[0] for c in run.curve] == [350.0, 700.0] and [c[1] for c in run.curve] == [21.0, 9.5]
    assert [p["k"] for p in run.sweep] == [1, 4]  # sorted by cost
    md = (out / "compare.md").read_text()
    assert "| SSD |" in md and "(1.43×)" in md and "k sweep" in md
    data = json.loads((out / "compare.json").read_text())
    assert data["baseline"] == "Dense" and len(data["runs"]) == 3


def test_cli_and_errors(tmp_path, capsys):
    d = _run(tmp_path, "d", "dense", 1.0, 1.0, [5.0, 4.0])
    assert main([str(d), "--out", str(tmp_path / "o")]) == 0
    assert "| Dense |" in capsys.readouterr().out
    with pytest.raises(UserError, match="metrics.jsonl"):
        write_comparison([tmp_path], tmp_path / "o2")
    with pytest.raises(UserError, match="not found"):
        write_comparison([tmp_path / "missing"], tmp_path / "o2")
