"""Which part bounds the warp-specialised fused forward (kernels/mlp_gluon.py, mlp variant 5): the base ReLU layer's
inference forward (graphed) with the kernel rebuilt with parts of its work removed: the gathered x rows' cp.async
copies, W1's or W2's TMA loads (their barriers arrive at once instead), the atomic adds into y (masked off by a
condition the compiler cannot fold), or all loads. The results are wrong by design; only the times count. Against
kernels/mlp.py's default in the same process (docs/kernels.md v18).

    python tools/probe_mlp_ws.py [--config 128,64,64,6,4,5] [--rounds 2] [--out probe.json]   (Triton >= 3.9, sm_90)
"""
import argparse
import datetime
import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd_megatron.ffn.backends.kernels import mlp_gluon  # noqa: E402

X = [("async_copy.async_load(x_bufs.index(s), xrow + (k + cols)[None, :], mask=rmask[:, None])", "pass")]
W1 = [("""_w_load(w1_desc, w1_desc2, e * E, k, w_full.index(s), w_bufs.index(s), w_bufs2.index(s), SPLIT,
                            W1_RC, BE)""", "mbarrier.arrive(w_full.index(s), count=1)")]
W2 = [("""_w_load(w2_desc, w2_desc2, e * E, n, w_full.index(s), w_bufs.index(s), w_bufs2.index(s), SPLIT,
                            W2_RC, BE)""", "mbarrier.arrive(w_full.index(s), count=1)")]
# the epilogue's rows masked off at both of its calls (dst >= 0 always, but the compiler cannot know it)
ADDS = [(f"store_block(cur, {n}, e, rmask,", f"store_block(cur, {n}, e, rmask & (dst < 0),")
        for n in ("n - 1", "num_n - 1")]
PROBES = {"whole": [], "no-atomics": ADDS, "no-x": X, "no-w1": W1, "no-w2": W2, "no-loads": X + W1 + W2,
          "no-loads-no-atomics": X + W1 + W2 + ADDS}


def load_variant(module, subs, tag: str):
    """`module` (a kernels/*_gluon.py) executed again from its source with the substitutions `subs` ((old, new) pairs,
    each of which must be there) as a module of its own, named after `tag`; Gluon reads the source from its file."""
    name = module.__name__.rsplit(".", 1)[1]
    src = open(module.__file__).read()
    for old, new in subs:
        if old not in src:
            raise SystemExit(f"error: kernels/{name}.py no longer contains {old!r}: update this probe")
        src = src.replace(old, new)
    tag = tag.replace("-", "_")
    mod = types.ModuleType(f"{module.__package__}.probe_{name}_{tag}")
    mod.__package__ = module.__package__
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"{name}_probe_{tag}.py")
    with open(path, "w") as fh:
        fh.write(src)
    mod.__file__ = path
    exec(compile(src, path, "exec"), mod.__dict__)
    sys.modules[mod.__name__] = mod
    return mod


def write_out(path: str, res: dict) -> None:
    """A probe's results as JSON at `path` (--out; nothing when empty)."""
    if path:
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)


def probe_args(doc: str, kind: str, config: str):
    """(arguments, the forced config of `kind`) of a probe tool whose docstring is `doc`: --config (SSD_TRITON_CONFIG's
    values for `kind`, default `config`), --rounds, --out."""
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--config", default=config, help=f"the {kind} config (variant 5)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    return args, tc.parse_configs(f"{kind}={args.config}")[kind]


def probe_build(name: str):
    """kernels/mlp_gluon.py's `_build()` from its source with PROBES[name]'s substitutions."""
    return load_variant(mlp_gluon, PROBES[name], name)._build()


def main() -> int:
    import triton

    from ssd_megatron.bench.ffn import Case, graphed
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    from ssd_megatron.ffn.backends import get_backend

    args, cfg = probe_args(__doc__, "mlp", "128,64,64,6,4,5")
    backend = get_backend("triton")
    sparse = lambda layer, x: layer.sparse(x, backend)  # noqa: E731
    case = Case("base", "relu", 16384, 3, torch.device("cuda"), torch.bfloat16)
    case.set_routing("realistic")
    res = {"gpu": torch.cuda.get_device_name(0), "date": str(datetime.date.today()), "torch": torch.__version__,
           "triton": triton.__version__, "config": list(cfg),
           "what": "base ReLU layer, inference forward (graphed) ms, the WS fused forward with parts removed"}
    tc.force_config()
    res["kernels/mlp.py"] = graphed(case, sparse, 60, True)["median"]
    print(f"kernels/mlp.py (default) fwd {res['kernels/mlp.py']:.4f} ms", flush=True)
    try:
        for _ in range(args.rounds):
            for name in PROBES:
                mlp_gluon._STATE["build"] = probe_build(name)
                tc.force_config(mlp=cfg)
                t = graphed(case, sparse, 60, True)["median"]
                res.setdefault(name, []).append(t)
                print(f"WS {name:20s} fwd {t:.4f} ms", flush=True)
    finally:
        tc.force_config()
        mlp_gluon._STATE["build"] = None
    write_out(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
