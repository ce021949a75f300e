"""Per-kernel timings of the `triton` expert backend at the issue's shapes: each of its six launches of
one FFN layer's forward + backward (up, down, up_bwd, wgrad dW2, wgrad dW1, down for dx; and the last two
with SSD's router gradient folded in, as the sparse phase runs them: `*_fold`, and dW1 with the "rows"
fold: `wgrad_dw1_foldrows`; the weight gradients written in fp32 for master weights: `wgrad_*_f32`; down for dx
with plain stores into (t, k) rows and a sum over k instead of atomic adds: `down_dx_buffer`; the pairs
up + down and up_bwd + down for dx with the output's initialisation by a fill launch or inside the up kernel:
`fwd_pair[_fold]`, `bwd_pair[_fold]`, swept over the down configs; the fused forward `fwd_fused` and the
fill of y alone, `fill`), timed alone
with triton.testing.do_bench (median, CUDA events) for a list of tile configurations, each checked
against the default configuration's output. This is where kernel variants are compared before one
becomes a default (docs/kernels.md); `ssd-bench ffn` times the whole layer.

    python tools/bench_kernels.py [--shapes base,8b] [--activations relu,swiglu] [--launches a,b] [--out F.json]
        [--configs "down=64,64,64,4,2,4|128,64,64,8,3,4;wgrad=256,128,64,8,3"]   # instead of VARIANTS' lists
    ncu --profile-from-start off ... python tools/bench_kernels.py --once   # each default launch once

Inputs: bench.ffn's layer (clustered weights, realistic routing), bf16, 16 384 tokens. The same
buffers are reused across repetitions, so x (25 MB at base) is served from L2 as it is inside the
layer, where the up kernel has just read it.
"""
import argparse
import datetime as dt
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd_megatron.bench.ffn import Layer  # noqa: E402
from ssd_megatron.ffn.backends.kernels import tile_configs as tc  # noqa: E402
from ssd_megatron.ffn.backends.kernels.down_launch import atomic_output, default_combine, down_scatter  # noqa: E402
from ssd_megatron.ffn.backends.kernels.mlp_launch import mlp_forward  # noqa: E402
from ssd_megatron.ffn.backends.kernels.up_launch import up_backward, up_forward  # noqa: E402
from ssd_megatron.ffn.backends.kernels.wgrad_launch import wgrad  # noqa: E402
from ssd_megatron.ffn.backends.routing import initialise, make_plan  # noqa: E402

# kernel -> the tile configurations timed besides the default (BM|BP, BN|BQ, BK, warps, stages[, variant]);
# variant: down 1 = one program loops over all output columns (ROWLOOP), 3 = TMA descriptors, 4 = STAGED
# (ROWLOOP from A rows loaded once, kernels/down.py; BK unused); wgrad n = each
# expert's reduction split into chunks of n rows (fp32 atomic sums). Session 14's H200 sweep of these is
# benchmarks/results/kernels_h200_2026-12-04_s14.json (docs/kernels.md v8).
VARIANTS = {
    "up": [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (256, 128, 64, 8, 3)],
    "up_glu": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4)],
    # a BN >= E (256 at base and 8B): all of E per program (192 = 128 + 64; up_launch.up_columns)
    # (whole-E with BM 128 spills on sm_90: 192 B per thread at base, 1.3 kB at 8B; 16 warps, 128 B and 700 B);
    # variant 1: two passes, the GEMM alone on wide tiles, then the epilogue (kernels/up.py)
    "up_bwd": [(64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (64, 256, 64, 8, 3), (64, 256, 64, 8, 4),
               (128, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 1)],
    "up_bwd_glu": [(64, 64, 64, 4, 4),  # the one-pass default before v14
                   (128, 64, 64, 4, 4), (128, 32, 64, 4, 4), (64, 128, 64, 8, 3), (64, 256, 64, 8, 3),
                   (128, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 1)],
    "down": [(128, 128, 64, 4, 3, 1), (128, 256, 64, 8, 3, 1), (64, 128, 64, 4, 3, 1), (128, 128, 64, 8, 3),
             (128, 128, 64, 8, 3, 3), (128, 128, 64, 4, 3, 3), (128, 256, 64, 8, 3, 3), (64, 128, 64, 4, 3, 3),
             (128, 128, 64, 8, 2, 4), (128, 64, 64, 8, 3, 4), (64, 64, 64, 4, 2, 4), (64, 32, 64, 4, 3, 4)],
    "wgrad": [(64, 128, 128, 4, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3),
              (64, 128, 128, 4, 3, 1024), (64, 128, 64, 4, 4, 1024), (128, 128, 64, 8, 3, 2048),
              # whole-P programs (BP >= P; kernels/wgrad.py): each gathered row tile read once per column block
              (256, 128, 64, 8, 3), (256, 128, 64, 8, 2), (256, 128, 64, 16, 3), (256, 128, 64, 8, 3, 2048),
              (256, 64, 64, 8, 3, 1024)],
    "mlp": [(64, 64, 64, 4, 2), (128, 128, 64, 8, 2), (128, 64, 64, 8, 2), (128, 32, 64, 8, 3)],  # 1st: 2 CTAs/SM
    "mlp_glu": [(64, 32, 64, 8, 3), (64, 64, 64, 8, 2)],  # (the other GLU tiles tried spill on sm_90)
}


