"""tools/launch_clocks.py: the probe kernel compiles for sm_90 with both clock reads inside its spin loop (offline,
on this machine without a GPU), the per-launch arithmetic from probe slots, and on a GPU the tool itself at base."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from .test_offline_compile import ROOT, _compile_env

TOOL = os.path.join(ROOT, "tools", "launch_clocks.py")


def _tool():
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("launch_clocks", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


COMPILE = """
import sys, importlib.util
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location("launch_clocks", sys.argv[1])
lc = importlib.util.module_from_spec(spec); spec.loader.exec_module(lc)
src = ASTSource(fn=lc.probe_kernel, signature={"out": "*i64", "slot": "i32", "SPIN_NS": "constexpr"},
                constexprs={"SPIN_NS": 4000})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1}).asm["ptx"]
loop = ptx[ptx.index("$L__BB0_1:"):ptx.index("bra")]
print(ptx.count("%globaltimer"), ptx.count("%clock64"), loop.count("%globaltimer"), loop.count("%clock64"),
      "setp.lt.s64" in loop and "4000" in loop)
"""


def test_probe_compiles_for_sm90_with_both_clocks_in_its_spin():
    env = _compile_env()
    out = subprocess.run([sys.executable, "-c", COMPILE, TOOL], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # two reads of each (before the loop and in it); the loop re-reads both and compares against SPIN_NS
    assert out.stdout.split()[-5:] == ["2", "2", "1", "1", "True"], out.stdout


def test_launch_rows_durations_and_clocks():
    lc = _tool()
    names = ["(start)", "up", "down"]
    # slots (t0, t1, c0, c1): probes of 4000 ns; 'up' ran from 4000 to 104000 ns, 'down' 108000 -> 158000
    call1 = [(0, 4000, 0, 6000), (104000, 108000, 50000, 56600), (158000, 162000, 0, 7200)]
    call2 = [(0, 4000, 0, 6000), (124000, 128000, 0, 6400), (178000, 182000, 0, 7000)]
    rows = lc.launch_rows(names, [call1, call2])
    assert [r["launch"] for r in rows] == ["up", "down"]
    assert rows[0]["us"] == pytest.approx(110.0) and (rows[0]["us_min"], rows[0]["us_max"]) == (100.0, 120.0)
    assert rows[1]["us"] == pytest.approx(50.0)
    # 6600 and 6400 cycles in 4000 ns: 1650 and 1600 MHz; 7200 and 7000: 1800 and 1750
    assert rows[0]["mhz"] == pytest.approx(1625.0) and rows[1]["mhz"] == pytest.approx(1775.0)
    table = lc.report(rows).splitlines()
    assert table[1].split()[:3] == ["1", "up", "110.0"] and table[-1].split()[:5] == ["sum", "of", "medians",
                                                                                         "160.0", "1672"]


def test_bad_options_fail_before_the_gpu_check():
    """--options takes one `--triton-variants` entry; a wrong key or value is a one-line error naming it, on any
    machine (it is parsed before the GPU is looked for)."""
    out = subprocess.run([sys.executable, TOOL, "--options", "w2_view=rows"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert out.returncode != 0 and "w2_view='rows'; accepted: fallback, copy, tma" in out.stderr, out.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reads clocks on a GPU")
def test_launch_clocks_at_base_on_gpu(tmp_path):
    out = tmp_path / "clocks.json"
    args = ["--shape", "base", "--calls", "3", "--rotation", "1", "--out", str(out)]  # the bench's second layer
    r = subprocess.run([sys.executable, TOOL, *args],
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["launches"]
    assert res["rotation"] == 1
    assert len(rows) >= 5 and all(row["us"] > 0 for row in rows)
    # a physical SM clock (an H100's base and boost clocks are 1.1-2.0 GHz), not a unit slip
    assert all(200 < row["mhz"] < 3000 for row in rows), rows
    assert any("down" in row["launch"] for row in rows) and any("wgrad" in row["launch"] for row in rows)
