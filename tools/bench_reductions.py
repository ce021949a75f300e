"""Micro-benchmark of the sparse layer's small reductions (docs/kernels.md v25), torch's ops against our kernel
(kernels/column_sums.py): the output bias's gradient dy.sum(0) and the router's centroids, each expert's mean over
its gate rows of W1. Each timing is one CUDA graph of 8 calls over rotating inputs, replayed
100 times (`bench.timing.time_calls`): the median in µs per call. --sweep also times other tiles of our kernels (their
module constants), to choose the defaults. (Session 31 also timed a kernel for the router's centroid gradient here,
and removed it: docs/kernels.md v25.)

    python tools/bench_reductions.py [--shapes base,8b] [--sweep] [--out reductions.json]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_routing import SETS, SHAPES, run, time_cases  # noqa: E402
from ssd_megatron.ffn.backends.kernels import column_sums as CS  # noqa: E402

# (BR_MAX, BC, WARPS) of kernels/column_sums.py
SUM_TILES = [(256, 128, 8), (128, 128, 4), (256, 64, 4), (128, 256, 8), (64, 256, 4), (512, 64, 8)]


def with_tiles(tiles, fn):
    """fn() with kernels/column_sums.py's (BR_MAX, BC, WARPS) set to `tiles`."""
    names = ("BR_MAX", "BC", "WARPS")
    old = [getattr(CS, k) for k in names]
    for k, v in zip(names, tiles):
        setattr(CS, k, v)
    try:
        return fn()
    finally:
        for k, v in zip(names, old):
            setattr(CS, k, v)


def bench_shape(shape: str, sweep: bool) -> list:
    T, D, N, _, E = SHAPES[shape]
    dev = torch.device("cuda")
    dys = [torch.randn(T, D, device=dev, dtype=torch.bfloat16) for _ in range(SETS)]
    ws = [torch.randn(N, E, D, device=dev, dtype=torch.bfloat16) for _ in range(SETS)]
    cases = {"bias grad: torch dy.sum(0)": lambda i: dys[i].sum(0),
             "centroids: torch mean": lambda i: ws[i].mean(1).to(torch.bfloat16)}
    for tiles in (SUM_TILES if sweep else SUM_TILES[:1]):
        tag = "" if tiles == SUM_TILES[0] else f" {tiles}"
        cases[f"bias grad: column_sums{tag}"] = lambda i, t=tiles: with_tiles(t, lambda: CS.column_sums(
            dys[i], torch.bfloat16))
        cases[f"centroids: segment_means{tag}"] = lambda i, t=tiles: with_tiles(t, lambda: CS.segment_means(
            ws[i], E, torch.bfloat16))
    return time_cases(shape, cases)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="base,8b")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    return run("tools/bench_reductions.py", lambda shape: bench_shape(shape, args.sweep), args)


if __name__ == "__main__":
    sys.exit(main())
