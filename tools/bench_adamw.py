"""Micro-benchmark of the optimizer update at GPT-base size (181 M parameters in 196 tensors): torch's
fused AdamW over the model's parameter list, the same kernel over two flat buffers (is it the
multi-tensor overhead?), and our Triton AdamW (train/triton_adamw.py), all with the clip scale and
non-finite flag the loop passes; and the gradient norm. CUDA events, median of 30; one JSON line.

    python tools/bench_adamw.py
"""
import datetime
import json

import torch

from ssd_megatron.bench.timing import time_calls

from ssd_megatron.bench.step import BASE, build_ours
from ssd_megatron.train.optimizer import param_groups
from ssd_megatron.train.triton_adamw import TritonAdamW


def _time(fn, n=30):
    return time_calls(lambda i: fn(), n, 3)["median"]  # CUDA events, median ms


def _with_grads(params):
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3


def main():
    dev = torch.device("cuda")
    model = build_ours(BASE, dev, "dense", "auto")
    groups = param_groups(model, 0.01)  # torch.optim fills defaults into these dicts: fresh copies per optimizer
    params = [p for g in groups for p in g["params"]]
    n = sum(p.numel() for p in params)
    _with_grads(params)
    res = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "params": n, "tensors": len(params)}
    scale = torch.ones((), device=dev)
    inf = torch.zeros((), device=dev)

    def run_fused(opt):
        opt.grad_scale, opt.found_inf = scale, inf
        opt.step()

    makers = {"fused": lambda g: torch.optim.AdamW(g, lr=1e-4, fused=True),
              "fused_capturable": lambda g: torch.optim.AdamW(g, lr=1e-4, fused=True, capturable=True),
              "triton": lambda g: TritonAdamW(g, lr=1e-4)}
    for name, make in makers.items():
        opt = make([dict(g) for g in groups])
        res[name + "_ms"] = _time(lambda: run_fused(opt))
        del opt
    flat = [torch.zeros(sum(p.numel() for p in g["params"]), device=dev, requires_grad=True) for g in groups]
    for f in flat:
        f.grad = torch.randn_like(f) * 1e-3
    opt = torch.optim.AdamW([{"params": [f], "weight_decay": g["weight_decay"]} for f, g in zip(flat, groups)],
                            lr=1e-4, fused=True)
    res["fused_flat_ms"] = _time(lambda: run_fused(opt))
    grads = [p.grad for p in params]
    res["grad_norm_ms"] = _time(lambda: torch.nn.utils.get_total_norm(grads, 2.0))
    bytes_moved = 28 * n  # param r/w, grad r, two moments r/w, fp32
    for k in [k for k in res if k.endswith("_ms") and k != "grad_norm_ms"]:
        res[k.replace("_ms", "_tbps")] = round(bytes_moved / res[k] / 1e9, 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
