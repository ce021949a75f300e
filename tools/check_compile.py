"""Does torch.compile run the `triton` expert backend faithfully? (GPU; prints, asserts nothing.)

1. each launcher alone (no autograd), compiled with fullgraph=True vs eager: outputs' relative errors;
2. the autograd function compiled with backend=aot_eager and inductor vs eager: output and every grad;
3. graph breaks of the backend call (torch._dynamo.explain);
4. a 2-layer GPT in its sparse phase, blocks compiled as the training loop compiles them vs eager: every
   parameter's gradient.
Run: python tools/check_compile.py [--configs default,rowloop,plain]"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "backends"))
from backend_cases import make_inputs, run  # noqa: E402
from ssd_megatron.ffn.backends.kernels import tile_configs as tc  # noqa: E402
from ssd_megatron.ffn.backends.kernels.down_launch import down_scatter  # noqa: E402
from ssd_megatron.ffn.backends.kernels.up_launch import up_backward, up_forward  # noqa: E402
from ssd_megatron.ffn.backends.kernels.wgrad_launch import wgrad  # noqa: E402
from ssd_megatron.ffn.backends.routing import make_plan  # noqa: E402
from ssd_megatron.ffn.backends.triton_backend import TritonBackend  # noqa: E402

CONFIGS = {"default": {}, "rowloop": {"down": (128, 128, 64, 4, 3, 1)}, "plain": {"down": (128, 128, 64, 8, 3)},
           "tma": {"down": (128, 128, 64, 8, 3, 3)}}


def rel(a, b):
    if a is None or b is None:
        return None if a is b else float("nan")
    a, b = a.double(), b.double()
    return round(((a - b).norm() / b.norm().clamp_min(1e-30)).item(), 5)


def flat(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


def launchers(inp):
    x, w1, b1, w2 = (inp[k].detach() for k in ("x", "w1", "b1", "w2"))
    gate_flat = inp["gate"].detach().reshape(-1).contiguous()
    plan = make_plan(inp["topk_idx"], w1.shape[0])
    act = inp["activation"]
    a, h = up_forward(x, w1, b1, plan, act, save_h=True)
    dy = inp["dy"]
    dh, _, ga, _ = up_backward(dy, w2, h, gate_flat, plan, act, True, True)
    return {  # name -> (launcher, its tensor arguments)
        "up": (lambda x, w1, b1: up_forward(x, w1, b1, plan, act, save_h=True), (x, w1, b1)),
        "down": (lambda a, w2, g: down_scatter(a, w2, plan, g, "atomic16"), (a, w2, gate_flat)),
        "up_bwd": (lambda dy, w2, h, g: up_backward(dy, w2, h, g, plan, act, True, True), (dy, w2, h, gate_flat)),
        "wgrad": (lambda l, r, w: wgrad(l, r, plan, w, gathered=False), (dh, x, w1)),
        "down_dx": (lambda d, w1: down_scatter(d, w1, plan, None, "atomic16"), (dh, w1)),
    }


def failed(what, exc):
    print(f"  {what} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="default,rowloop,plain,tma", help="comma list, or none")
    ap.add_argument("--phases", default="sparse", help="model check: comma list of dense,sparse (none: skip)")
    args = ap.parse_args()
    inp = make_inputs(device="cuda", dtype=torch.bfloat16, activation="relu", T=1024, D=768, E=192, N=32, K=6)
    for name in filter(lambda c: c != "none", args.configs.split(",")):
        tc.force_config(**CONFIGS[name])
        print(f"== config {name}: {CONFIGS[name] or 'defaults'}", flush=True)
        for kname, (fn, fargs) in launchers(inp).items():
            torch._dynamo.reset()
            try:
                want = flat(fn(*fargs))
                got = flat(torch.compile(fn, fullgraph=True)(*fargs))
                print(f"  launcher {kname:8s} compiled vs eager:", [rel(g, w) for g, w in zip(got, want)], flush=True)
            except Exception as exc:
                failed(f"launcher {kname:8s}", exc)
        be = TritonBackend(combine="atomic16")
        want = run(be, inp)
        for backend in ("aot_eager", "inductor"):
            torch._dynamo.reset()
            try:
                got = run(torch.compile(lambda *a: be(*a), fullgraph=True, backend=backend), inp)
                print(f"  autograd {backend:9s}: y", rel(got[0], want[0]),
                      {k: rel(got[1].get(k), v) for k, v in want[1].items()}, flush=True)
            except Exception as exc:
                failed(f"autograd {backend:9s}", exc)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(lambda *a: be(*a))(inp["x"], inp["w1"], inp["b1"], inp["w2"], inp["topk_idx"],
                                                       inp["gate"], inp["activation"])
        print(f"  explain: graphs {ex.graph_count}, breaks {ex.graph_break_count}",
              [str(b.reason)[:160] for b in ex.break_reasons][:3], flush=True)
    tc.force_config()
    for phase in filter(lambda p: p != "none", args.phases.split(",")):
        model_grads(phase)


def model_grads(phase):
    from ssd_megatron.bench.step import build_ours
    from ssd_megatron.parallel.data_parallel import compile_blocks
    from ssd_megatron.train.loop import forward_loss

    shape = dict(n_layers=2, d_model=768, n_heads=12, d_ff=6144, vocab=4096, batch=4, seq=512, experts=32, top_k=6)
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(3)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"] + 1), generator=g).to(dev)
    out = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        m = build_ours(shape, dev, phase, "triton", seed=0)
        if compiled:
            compile_blocks(m)
        with torch.autocast("cuda", torch.bfloat16):
            loss_sum, n = forward_loss(m, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        (loss_sum / n).backward()
        out[compiled] = (float(loss_sum / n), {k: p.grad for k, p in m.named_parameters()})
    (l0, g0), (l1, g1) = out[False], out[True]
    print(f"== model ({phase} phase, triton): loss eager {l0:.5f} compiled {l1:.5f}")
    for k in g0:
        norm = None if g0[k] is None else round(g0[k].norm().item(), 4)
        print(f"  {k:50s} grad rel err {rel(g1[k], g0[k])}  norm {norm}")


if __name__ == "__main__":
    main()
