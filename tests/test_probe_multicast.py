"""tools/probe_multicast.py's two Gluon forms compile for sm_90 on this machine (no GPU): one CTA per tile without
multicast, and 2-CTA clusters whose weight loads are multicast TMA copies. The GPU run (its correctness check against
torch.bmm and its timings) is in benchmarks/results/probe_multicast_h100_*.json."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_probe_compiles_both_forms_for_sm90():
    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends.kernels import down_gluon
    if down_gluon._build_once() is None:
        pytest.skip("this triton has no Gluon with multi-CTA layouts (needs >= 3.9)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "probe_multicast.py"), "--offline"], env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("OFFLINE ")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-3000:]
    res = json.loads(lines[-1][len("OFFLINE "):])
    for name, r in res.items():
        assert r["mma"] == "64x256x16" and r["stack"] == 0 and r["utmaldg"] > 0 and r["ldgsts"] == 0, (name, r)
        assert r["smem_kb"] <= 227, (name, r)
    assert res["cta1"]["multicast"] == 0 and res["cta2"]["multicast"] > 0, res
