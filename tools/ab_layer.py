"""A/B of the `triton` backend's tile configs and M-tile orders in the whole sparse layer (graphed, as `ssd-bench ffn`
times it; with --eager, eager calls): each arm forces configs in SSD_TRITON_CONFIG's syntax and, optionally, a tile
order; the arms alternate for --rounds rounds in one process, each round also timing the dense layer (the same way)
first, against which that round's ratios are taken (a dense time taken once had drifted by up to 8% between runs,
session 29). Each round starts one arm later than the round before (--arm-order rotate, the default): from session 30 on
the arm timed first, right after the dense layer, had an inference forward 3-6% slower than the same code in the next
arm in every round but the first (docs/kernels.md v28), so a fixed order would charge that to the first arm; --arm-order
fixed keeps the given order. Per-launch sweeps no longer predict the layer to within 5% (docs/kernels.md v15), so
candidate defaults are timed this way before they are adopted.

    python tools/ab_layer.py --shape 8b --activation swiglu \\
        --arm default= --arm "tma=up_glu=128,128,64,8,3,0,1;up_bwd_glu=128,256,64,8,3,1,1" --out ab.json
    python tools/ab_layer.py --shape base --forward-only --arm default= --arm "ws=mlp=128,64,64,6,4,5" \\
        --arm "token16=@token:16" --arm "tuned=+SSD_TRITON_TUNE=1"

An arm is NAME=CONFIGS[@ORDER][+VAR=VALUE...]: CONFIGS as SSD_TRITON_CONFIG (empty: the defaults), ORDER as
SSD_TRITON_TILE_ORDER, then SSD_* environment variables set for that arm only, or the triton backend's options
(`ssd-bench ffn --triton-variants`' syntax, e.g. +fused_forward=false: the forward as up and down launches).
Prints a line per measurement; --out writes JSON (gpu, date, torch, triton, and per arm the forward and fwd+bwd
medians of each round, with each round's dense times).
"""
import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd_megatron.bench.ffn import Case, Layer, graphed, triton_variant  # noqa: E402
from ssd_megatron.bench.timing import time_calls  # noqa: E402
from ssd_megatron.errors import UserError  # noqa: E402
from ssd_megatron.ffn.backends.kernels import tile_configs as tc  # noqa: E402
from ssd_megatron.ffn.backends import get_backend  # noqa: E402


def parse_arm(text: str):
    """NAME=CONFIGS[@ORDER][+VAR=VALUE...] -> (name, {kind: config}, order or None, {SSD_VAR: VALUE}, the triton
    backend for this arm or None for the default one)."""
    name, sep, rest = text.partition("=")
    rest, *assignments = rest.split("+")
    pairs = [a.partition("=")[::2] for a in assignments]
    env = {k: v for k, v in pairs if k.startswith("SSD_")}
    options = "+".join(f"{k}={v}" for k, v in pairs if not k.startswith("SSD_"))
    if not sep or not name or any(not k or not v for k, v in pairs):
        raise SystemExit(f"error: --arm {text!r}: expected NAME=CONFIGS[@ORDER][+SSD_VAR=VALUE|+option=value...], "
                         f"e.g. ws=mlp=128,64,64,6,4,5, tuned=+SSD_TRITON_TUNE=1 or unfused=+fused_forward=false")
    try:
        backend = triton_variant(options) if options else None
    except UserError as exc:
        raise SystemExit(f"error: --arm {text!r}: {exc}") from None
    configs, _, order = rest.partition("@")
    return name, tc.parse_configs(configs), order or None, env, backend


