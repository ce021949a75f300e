"""Micro-benchmark of the sparse layer's small reductions (docs/kernels.md v25), torch's ops against our kernels:
the output bias's gradient dy.sum(0) (kernels/column_sums.py), the router's centroids, each expert's mean over its
gate rows of W1 (the same kernel), and the router's centroid gradient dSᵀ x / E (kernels/centroid_grad.py; torch: a
zero fill, a scatter, a GEMM and a division). Each timing is one CUDA graph of 8 calls over rotating inputs, replayed
100 times (`bench.ffn.time_calls`): the median in µs per call. --sweep also times other tiles of our kernels (their
module constants), to choose the defaults.

    python tools/bench_reductions.py [--shapes base,8b] [--sweep] [--out reductions.json]
"""
import argparse
import contextlib
import datetime
import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd_megatron.bench.ffn import time_calls  # noqa: E402
from ssd_megatron.ffn.backends.kernels import centroid_grad as CG, column_sums as CS  # noqa: E402

SHAPES = {"base": (16384, 768, 32, 6, 192), "8b": (16384, 4096, 64, 16, 256)}  # T, D, N, K, E
SETS, REPLAYS = 8, 100
# (BR_MAX, BC, WARPS) of kernels/column_sums.py; (PROGRAMS, BT, BC, WARPS, STAGES) of kernels/centroid_grad.py
SUM_TILES = [(256, 128, 8), (128, 128, 4), (256, 64, 4), (128, 256, 8), (64, 256, 4), (512, 64, 8)]
GRAD_TILES = [(264, 64, 128, 4, 3), (528, 64, 128, 4, 3), (264, 128, 128, 8, 3), (528, 32, 128, 4, 4),
              (264, 64, 256, 8, 3), (1056, 64, 64, 4, 3), (132, 64, 128, 4, 4)]


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


@contextlib.contextmanager
def constants(module, **values):
    old = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def torch_centroid_grad(dgate, x, idx, N, E):
    T, K = idx.shape
    ds = x.new_zeros(T, N).scatter_(1, idx, dgate.view(T, K).to(x.dtype))
    return (ds.t() @ x).float() / E


def bench_shape(shape: str, sweep: bool) -> list:
    T, D, N, K, E = SHAPES[shape]
    dev = torch.device("cuda")
    dys = [torch.randn(T, D, device=dev, dtype=torch.bfloat16) for _ in range(SETS)]
    ws = [torch.randn(N, E, D, device=dev, dtype=torch.bfloat16) for _ in range(SETS)]
    idxs = [torch.rand(T, N, device=dev).topk(K, dim=1).indices for _ in range(SETS)]
    dgs = [torch.randn(T * K, device=dev) for _ in range(SETS)]
    cases = {"bias grad: torch dy.sum(0)": lambda i: dys[i].sum(0),
             "centroids: torch mean": lambda i: ws[i].mean(1).to(torch.bfloat16),
             "centroid grad: torch": lambda i: torch_centroid_grad(dgs[i], dys[i], idxs[i], N, E)}
    for tiles in (SUM_TILES if sweep else SUM_TILES[:1]):
        tag = "" if tiles == SUM_TILES[0] else f" {tiles}"
        cases[f"bias grad: column_sums{tag}"] = lambda i, t=tiles: _with(CS, t, lambda: CS.column_sums(
            dys[i], torch.bfloat16))
        cases[f"centroids: segment_means{tag}"] = lambda i, t=tiles: _with(CS, t, lambda: CS.segment_means(
            ws[i], E, torch.bfloat16))
    for tiles in (GRAD_TILES if sweep else GRAD_TILES[:1]):
        tag = "" if tiles == GRAD_TILES[0] else f" {tiles}"
        cases[f"centroid grad: kernel{tag}"] = lambda i, t=tiles: _with(CG, t, lambda: CG.centroid_grad(
            dgs[i], dys[i], idxs[i], N, E))
    out = []
    for name, fn in cases.items():
        us = graphed_us(fn)
        print(f"{shape:5s} {name:60s} {us:7.2f} us", flush=True)
        out.append({"shape": shape, "name": name, "us": us})
    return out


def _with(module, tiles, fn):
    names = ("BR_MAX", "BC", "WARPS") if module is CS else ("PROGRAMS", "BT", "BC", "WARPS", "STAGES")
    with constants(module, **dict(zip(names, tiles))):
        return fn()


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
