"""Training-step throughput: our GPT vs HF transformers' GPT2LMHeadModel, same shape, same run.

Default shape = the paper's GPT-base (12 x 768, 12 heads, d_ff 6144, ReLU, vocab 50304, batch 16 x 1024),
bf16 autocast, SDPA attention, fused AdamW, torch.compile. Each record is the median over timed steps
after warm-up (compilation happens in warm-up), timed with CUDA synchronisation around every step.
MFU = training FLOPs / step time / peak, with FLOPs from `train.flops` (6 x matmul parameters x tokens
+ full-matrix attention, i.e. torchtitan's 6N + attention rule; both models have the same count).

`--phase sparse` puts every FFN of our model in sparse mode (random balanced clustering, N=32, K=6,
expert backend `--backend`) to time a sparse-phase step; `--phase both` times dense and sparse.
`--tiny` is a CPU smoke test (2 layers x 64, no compile unless --compile).

    python -m ssd_megatron.bench.step --out benchmarks/results/step_h100.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig

BASE = dict(n_layers=12, d_model=768, n_heads=12, d_ff=6144, vocab=50304, batch=16, seq=1024, experts=32, top_k=6)
TINY = dict(n_layers=2, d_model=64, n_heads=2, d_ff=256, vocab=512, batch=2, seq=64, experts=8, top_k=2)


def _model_cfg(shape: dict) -> ModelConfig:
    return ModelConfig(arch="gpt", n_layers=shape["n_layers"], d_model=shape["d_model"], n_heads=shape["n_heads"],
                       d_ff=shape["d_ff"], activation="relu", max_seq_len=shape["seq"], vocab_size=shape["vocab"],
                       dropout=0.0, bias=True, tie_embeddings=True)


def build_ours(shape: dict, device, phase: str, backend: str, seed: int = 0):
    from ..models import build_model

    torch.manual_seed(seed)
    model = build_model(_model_cfg(shape), shape["vocab"]).to(device)
    if phase == "sparse":
        from ..ffn.backends import get_backend

        be = get_backend(backend, device=device)
        g = torch.Generator().manual_seed(seed)
        for ffn in model.ffn_layers():
            ffn.configure_experts(shape["experts"], shape["top_k"])
            labels = torch.randperm(ffn.d_ff, generator=g) % shape["experts"]  # random, balanced
            ffn.set_clustering(labels.to(device))
            ffn.set_backend(be)
            ffn.set_mode("sparse")
    return model


def build_hf(shape: dict, device, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=shape["vocab"], n_positions=shape["seq"], n_embd=shape["d_model"],
                     n_layer=shape["n_layers"], n_head=shape["n_heads"], n_inner=shape["d_ff"],
                     activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").to(device)
    return model


def _loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def time_training(model, forward, shape: dict, device, steps: int, warmup: int, compile_model: bool,
                  bf16: bool) -> dict:
    """Median step time of fwd + bwd + fused AdamW over `steps` steps after `warmup` steps."""
    if compile_model:
        model = torch.compile(model)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused) if fused else \
        torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(1)
    # A few distinct batches, rotated, so caches don't flatter anyone.
    batches = [torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"] + 1), generator=g).to(device)
               for _ in range(4)]
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else None

    def step(i):
        b = batches[i % len(batches)]
        x, y = b[:, :-1], b[:, 1:]
        if amp is not None:
            with amp():
                loss = _loss(forward(model, x), y)
        else:
            loss = _loss(forward(model, x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    _sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        _sync(device)
        t = time.perf_counter()
        loss = step(warmup + i)
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
            "warmup_s": warm_s, "loss": float(loss.detach()), "steps": steps}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flops(shape: dict, phase: str, model) -> float:
    from ..train.flops import SampleShape, sample_flops

    mcfg = _model_cfg(shape)
    frac, router = 1.0, 0.0
    if phase == "sparse":
        frac = shape["top_k"] / shape["experts"]
        router = 2.0 * shape["d_model"] * shape["experts"]
    fc = sample_flops(mcfg, SampleShape(shape["seq"]), shape["vocab"], model, ffn_fraction=frac,
                      router_fwd=router, router_bwd=2 * router)
    return shape["batch"] * fc.training


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ssd-bench step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shape for a CPU smoke test")
    ap.add_argument("--phase", choices=["dense", "sparse", "both"], default="dense")
    from ..ffn.backends import BACKEND_NAMES

    ap.add_argument("--backend", default="auto", choices=list(BACKEND_NAMES), help="expert backend for the sparse phase")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF GPT2LMHeadModel reference")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--out", default="", help="write the JSON results here")
    args = ap.parse_args(argv)

    from ..errors import UserError
    from ..train.flops import peak_flops

    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    dev_name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: 'cuda' requested but no CUDA device is available; accepted here: cpu, auto")
    device = torch.device(dev_name)
    shape = dict(TINY if args.tiny else BASE)
    if args.batch:
        shape["batch"] = args.batch
    if args.seq:
        shape["seq"] = args.seq
    compile_model = args.compile if args.compile is not None else device.type == "cuda"
    bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device)
    phases = ["dense", "sparse"] if args.phase == "both" else [args.phase]
    tokens = shape["batch"] * shape["seq"]
    records = []

    def record(name, phase, model, res):
        flops = _flops(shape, phase, model)
        rec = dict(model=name, phase=phase, tokens_per_step=tokens, flops_per_step=flops,
                   tokens_per_s=tokens / res["step_s_median"], step_ms=1e3 * res["step_s_median"],
                   mfu=(flops / res["step_s_median"] / peak) if peak else None, **res)
        records.append(rec)
        mfu = f"{100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else "n/a"
        print(f"{name:14s} {phase:6s} {rec['step_ms']:9.2f} ms/step {rec['tokens_per_s']:12.0f} tok/s  MFU {mfu}",
              file=sys.stderr, flush=True)

    for phase in phases:
        model = build_ours(shape, device, phase, args.backend)
        res = time_training(model, lambda m, x: m(input_ids=x), shape, device, args.steps, args.warmup,
                            compile_model, bf16)
        record("ssd-megatron", phase, model, res)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_hf:
        hf = build_hf(shape, device)
        res = time_training(hf, lambda m, x: m(input_ids=x).logits, shape, device, args.steps, args.warmup,
                            compile_model, bf16)
        record("hf-gpt2", "dense", None, res)  # same shape: the analytic count needs no module
        del hf

    out = {
        "benchmark": "train_step",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "shape": shape, "bf16": bf16, "compile": compile_model, "backend": args.backend, "peak_flops": peak,
        "records": records,
    }
    by = {(r["model"], r["phase"]): r for r in records}
    if ("ssd-megatron", "dense") in by and ("hf-gpt2", "dense") in by:
        out["speedup_dense_vs_hf"] = by[("ssd-megatron", "dense")]["tokens_per_s"] / by[("hf-gpt2", "dense")]["tokens_per_s"]
    if ("ssd-megatron", "dense") in by and ("ssd-megatron", "sparse") in by:
        out["speedup_sparse_vs_dense"] = (by[("ssd-megatron", "sparse")]["tokens_per_s"]
                                          / by[("ssd-megatron", "dense")]["tokens_per_s"])
    if args.out:
        p = Path(args.out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1))
    print("model          phase   ms/step      tokens/s     MFU")
    for r in records:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['model']:14s} {r['phase']:6s} {r['step_ms']:8.2f} {r['tokens_per_s']:12.0f}   {mfu}")
    for k in ("speedup_dense_vs_hf", "speedup_sparse_vs_dense"):
        if k in out:
            print(f"{k}: {out[k]:.3f}")
    return 0


def _version(pkg: str):
    try:
        import importlib.metadata as md

        return md.version(pkg)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