def main() -> int:
    import triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="base", choices=("base", "8b"))
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--routing", default="realistic")
    ap.add_argument("--arm", action="append", required=True, help="NAME=CONFIGS[@ORDER]; repeat for each arm")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=0, help="graph replays per timing (default: 60 base, 20 8B)")
    ap.add_argument("--forward-only", action="store_true", help="time the inference forward only")
    ap.add_argument("--eager", action="store_true",
                    help="time eager calls (CUDA events around each, as ssd-bench ffn's un-graphed columns), not "
                         "graph replays: the path FSDP2 steps and runs without train.cuda_graph take")
    ap.add_argument("--params", default="bf16", choices=("bf16", "fp32"),
                    help="the layer's parameters: bf16, or fp32 under bf16 autocast (master weights, as in training)")
    ap.add_argument("--arm-order", choices=("rotate", "fixed"), default="rotate",
                    help="rotate: each round starts one arm later (default); fixed: the given order every round")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    arms = [parse_arm(a) for a in args.arm]
    iters = args.iters or (60 if args.shape == "base" else 20)
    default = get_backend("triton")
    case = Case(args.shape, args.activation, args.tokens, 3, torch.device("cuda"), torch.bfloat16,
                params=torch.float32 if args.params == "fp32" else None)
    case.set_routing(args.routing)

    def timed(f):
        if args.eager:
            t = {"fwd": time_calls(case.fwd(f), iters, 3)["median"]}
            if not args.forward_only:
                t["fwd_bwd"] = time_calls(case.fwd_bwd(f), iters, 3, case.clear)["median"]
            return t
        t = {"fwd": graphed(case, f, iters, True)["median"]}
        if not args.forward_only:
            t["fwd_bwd"] = graphed(case, f, iters, False)["median"]
        return t

    gpu = torch.cuda.get_device_name(0)
    print(f"{args.shape} {args.activation} (triton {triton.__version__}, {gpu})", flush=True)
    res = {"gpu": gpu, "date": str(datetime.date.today()), "torch": torch.__version__,
           "triton": triton.__version__, "shape": args.shape, "activation": args.activation, "tokens": args.tokens,
           "params": args.params, "arm_order": args.arm_order, "eager": args.eager,
           "dense_rounds": [], "arms": {name: {"configs": {k: list(v) for k, v in cfg.items()}, "order": order,
                                               "env": env, "options": _options(backend), "rounds": []}
                             for name, cfg, order, env, backend in arms}}
    touched = {"SSD_TRITON_TILE_ORDER"} | {k for *_, env, _ in arms for k in env}
    saved = {k: os.environ.get(k) for k in touched}
    try:
        for r in range(args.rounds):
            dense = timed(Layer.dense)
            res["dense_rounds"].append(dense)
            res.setdefault("dense", dense)  # (the first round's: the key earlier results carry)
            print(f"round {r} {'dense':12s} " + "  ".join(f"{k} {v:.4f} ms" for k, v in dense.items()), flush=True)
            for name, cfg, order, env, backend in round_order(arms, r, args.arm_order):
                tc.force_config(**cfg)
                _set_env(saved, dict(env, SSD_TRITON_TILE_ORDER=order or "auto"))
                t = timed(lambda layer, x, b=backend or default: layer.sparse(x, b))
                res["arms"][name]["rounds"].append(t)
                ratios = "  ".join(f"{k} {v:.4f} ms ({dense[k] / v:.3f}x)" for k, v in t.items())
                print(f"round {r} {name:12s} {ratios}", flush=True)
    finally:
        tc.force_config()
        _set_env(saved, {})
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


def _options(backend) -> dict:
    """An arm's backend options as the JSON records them ({} for the default backend)."""
    return {} if backend is None else {k: v for k, v in vars(backend).items() if not k.startswith("_")}


def round_order(arms: list, r: int, how: str) -> list:
    """The arms in round r's order: rotated by r places ("rotate"), else as given ("fixed")."""
    k = r % len(arms) if how == "rotate" else 0
    return arms[k:] + arms[:k]


def _set_env(saved: dict, values: dict) -> None:
    """Each variable of `saved` ({name: value before the run, or None}) to `values`' value, else back to saved."""
    for k, v in saved.items():
        v = values.get(k, v)
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


if __name__ == "__main__":
    sys.exit(main())
