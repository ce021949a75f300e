"""Micro-benchmark of the sparse forward's routing on its own (docs/kernels.md v24): SSD's router (scores and top-K,
ffn/centroid_router.py), y's initialisation as a fill launch, and the routing plan (kernels/routing_plan.py) with its
placements: the output's fill in each of its places (`FILL_PLACES`), the Gluon kernels' tile table from the scatter
kernel or not written; and the router's launch at each of `ROUTER_TILES` (docs/kernels.md v46: at 8B it reads x at ≈ 55%
of the DRAM bandwidth), with the share of rows whose ids equal the default tile's. Each timing is one CUDA graph of 8
launches over rotating inputs (x 25 MB at base: the reads come from DRAM, as in the layer), replayed 100 times
(`bench.timing.time_calls`); the median, in µs per launch. What the layer gains is `tools/ab_layer.py`'s to say: these
parts overlap nothing, but a few µs are within the layer's spread.

    python tools/bench_routing.py [--shapes base,8b] [--out routing.json]
"""
import argparse
import datetime
import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd_megatron.bench.timing import time_calls  # noqa: E402
from ssd_megatron.ffn import centroid_router as CR  # noqa: E402
from ssd_megatron.ffn.backends.kernels.routing_plan import FILL_PLACES, routing_plan  # noqa: E402

SHAPES = {"base": (16384, 768, 32, 6, 192), "8b": (16384, 4096, 64, 16, 256)}  # T, D, N, K, E
SETS, REPLAYS = 8, 100
# The router's tile candidates (rows per program, D per step, warps, stages); the first is the default at N <= 64
# but for 2-byte rows of D >= 2048, which take (64, 128, 8, 3) since v47 (`centroid_router.default_tile`).
# At 8B the first keeps ≈ 32 kB of x in flight per SM (256 programs, ≈ 2 per SM, 2 steps of 8 kB ahead); the others
# double that by depth, by more programs or by wider steps. Offline sm_90 compile (Triton 3.9): none spills and
# each fits its programs per SM (8B: 122, 122, 122, 64, 64, 61, 114 registers); (32, 128, 4, 3) spilled, (64, 256)
# fits one program per SM.
ROUTER_TILES = [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 5), (32, 64, 4, 3), (32, 64, 4, 5), (64, 128, 8, 3),
                (128, 64, 8, 4)]


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


def bench_shape(shape: str) -> list:
    T, D, N, K, E = SHAPES[shape]
    dev = torch.device("cuda")
    xs = [torch.randn(T, D, device=dev, dtype=torch.bfloat16) for _ in range(SETS)]
    c = CR.expert_centroids(torch.randn(N, E, D, device=dev, dtype=torch.bfloat16) * 0.05, E, torch.bfloat16)
    ys = [torch.empty(T, D, device=dev, dtype=torch.bfloat16) for _ in range(SETS)]
    flats = [CR.centroid_topk(x, c, K)[1].reshape(-1) for x in xs]
    cases = {"router (scores and top-K)": lambda i: CR.centroid_topk(xs[i], c, K),
             "y fill launch": lambda i: ys[i].zero_(),
             "plan, no fill, no table": lambda i: routing_plan(flats[i], N, K, tile_table=False)}
    for place in FILL_PLACES:
        for table in (False, True):
            name = f"plan, fill: {place}, {'with' if table else 'no'} table"
            cases[name] = (lambda i, place=place, table=table:
                           routing_plan(flats[i], N, K, fill=(ys[i], None), tile_table=table, fill_in=place))
    cases["router + plan (defaults)"] = lambda i: routing_plan(CR.centroid_topk(xs[i], c, K)[1].reshape(-1), N, K,
                                                               fill=(ys[i], None))
    records = time_cases(shape, cases)
    want = CR._topk_launch(xs[0], c, K)[1]
    for tile in ROUTER_TILES:
        # another D step sums in another order: a near-tie may pick another id, so the share of rows with the
        # default's ids is recorded rather than required
        same = float((CR._topk_launch(xs[0], c, K, tile)[1] == want).all(1).float().mean())
        rec = time_cases(shape, {"router tile {} x {}, {} warps, {} stages".format(*tile):
                                 lambda i, tile=tile: CR._topk_launch(xs[i], c, K, tile)})[0]
        records.append(dict(rec, tile=list(tile), same_ids=same))
    return records


def time_cases(shape: str, cases: dict) -> list:
    """Records {shape, name, us} of each named fn(i) of `cases` (`graphed_us`), printed as they come."""
    out = []
    for name, fn in cases.items():
        us = graphed_us(fn)
        print(f"{shape:5s} {name:60s} {us:7.2f} us", flush=True)
        out.append({"shape": shape, "name": name, "us": us})
    return out


def run(tool: str, bench_shape, args) -> int:
    """Time `bench_shape(shape)` for each of args.shapes (SHAPES' names) and write the records, with the GPU, date
    and versions, to args.out if given."""
    import triton

    if not torch.cuda.is_available():
        sys.exit(f"error: {tool} times CUDA kernels; no GPU is visible")
    res = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "triton": triton.__version__, "records": []}
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            sys.exit(f"error: --shapes: {shape!r}; accepted: {', '.join(SHAPES)}")
        res["records"] += bench_shape(shape)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="base,8b")
    ap.add_argument("--out", default="")
    return run("tools/bench_routing.py", bench_shape, ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
