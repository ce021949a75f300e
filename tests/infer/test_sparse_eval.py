"""ssd-eval's sparse-inference options on a real (tiny) SSD checkpoint: any k, k=N == dense,
dynamic top-k, the k sweep files and the Table-5 conversion gap."""
import json

import pytest

from ssd_megatron.errors import UserError
from ssd_megatron.infer import evaluate as ev
from ssd_megatron.train import loop as loop_mod

from ..train.conftest import one_thread, tiny_data  # noqa: F401  (fixture)
from ..train.test_loop import _cfg

SSD = {"method": "ssd", "train.max_steps": 8, "ssd.num_experts": 8, "ssd.top_k": 2, "ssd.monitor_interval": 2,
       "ssd.threshold": 0.0, "ssd.backend": "reference", "train.eval_interval": 8, "checkpoint.interval": 8}


@pytest.fixture(scope="module")
def ssd_run(tiny_data, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("ssd_eval") / "run"
    with one_thread():
        loop_mod.train(_cfg(tiny_data, run, **SSD))
    return run


def _json_last_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_top_k_n_equals_dense_and_small_k_differs(ssd_run, capsys):
    ev.main([str(ssd_run), "--device", "cpu"])
    dense = _json_last_line(capsys)
    ev.main([str(ssd_run), "--device", "cpu", "--top-k", "8"])
    full = _json_last_line(capsys)
    ev.main([str(ssd_run), "--device", "cpu", "--top-k", "1"])
    one = _json_last_line(capsys)
    assert full["loss"] == pytest.approx(dense["loss"], rel=1e-5)
    assert one["loss"] != pytest.approx(dense["loss"], rel=1e-5)
    assert one["flops_per_token"] < full["flops_per_token"] <= full["dense_flops_per_token"] * 1.01


def test_dynamic_topk_changes_the_result(ssd_run, capsys):
    ev.main([str(ssd_run), "--device", "cpu", "--top-k", "4"])
    fixed = _json_last_line(capsys)
    ev.main([str(ssd_run), "--device", "cpu", "--top-k", "4", "--dynamic-topk", "0.5"])
    dyn = _json_last_line(capsys)
    assert dyn["dynamic_drop_ratio"] == 0.5 and dyn["flops_per_token"] < fixed["flops_per_token"]
    assert dyn["loss"] != fixed["loss"]


def test_sweep_k_writes_table_plot_and_json(ssd_run, capsys):
    ev.main([str(ssd_run), "--device", "cpu", "--sweep-k", "--ks", "1,2,8", "--drop-ratios", "0.5", "--batches", "1"])
    res = _json_last_line(capsys)["sweep"]
    assert [p["k"] for p in res["points"]] == [1, 2, 8]
    assert res["points"][-1]["ppl"] == pytest.approx(res["dense"]["ppl"], rel=1e-5)
    flops = [p["flops_per_token"] for p in res["points"]]
    assert flops == sorted(flops)
    assert {d["k"] for d in res["dynamic"]} == {2, 8}
    report = ssd_run / "report"
    assert (report / "sweep_k.png").stat().st_size > 0 and (report / "sweep_k.md").read_text().count("|") > 10
    assert json.loads((report / "sweep_k.json").read_text())["points"] == res["points"]


def test_conversion_gap_reports_all_groupings(ssd_run, capsys):
    ev.main([str(ssd_run), "--device", "cpu", "--conversion-gap", "--batches", "1"])
    gap = _json_last_line(capsys)["conversion_gap"]
    assert set(gap) >= {"dense", "random", "cold", "ssd"}
    assert all(gap[g] > 0 for g in ("dense", "random", "cold", "ssd"))
    assert gap["warm_start_source"] == "last monitored clustering"


def test_bad_top_k_is_a_one_line_error(ssd_run):
    with pytest.raises(UserError, match=r"--top-k: 9 is out of range; accepted: 1..8"):
        ev.main([str(ssd_run), "--device", "cpu", "--top-k", "9"])
    with pytest.raises(UserError, match="--num-experts: 3 must divide"):
        ev.main([str(ssd_run), "--device", "cpu", "--top-k", "1", "--num-experts", "3"])
