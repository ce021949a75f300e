"""Micro-benchmark of the sparse layer's small reductions (docs/kernels.md v25), torch's ops against our kernel
(kernels/column_sums.py): the output bias's gradient dy.sum(0) and the router's centroids, each expert's mean over
its gate rows of W1. Each timing is one CUDA graph of 8 calls over rotating inputs, replayed
100 times (`bench.ffn.time_calls`): the median in µs per call. --sweep also times other tiles of our kernels (their
module constants), to choose the defaults. (Session 31 also timed a kernel for the router's centroid gradient here,
and removed it: docs/kernels.md v25.)

    python tools/bench_reductions.py [--shapes base,8b] [--sweep] [--out reductions.json]
"""
import argparse
import datetime
import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd_megatron.bench.ffn import time_calls  # noqa: E402
from ssd_megatron.ffn.backends.kernels import column_sums as CS  # noqa: E402

SHAPES = {"base": (16384, 768, 32, 6, 192), "8b": (16384, 4096, 64, 16, 256)}  # T, D, N, K, E
SETS, REPLAYS = 8, 100
# (BR_MAX, BC, WARPS) of kernels/column_sums.py
SUM_TILES = [(256, 128, 8), (128, 128, 4), (256, 64, 4), (128, 256, 8), (64, 256, 4), (512, 64, 8)]


def graphed_us(fn) -> float:
    """µs per call of fn(i), i over SETS input sets, from CUDA-graph replays."""
    for i in range(SETS):
        fn(i)
    torch.cuda.synchronize()
    g, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(side), torch.cuda.graph(g):
        for i in range(SETS):
            fn(i)
    return time_calls(lambda _: g.replay(), REPLAYS, 3)["median"] * 1000 / SETS  # CUDA events, ms per replay


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
    out = []
    for name, fn in cases.items():
        us = graphed_us(fn)
        print(f"{shape:5s} {name:60s} {us:7.2f} us", flush=True)
        out.append({"shape": shape, "name": name, "us": us})
    return out


def main() -> int:
    import triton
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="base,8b")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    records = [r for s in args.shapes.split(",") for r in bench_shape(s, args.sweep)]
    if args.out:
        res = {"gpu": torch.cuda.get_device_name(0), "date": str(datetime.date.today()), "torch": torch.__version__,
               "triton": triton.__version__, "records": records}
        pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
