"""The `triton` backend with its *default* tile configurations, interpreted on CPU (TRITON_INTERPRET=1, fp32)
at a shape with the issue's layer widths, against the float64 reference: forward and every gradient,
the output bias included. The CI tests force 16-wide tiles so that tiny shapes span many tiles; this
checks the tiles a GPU run will actually use (e.g. E = 192 in a 256-wide tile, the split wgrad's 2048-row
chunks, TMA down at base, ROWLOOP down and token-window order at 8B) before a device call is spent on them.

    TRITON_INTERPRET=1 python tools/check_default_tiles.py [--shapes base,8b] [--tokens 200]

About 100 s per (activation, option set) at base with 200 tokens; 8B is slower (use few tokens).
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "backends"))

from backend_cases import compare, make_inputs, run, upcast  # noqa: E402

from ssd_megatron.bench.ffn import SHAPES  # noqa: E402
from ssd_megatron.ffn.backends import ReferenceBackend  # noqa: E402
from ssd_megatron.ffn.backends.triton_backend import TritonBackend  # noqa: E402

OPTIONS = {"default": {}, "fused_forward": {"fused_forward": True}}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("error: run with TRITON_INTERPRET=1 (this checks the kernels under Triton's interpreter)")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="base")
    ap.add_argument("--activations", default="relu,swiglu")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--options", default=",".join(OPTIONS), help=f"comma list of {', '.join(OPTIONS)}")
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    failed = 0
    for shape in args.shapes.split(","):
        D, d_ff, N, K = SHAPES[shape]
        for act in args.activations.split(","):
            for name in args.options.split(","):
                inp = make_inputs(dtype=torch.float32, T=args.tokens, D=D, E=d_ff // N, N=N, K=K, activation=act)
                t0 = time.time()
                try:
                    errs = compare(run(TritonBackend(**OPTIONS[name]), inp), run(ReferenceBackend(), upcast(inp)),
                                   args.tol)
                    print(f"{shape} {act} {name}: ok in {time.time() - t0:.0f} s, max error "
                          f"{max(errs.values()):.1e}", flush=True)
                except Exception as exc:  # reported, then the exit code is 1
                    failed += 1
                    print(f"{shape} {act} {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
