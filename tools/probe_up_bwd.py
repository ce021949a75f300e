"""Which part bounds the warp-specialised up_bwd (kernels/up_bwd_gluon.py, up_bwd variant 5): up_backward alone at the
base shape (16 384 tokens, D 768, 32 experts, K 6, E 192, ReLU, W2 as W_out's column view, the dx zeros written),
graphed, against kernels/up.py's default in the same process, with the kernel rebuilt with parts of its work
removed: the dx zeros, the epilogue (no h read, nothing stored), or the dy gathers (their barriers arrive at once);
and with its TMA stores (SSD_TRITON_UP_BWD_TMA_STORES=1). Before timing, the variants that keep every output are
checked against kernels/up.py's outputs (relative norms of dh, the gate gradient, gate * a and db1; the dx zeros).
The removed-part variants' results are wrong by design; only their times count (docs/kernels.md v27, v28). The
layer's A/B is tools/ab_layer.py's (`--arm auto= --arm "ptr=+SSD_TRITON_UP_BWD_TMA_STORES=0"`).

    python tools/probe_up_bwd.py [--config 128,64,64,3,4,5] [--rounds 2] [--out probe.json]   (Triton >= 3.9, sm_90)
"""
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from probe_mlp_ws import load_variant, probe_args, write_out  # noqa: E402

from ssd_megatron.ffn.backends.kernels import mlp_gluon, up_bwd_gluon  # noqa: E402

EPILOGUE = ("        h = h_tile.load(lay)", "        return dg\n")  # the epilogue's body, replaced by "no-epilogue"
GATHERS = ("async_copy.async_load(x_bufs.index(s), xrow + (k + cols)[None, :], mask=rmask[:, None])", "pass")
NO_FILL = ("HAS_FILL=fill is not None", "HAS_FILL=False")
# name -> (mlp_gluon's substitutions (its dy gathers), up_bwd_gluon's, SSD_TRITON_UP_BWD_TMA_STORES)
PROBES = {"whole": ([], [], "0"), "tma-stores": ([], [], "1"), "no-fill": ([], [NO_FILL], "0"),
          "no-epilogue": ([], [EPILOGUE], "0"), "no-gathers": ([GATHERS], [], "0")}
CHECKED = ("whole", "tma-stores")  # the variants that keep every output


def substitutions(subs, src: str):
    """`subs` with the EPILOGUE marker spelled out against up_bwd_gluon's source `src`: the body from its first line
    to its return, replaced by the gate gradient's partials from the accumulator alone."""
    out = []
    for sub in subs:
        if sub is EPILOGUE:
            start = src.index(EPILOGUE[0])
            sub = (src[start:src.index(EPILOGUE[1], start) + len(EPILOGUE[1])],
                   "        return gl.sum(acc, 1)\n")
        out.append(sub)
    return out


def main() -> int:
    import triton

    from ssd_megatron.ffn.backends.kernels import tile_configs as tc, up_launch
    from ssd_megatron.ffn.backends.routing import make_plan

    args, cfg = probe_args(__doc__, "up_bwd", "128,64,64,3,4,5")
    dev = torch.device("cuda")
    T, D, N, top_k, E = 16384, 768, 32, 6, 192
    g = torch.Generator(device=dev).manual_seed(0)
    plan = make_plan(torch.rand(T, N, device=dev, generator=g).topk(top_k, dim=1).indices, N)
    dy = torch.randn(T, D, device=dev, dtype=torch.bfloat16, generator=g)
    w2 = torch.randn(D, N * E, device=dev, dtype=torch.bfloat16, generator=g).view(D, N, E).permute(1, 2, 0)
    h = torch.randn(T * top_k, E, device=dev, dtype=torch.bfloat16, generator=g)
    gate = torch.rand(T * top_k, device=dev, generator=g)
    fill = (torch.empty(T, D, device=dev, dtype=torch.bfloat16), None)

    def call():
        return up_launch.up_backward(dy, w2, h, gate, plan, "relu", True, True, fill=fill, partials=True)

    real = (mlp_gluon._build_once(), up_bwd_gluon._build_once(), up_bwd_gluon.launch)
    variants = {}
    for name, (msubs, usubs, stores) in PROBES.items():
        mlp_gluon._STATE["build"] = load_variant(mlp_gluon, msubs, name)._build()  # (the up_bwd build takes its parts)
        mod = load_variant(up_bwd_gluon, substitutions(usubs, open(up_bwd_gluon.__file__).read()), name)
        variants[name] = (mlp_gluon._STATE["build"], mod._build(), mod.launch, stores)

    def arm(name):
        """Force the WS up_bwd with variant `name`'s kernels (None: kernels/up.py's default tile, forced, as `auto`
        would take the WS kernel at this shape)."""
        mlp_build, build, launch, stores = real + ("0",) if name is None else variants[name]
        mlp_gluon._STATE["build"], up_bwd_gluon._STATE["build"], up_bwd_gluon.launch = mlp_build, build, launch
        sys.modules[launch.__module__]._STATE["build"] = build
        os.environ["SSD_TRITON_UP_BWD_TMA_STORES"] = stores
        tc.force_config(up_bwd=tc.default_tile("up_bwd", (D, E, str(dy.dtype))) if name is None else cfg)

    def timed(reps=10):
        """Median µs per call over graph replays of `reps` calls (after an eager call, which loads the modules)."""
        call()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            call()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                call()
        times = []
        for i in range(18):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            if i >= 3:
                times.append(a.elapsed_time(b) * 1000 / reps)
        return sorted(times)[len(times) // 2]

    res = {"gpu": torch.cuda.get_device_name(0), "date": str(datetime.date.today()), "torch": torch.__version__,
           "triton": triton.__version__, "config": list(cfg), "checks": {}, "rounds": [],
           "what": "up_backward alone, base ReLU, graphed, us per call; the WS up_bwd with parts removed"}
    try:
        arm(None)
        want = [t.float() for t in call()]
        want[1] = want[1].sum(0)
        for name in CHECKED:
            arm(name)
            fill[0].fill_(1.0)
            got = [t.float() for t in call()]
            got[1] = got[1].sum(0)
            errs = [((x - y).norm() / y.norm().clamp_min(1e-9)).item() for x, y in zip(got, want)]
            res["checks"][name] = {"dh, dgate, ga, db1 (relative)": errs, "dx zeroed": bool((fill[0] == 0).all())}
            print(f"check {name:12s} {res['checks'][name]}", flush=True)
        for _ in range(args.rounds):
            row = {}
            for name in (None, *PROBES):
                arm(name)
                row[name or "kernels/up.py"] = timed()
            res["rounds"].append(row)
            print("  ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    finally:
        arm(None)
        os.environ.pop("SSD_TRITON_UP_BWD_TMA_STORES", None)
    write_out(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
