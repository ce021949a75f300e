"""tools/bench_combine.py's combine kernel (the combines' floor, docs/kernels.md v36): the atomic adds of expert-ordered
rows into their tokens' rows and the plain stores into (t, k) rows, against torch, interpreted on CPU (fp32: the
interpreter has no bf16 atomics) or compiled on a GPU (fp32 and bf16)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