def setup(shape, activation, tokens, device="cuda"):
    """(expert-load skew, {label: (config kind, GEMM FLOPs, launch)}) for one layer's launches."""
    dev = torch.device(device)
    layer = Layer(shape, activation, dev, torch.bfloat16, seed=0)
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(tokens, layer.D, generator=g, device=dev).to(torch.bfloat16)
    dy = torch.randn(tokens, layer.D, generator=g, device=dev).to(torch.bfloat16)
    with torch.no_grad():
        w1, b1, w2 = (t.detach() if t is not None else None for t in layer.expert_weights())
        idx, gate = layer.route(x, w1, layer.K)
    plan = make_plan(idx, layer.N)
    gate_flat = gate.detach().reshape(-1).contiguous()
    a, h = up_forward(x, w1, b1, plan, activation, save_h=True)
    dh, dgate, ga, _ = up_backward(dy, w2, h, gate_flat, plan, activation, need_ga=True, need_db=True)
    combine = default_combine(x)  # as the backend's (bf16 adds in place; fp32 ones before Hopper)
    w1m, w2m = w1.float(), w2.float()  # master weights (same strides): fp32 weight gradients
    centroids = w1[:, : layer.E].mean(1)  # SSD's router, folded into dx and dW1 (triton_backend.py)
    dc = torch.randn(layer.N, layer.D, generator=g, device=dev) / layer.E  # the epilogue fold's [N, D] term
    b2 = layer.b_out.detach()

    def fwd_pair(fold):  # up + down; fold: y initialised to b2 by the up kernel, else zeroed by down and b2 added
        y0 = atomic_output(x, plan.num_tokens, plan.top_k, layer.D, combine) if fold else None
        a_, _ = up_forward(x, w1, b1, plan, activation, save_h=True, fill=None if y0 is None else (y0, b2))
        y = down_scatter(a_, w2, plan, gate_flat, combine, out=y0, out_bias=b2 if fold else None)
        return y if fold else y + b2

    def bwd_pair(fold):  # up_bwd + down for dx; fold: dx zeroed by the up_bwd kernel, else by down
        dx0 = atomic_output(x, plan.num_tokens, plan.top_k, layer.D, combine) if fold else None
        dh_ = up_backward(dy, w2, h, gate_flat, plan, activation, True, True,
                          fill=None if dx0 is None else (dx0, None))[0]
        return down_scatter(dh_, w1, plan, None, combine, out=dx0)

    counts = torch.bincount(idx.reshape(-1), minlength=layer.N).float()
    skew = (counts.max() / counts.mean()).item()
    f_in, f_out = 2.0 * plan.num_rows * layer.D * w1.shape[1], 2.0 * plan.num_rows * layer.D * layer.E
    return skew, {  # kernel label -> (config kind, GEMM FLOPs, launch)
        "up": ("up_glu" if layer.glu else "up", f_in, lambda: up_forward(x, w1, b1, plan, activation, save_h=True)),
        "down": ("down", f_out, lambda: down_scatter(a, w2, plan, gate_flat, combine)),
        "up_bwd": ("up_bwd_glu" if layer.glu else "up_bwd", f_out,
                   lambda: up_backward(dy, w2, h, gate_flat, plan, activation, True, True)),
        "wgrad_dw2": ("wgrad", f_out, lambda: wgrad(ga, dy, plan, w2, gathered=False)),
        "wgrad_dw1": ("wgrad", f_in, lambda: wgrad(dh, x, plan, w1, gathered=False)),
        "down_dx": ("down", f_in, lambda: down_scatter(dh, w1, plan, None, combine)),
        "wgrad_dw1_fold": ("wgrad", f_in, lambda: wgrad(dh, x, plan, w1, gathered=False,
                                                        fold=("expert", dc, layer.E))),
        "wgrad_dw1_foldrows": ("wgrad", f_in, lambda: wgrad(dh, x, plan, w1, gathered=False,
                                                            fold=("rows", (dgate / layer.E)[plan.order.long()],
                                                                  layer.E))),
        "wgrad_dw2_f32": ("wgrad", f_out, lambda: wgrad(ga, dy, plan, w2m, gathered=False)),
        "wgrad_dw1_f32": ("wgrad", f_in, lambda: wgrad(dh, x, plan, w1m, gathered=False)),
        "down_dx_fold": ("down", f_in, lambda: down_scatter(dh, w1, plan, None, combine,
                                                            rank1=(dgate, centroids))),
        # dx's product stored into its (t, k) rows, then summed over k by torch: the combine without atomic adds
        "down_dx_buffer": ("down", f_in, lambda: down_scatter(dh, w1, plan, None, "buffer")),
        # two launches each: the output initialisation (and y's bias) by fill and add, or inside the up kernels
        "fwd_pair": ("down", f_in + f_out, lambda: fwd_pair(False)),
        "fwd_pair_fold": ("down", f_in + f_out, lambda: fwd_pair(True)),
        "bwd_pair": ("down", f_in + f_out, lambda: bwd_pair(False)),
        "bwd_pair_fold": ("down", f_in + f_out, lambda: bwd_pair(True)),
        # the fused forward (one kernel for up, activation and down), with y's initialisation by a fill
        # launch here (in the backend the routing plan's first kernel does it): compare with fwd_pair, and
        # with fwd_pair_fold + fill
        "fwd_fused": ("mlp_glu" if layer.glu else "mlp", f_in + f_out,
                      lambda: mlp_forward(x, w1, b1, w2, plan, gate_flat, activation, True, combine,
                                          out_bias=b2)[0]),
        "fill": ("fill", 0.0, lambda: initialise(torch.empty_like(x), b2)),
    }


