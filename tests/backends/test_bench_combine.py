"""tools/bench_combine.py's combine kernel (the combines' floor, docs/kernels.md v36): the atomic adds of expert-ordered
rows into their tokens' rows and the plain stores into (t, k) rows, against torch, interpreted on CPU (fp32: the
interpreter has no bf16 atomics) or compiled on a GPU (fp32 and bf16)."""
import json
import os
import subprocess
import sys

import pytest

from .test_offline_compile import ROOT, _compile_env


def test_combine_kernel_matches_torch():
    pytest.importorskip("triton")
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_combine.py"), "--check"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_check_without_gpu_or_interpreter_names_the_variable():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --check compiles the kernel")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_combine.py"), "--check"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "TRITON_INTERPRET=1" in r.stderr, r.stderr[-3000:]


_SM90 = """
import json, sys
sys.path.insert(0, {tools!r})
import torch
import compile_report as CR
CR.offline(90)
import bench_combine as BC
out, tok = torch.zeros(64, 4096, dtype=torch.bfloat16), torch.zeros(256, dtype=torch.int32)
res = {{}}
for atomic in (True, False):
    CR.LAUNCHES.clear()
    BC.combine(out, tok, atomic=atomic)
    _, kernel, warps = CR.LAUNCHES[-1]
    res[str(atomic)] = [BC.atomic_ops(kernel), CR.report(kernel, warps)["atom"]]
CR.LAUNCHES.clear()
BC.combine(out, tok, sms=66)
_, kernel, warps = CR.LAUNCHES[-1]
res["sms"] = [BC.atomic_ops(kernel), CR.report(kernel, warps)["ctas_per_sm"]]
print(json.dumps(res))
"""


def test_adds_compile_to_dx_s_16_byte_bf16_reductions_for_sm90():
    """The floor is only dx's if its adds are dx's instruction: 16-byte bf16 reductions (REDG.ADD.BF16x8); and the
    persistent form times n SMs only if its registers leave room for one program per SM."""
    env = _compile_env()  # (skips with a GPU present: --check compiles and runs the kernel there)
    code = _SM90.format(tools=os.path.join(ROOT, "tools"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    ops, count = res["True"]  # 8 bf16 values per instruction: PTX's .v8.bf16 (Triton 3.9) or .v4.bf16x2
    assert count > 0 and ops and all(op.endswith((".v8.bf16", ".v4.bf16x2")) for op in ops), res
    assert res["False"] == [[], 0], res
    assert res["sms"][0] == ops and res["sms"][1] == 1, res  # the persistent form: one program per SM


def test_window_rows_take_every_row_once_tile_by_tile_in_the_window_schedule():
    """`window_rows`: the plan's sorted rows, each once, tile after tile in `token_window_tiles`' order (skewed loads,
    an empty expert, tiles cut at their expert's end)."""
    pytest.importorskip("triton")
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_combine as BC
    from ssd_megatron.ffn.backends.kernels.tile_order import token_window_tiles
    from ssd_megatron.ffn.backends.routing import make_plan

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 6, generator=g) + torch.tensor([1.0, 0.5, 0.2, 0.0, 0.0, -9.0])  # expert 5 empty
    plan = make_plan(scores.topk(3, dim=1).indices, 6)
    rows = BC.window_rows(plan, bm=8, group=2)
    assert torch.equal(rows.sort().values, torch.arange(plan.num_rows))
    want = [r for e, r0 in token_window_tiles(plan.offsets, plan.num_rows, 6, 8, 2).tolist() if r0 < plan.num_rows
            for r in range(r0, min(r0 + 8, int(plan.offsets[e + 1])))]
    assert rows.tolist() == want and want != list(range(plan.num_rows))  # (and not simply expert order)
