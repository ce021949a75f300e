"""`ssd-bench plot` and the figure `ssd-bench ffn --out` writes: drawn from committed GPU results, with the graphed
ratios preferred to the eager ones, and one-line errors for files that are not `ssd-bench ffn` results."""
import json
from pathlib import Path

import pytest

from ssd_megatron.bench import main as bench_main
from ssd_megatron.bench.ffn_plot import _groups, _plotted, png_path, speedup
from ssd_megatron.errors import UserError

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# every backend eager and graphed (session 1); the triton rows with both dense baselines (session 47)
COMMITTED = ("ffn_h100_2026-11-23.json", "ffn_h100_2026-12-07_s47_rows_before_key_fix.json")


def test_speedup_takes_the_graphed_ratios_where_the_record_has_them():
    rec = {"speedup_fwd_bwd": 2.0, "speedup_fwd_bwd_graph": 2.5, "speedup_fwd_bwd_vs_fused_dense": 1.5,
           "speedup_fwd_bwd_graph_vs_fused_dense": 1.8, "speedup_fwd": 3.0, "speedup_fwd_graph": None,
           "speedup_fwd_vs_fused_dense": 2.2}
    assert speedup(rec, "fwd_bwd") == (2.5, True, 1.8)
    assert speedup(rec, "fwd") == (3.0, False, 2.2)  # no graph (a path that syncs): the eager ratios
    assert speedup({}, "fwd") == (None, False, None)


@pytest.mark.parametrize("name", COMMITTED)
def test_plot_of_a_committed_result(name, tmp_path):
    src = RESULTS / name
    result = json.loads(src.read_text())
    groups, backends = _groups(_plotted(result["records"]))
    # the run's (shape, activation) groups and backends, realistic routing only, in the run's order
    want = [(r["shape"], r["activation"]) for r in result["records"] if r["routing"] == "realistic"]
    assert groups == list(dict.fromkeys(want)) and "triton" in backends
    assert bench_main(["plot", str(src), "--out-dir", str(tmp_path)]) == 0
    png = tmp_path / png_path(name)
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > height > 300  # two panels side by side


def test_plotted_records_are_the_realistic_ones_else_all():
    real, uni = {"routing": "realistic", "shape": "base"}, {"routing": "uniform", "shape": "8b"}
    assert _plotted([real, uni]) == [real] and _plotted([uni]) == [uni]


def test_plot_refuses_what_is_not_an_ffn_result(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(UserError, match="missing.json: no such file"):
        bench_main(["plot", str(missing)])
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"records": [')
    with pytest.raises(UserError, match="corrupt.json: not a JSON file"):
        bench_main(["plot", str(corrupt)])
    other = tmp_path / "ab.json"  # e.g. tools/ab_layer.py's output: rounds, no records
    other.write_text(json.dumps({"gpu": "x", "rounds": []}))
    with pytest.raises(UserError, match="ab.json: not an `ssd-bench ffn` result"):
        bench_main(["plot", str(other)])