def parse_configs(text: str) -> dict:
    """--configs: {kind: [config, ...]}, each config checked as SSD_TRITON_CONFIG's are."""
    from ssd_megatron.errors import UserError

    out = {}
    for item in filter(None, (t.strip() for t in text.split(";"))):
        kind, _, values = item.partition("=")
        kind = kind.strip()
        try:
            out[kind] = [tc.parse_configs(f"{kind}={v}")[kind] for v in values.split("|")]
        except UserError as exc:
            raise SystemExit(f"error: --configs (configs as in SSD_TRITON_CONFIG, '|' between them): {exc}") from None
    return out


def add_case_args(ap, activations="relu,swiglu"):
    """The layer cases' options, shared with tools/compile_report.py."""
    ap.add_argument("--shapes", default="base,8b")
    ap.add_argument("--activations", default=activations)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--launches", default="", help="comma list of launch labels (default: all), e.g. fwd_pair,fwd_fused")


def selected(launches: dict, args) -> dict:
    """The launches named by --launches (all when it is empty); an unknown name is an error."""
    if not args.launches:
        return launches
    names = args.launches.split(",")
    unknown = [n for n in names if n not in launches]
    if unknown:
        raise SystemExit(f"error: --launches: unknown {unknown}; accepted: {', '.join(launches)}")
    return {n: launches[n] for n in names}


def cases(args):
    return itertools.product(args.shapes.split(","), args.activations.split(","))


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_args(ap)
    ap.add_argument("--once", action="store_true", help="run each default launch once inside cudaProfilerStart/Stop")
    ap.add_argument("--orders", default="auto", help="comma list of M-tile orders to time every config in "
                    "(SSD_TRITON_TILE_ORDER: auto, expert, token, token:G), e.g. expert,token:16")
    ap.add_argument("--configs", default="", help="the configs to time besides the default, per kind, instead "
                    "of VARIANTS': KIND=BM,BN,BK,WARPS,STAGES[,VARIANT]|...;KIND=..., e.g. "
                    "'down=64,64,64,4,2,4|128,64,64,8,3,4;wgrad=256,128,64,8,3'")
    ap.add_argument("--no-variants", action="store_true", help="time the defaults (and --configs) only, not VARIANTS")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    variants = {**({} if args.no_variants else VARIANTS), **parse_configs(args.configs)}
    if not torch.cuda.is_available():
        print("error: tools/bench_kernels.py times CUDA kernels and needs a GPU (run it through the device tool)",
              file=sys.stderr)
        return 2
    from triton.testing import do_bench

    records = []
    for shape, act in cases(args):
        skew, launches = setup(shape, act, args.tokens)
        launches = selected(launches, args)
        print(f"{shape} {act}: expert loads max/mean {skew:.2f}", flush=True)
        if args.once:
            for _, _, fn in launches.values():
                fn()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            for _, _, fn in launches.values():
                fn()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            continue
        for label, (kind, flops, fn) in launches.items():
            tc.force_config()
            os.environ.pop("SSD_TRITON_TILE_ORDER", None)
            ref = _first(fn()).clone()
            for order, cfg in itertools.product(args.orders.split(","), [None] + variants.get(kind, [])):
                os.environ["SSD_TRITON_TILE_ORDER"] = order
                tc.force_config(**({kind: cfg} if cfg else {}))
                try:
                    err = _rel(_first(fn()), ref)
                    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                except Exception as exc:  # a config that does not compile or fit is reported, not fatal
                    err, ms = None, None
                    print(f"  {shape} {label} {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                tflops = None if ms is None else flops / ms / 1e9
                rec = {"shape": shape, "activation": act, "kernel": label, "cfg": list(cfg) if cfg else "default",
                       "tile_order": order, "ms": ms, "tflops": tflops, "rel_err_vs_default": err,
                       "load_max_over_mean": skew}
                records.append(rec)
                print(f"{shape:5s} {act:6s} {label:10s} {order:6s} {str(rec['cfg']):32s} "
                      f"{'-' if ms is None else f'{ms:.4f} ms {tflops:5.0f} TF/s':>20s}  "
                      f"err {err if err is None else f'{err:.1e}'}", flush=True)
        tc.force_config()
        os.environ.pop("SSD_TRITON_TILE_ORDER", None)
    if args.out and records:
        import triton
        with open(args.out, "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(0), "date": dt.date.today().isoformat(),
                       "torch": torch.__version__, "triton": triton.__version__, "tokens": args.tokens,
                       "defaults": {k: list(v) for k, v in tc.DEFAULTS.items()},
                       "records": records}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
