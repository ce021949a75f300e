"""Training-step throughput: our GPT vs HF transformers' GPT2LMHeadModel, same shape, same run.

Default shape = the paper's GPT-base (12 x 768, 12 heads, d_ff 6144, ReLU, vocab 50304, batch 16 x 1024),
bf16 autocast, SDPA attention, fused AdamW, torch.compile. Each record is the median over timed steps
after warm-up (compilation happens in warm-up), timed as the training loop runs on CUDA: no host
synchronisation inside or between steps, step time = distance between consecutive step-end CUDA events.
MFU = training FLOPs / step time / peak, with FLOPs from `train.flops` (6 x matmul parameters x tokens
+ full-matrix attention, i.e. torchtitan's 6N + attention rule; both models have the same count).

Our step is the training loop's (`ssd-train`), piece by piece: `compile_blocks` (per-block
torch.compile, as train.compile does), `forward_loss` under the loop's autocast (the fused LM-head +
cross-entropy), `build_optimizer` (AdamW groups, fused on CUDA, the config's defaults), gradient
clipping at train.grad_clip's default with the loop's skip-on-non-finite rule (`train.clipping`). HF's step: the same optimizer
builder and clipping, whole-model torch.compile, and its logits' loss as HF computes it (fp32 upcast).

`--variant` (repeatable) times other versions of our step next to the loop's, for performance work:
`unfused-loss` (logits, then `lm_loss`), `no-qkv-fuse` (three q/k/v GEMMs), `no-fused-relu` (the dense FFN
as two linears and a ReLU, inductor's kernels between the GEMMs), `no-mask-gemm` (ReLU's derivative as a
pass after a cuBLAS dh GEMM instead of in the masked GEMM's epilogue), `triton-mask-gemm` (the masked GEMM
as the Triton TMA kernel instead of the Gluon ping-pong one on Hopper), `cudagraph-blocks` (blocks compiled
with mode reduce-overhead: CUDA graphs per block; also timed for `--phase sparse`), `sync-clip` (clip_grad_norm_ and a host read of the
norm before the optimizer step, instead of the fused AdamW's grad_scale / found_inf), `sync-step`
(host clock with a synchronisation around every step, instead of the loop's GPU-clock step-end events
without syncs), `fp32-residual` (model.fp32_residual_connection: the residual stream in fp32 under
autocast instead of bf16), `whole-compile`
(torch.compile of the whole model instead of per block), `max-autotune` (compile mode
max-autotune-no-cudagraphs), `cudnn-attn` / `flash-attn` (SDPA prefers cuDNN / FlashAttention-2), `cuda-graph` (the whole
step captured once and replayed, as `train.cuda_graph: true` runs it; also timed for `--phase sparse`),
`torch-adamw` (torch's fused AdamW instead of the Triton kernel, optim.kernel: torch), `ce-big-chunks`
(the fused loss in 2 chunks of 2^29 logits instead of 4 of 2^28), `no-router-fold` (sparse phase: SSD's
router gradient by the router's own backward instead of inside the expert kernels; e.g.
`--variant cuda-graph+no-router-fold`), `router-fold-rows` (its dW1 part added to dh's gate columns in the
dW1 kernel's main loop instead of as one small GEMM added in the epilogue), `no-master-weights` (sparse
phase: the FFN weights cast to bf16 before the expert backend and their gradients cast back by autograd,
instead of the backend taking the fp32 parameters and its wgrad kernel writing fp32 gradients),
`output-fold` / `no-output-fold` (sparse phase: y starting as the FFN's output bias and dx as zeros, both
initialised inside the up kernels, or y and dx zeroed by fill launches of their own and the bias added after
the backend, instead of the backend's choice, `TritonBackend(fold_output="auto")`),
`fused-forward` / `no-fused-forward` (sparse phase: the expert forward as one kernel per M-tile, or as the up
and down launches, instead of the backend's choice, `TritonBackend(fused_forward="auto")`).
`--profile DIR` profiles a few steps of each and prints the top kernels and a time-by-category table
(docs/performance.md).

`--phase sparse` puts every FFN of our model in sparse mode (random balanced clustering, N=32, K=6,
expert backend `--backend`) to time a sparse-phase step; `--phase both` times dense and sparse.
`--tiny` is a CPU smoke test (2 layers x 64, no compile unless --compile).

    python -m ssd_megatron.bench.step --out benchmarks/results/step_h100.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import UserError
from ..train.graph_breaks import compile_counts

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
        from ..ffn.expert_layout import to_expert_major

        be = get_backend(backend, device=device)
        if hasattr(be, "resolve"):  # auto: the backend it picks for bf16 tokens here, whose options variants set
            be = be.resolve(torch.empty(0, device=device, dtype=torch.bfloat16))
        g = torch.Generator().manual_seed(seed)
        for ffn in model.ffn_layers():
            ffn.configure_experts(shape["experts"], shape["top_k"])
            labels = torch.randperm(ffn.d_ff, generator=g) % shape["experts"]  # random, balanced
            ffn.set_clustering(labels.to(device))
            to_expert_major(ffn)  # as SSD's dense -> sparse switch does (before the optimizer has state)
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


def _hf_loss(logits, labels):
    """HF GPT2LMHeadModel's own loss: logits upcast to fp32, mean cross-entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


# Variants that change sparse-only code (the triton expert backend's options; not run for the dense phase),
# those that also run for the sparse phase (the others change dense-only code), and all of them.
SPARSE_ONLY = ("no-router-fold", "router-fold-rows", "no-master-weights", "output-fold", "no-output-fold",
               "fused-forward", "no-fused-forward")
PHASE_VARIANTS = ("loop", "cuda-graph", "cudagraph-blocks") + SPARSE_ONLY
VARIANTS = ("loop", "unfused-loss", "no-qkv-fuse", "no-fused-relu", "no-mask-gemm", "triton-mask-gemm", "sync-clip",
            "sync-step", "fp32-residual", "whole-compile", "max-autotune", "cudagraph-blocks", "cudnn-attn", "flash-attn",
            "cuda-graph", "torch-adamw", "ce-big-chunks") + SPARSE_ONLY


def prepare_ours(model, variant: str, compile_model: bool):
    """(module to call, loss(module, x, y) -> scalar to backward) for one variant of our step.

    "loop" is exactly what the training loop does (train/loop.py: compile_blocks, forward_loss); the
    others change one thing each."""
    from ..ffn import relu_mask_matmul
    from ..ffn.switchable_ffn import SwitchableFFN
    from ..models.blocks import Attention
    from ..parallel.data_parallel import compile_blocks
    from ..train import loss as loss_mod
    from ..train.loop import forward_loss

    parts = set(variant.split("+"))
    Attention.fuse_qkv = "no-qkv-fuse" not in parts
    SwitchableFFN.fuse_relu = "no-fused-relu" not in parts
    for ffn in model.ffn_layers():
        if ffn.mode == "sparse" and parts & set(SPARSE_ONLY) and not hasattr(ffn.backend, "fold_router"):
            raise UserError(f"--variant {variant}: needs the triton expert backend, not {ffn.backend.name}")
        if hasattr(ffn.backend, "fold_router"):  # triton
            ffn.backend.fold_router = ("off" if "no-router-fold" in parts else
                                       "rows" if "router-fold-rows" in parts else "epilogue")
            ffn.backend.master_weights = "no-master-weights" not in parts
            ffn.backend.fold_output = ("auto" if not parts & {"output-fold", "no-output-fold"} else
                                       "output-fold" in parts)
            ffn.backend.fused_forward = ("auto" if not parts & {"fused-forward", "no-fused-forward"} else
                                         "fused-forward" in parts)
    relu_mask_matmul.USE_TRITON = "no-mask-gemm" not in parts
    relu_mask_matmul.USE_GLUON = "triton-mask-gemm" not in parts
    model.cfg.fp32_residual_connection = "fp32-residual" in parts
    run = model
    if compile_model:
        if "whole-compile" in parts:
            run = torch.compile(model)
        else:
            mode = ("max-autotune-no-cudagraphs" if "max-autotune" in parts
                    else "reduce-overhead" if "cudagraph-blocks" in parts else None)
            compile_blocks(model, mode=mode)
    fused = "unfused-loss" not in parts
    loss_mod.CHUNK_ELEMENTS = (1 << 29) if "ce-big-chunks" in parts else (1 << 28)

    def loss(m, x, y):
        # The loop divides the summed loss by the global batch's valid-token count.
        loss_sum, n_valid = forward_loss(m, {"input_ids": x, "labels": y}, fused=fused)
        return loss_sum / n_valid

    return run, loss


def _variant_context(variant: str, device):
    import contextlib

    parts = set(variant.split("+"))
    if device.type == "cuda" and parts & {"cudnn-attn", "flash-attn"}:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        first = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
        if "flash-attn" in parts:
            first.reverse()
        return sdpa_kernel(first + [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True)
    return contextlib.nullcontext()


def time_training(model, run, loss_fn, shape: dict, device, steps: int, warmup: int, bf16: bool,
                  profile_dir: str = "", tag: str = "", sync_clip: bool = False,
                  sync_each_step: bool = False, cuda_graph: bool = False, adamw: str = "auto",
                  block_graphs: bool = False) -> dict:
    """Median step time of the loop's step (fwd + loss + bwd + clip + fused AdamW) over `steps` steps
    after `warmup` steps; `run` is what forward is called on (the model, or its compiled wrapper).
    `block_graphs`: the blocks were compiled with mode reduce-overhead; each step is opened as the loop's
    `train.cuda_graph: blocks` opens it (train/block_graphs.py, one micro-batch)."""
    from ..config import OptimConfig, TrainConfig
    from ..train.clipping import clip_and_step
    from ..train.host_gc import HostGC
    from ..train.loop import autocast_context
    from ..train.optimizer import build_optimizer

    cuda_graph = cuda_graph and device.type == "cuda"
    opt = build_optimizer(model, OptimConfig(kernel="torch" if adamw == "torch" else "auto"), device,
                          capturable=cuda_graph)
    max_norm = TrainConfig().grad_clip
    g = torch.Generator(device="cpu").manual_seed(1)
    # A few distinct batches, rotated, so caches don't flatter anyone.
    batches = [torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"] + 1), generator=g).to(device)
               for _ in range(4)]
    amp = autocast_context(device, "bf16" if bf16 else "fp32")

    def device_step(micro, scale):  # what one step queues: forward + loss, backward, clip, AdamW
        with amp():
            loss = loss_fn(run, micro[0]["x"], micro[0]["y"])
        loss.backward()
        if sync_clip:  # the previous loop: norm read on the host before the step (a sync mid-step)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if math.isfinite(float(norm)):
                opt.step()
        else:
            clip_and_step(model.parameters(), opt, max_norm)  # what the loop does
        return loss.detach()

    graph = None
    if cuda_graph:  # the loop's train.cuda_graph: the same step, captured once and replayed
        from ..train.step_graph import StepGraph

        graph = StepGraph(device_step, lambda: opt.zero_grad(set_to_none=True), opt, device)
    blocks = None
    if block_graphs:
        from ..train.block_graphs import BlockGraphs

        blocks = BlockGraphs(model, accum=1)

    def step(i):
        b = batches[i % len(batches)]
        micro = [{"x": b[:, :-1], "y": b[:, 1:]}]
        if graph is not None:
            return graph(micro, 1.0)
        if blocks is not None:
            blocks.begin_step(None)
        loss = device_step(micro, 1.0)
        opt.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    _sync(device)
    warm_s = time.perf_counter() - t0
    host_gc = HostGC(TrainConfig().gc_interval)  # as the loop
    host_gc.start()
    mem0 = torch.cuda.memory_stats(device) if device.type == "cuda" else {}
    if device.type == "cuda" and not sync_each_step:
        # As the loop runs on CUDA: no host sync inside or between steps; a step's time is the distance
        # between consecutive step-end events on the GPU's clock.
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        host = []  # the host's own time per step (launches): above the GPU time means host-bound
        ends[0].record()
        for i in range(steps):
            t = time.perf_counter()
            loss = step(warmup + i)
            ends[i + 1].record()
            host.append(time.perf_counter() - t)
            host_gc.step(i)
        _sync(device)
        times = [a.elapsed_time(b) / 1e3 for a, b in zip(ends, ends[1:])]
        host_ms = 1e3 * statistics.median(host)
    else:  # host clock, synchronised around every step
        times = []
        for i in range(steps):
            _sync(device)
            t = time.perf_counter()
            loss = step(warmup + i)
            _sync(device)
            times.append(time.perf_counter() - t)
    host_gc.stop()
    if device.type == "cuda":  # cudaMalloc/cudaFree in timed steps stall the host (cudaFree syncs)
        mem1 = torch.cuda.memory_stats(device)
        alloc_events = {k: mem1.get(k, 0) - mem0.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc",
                                                                      "num_device_free")}
    else:
        alloc_events = None
    res = {"allocator_events_in_timed_steps": alloc_events, "host_ms_median": host_ms if device.type == "cuda" and not sync_each_step else None,
           "step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
           "warmup_s": warm_s, "loss": float(loss.detach()), "steps": steps}
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if profile_dir:
        res["profile"] = profile_steps(step, warmup + steps, device, profile_dir, tag)
    del opt
    return res


# Kernel name -> category, first match wins (lower-case substrings).
_CATEGORIES = (
    # the sparse phase's own kernels (ffn/backends/kernels, ssd's router) before the generic names below
    ("sparse FFN: expert kernels", ("_mlp_kernel", "_up_kernel", "_down_kernel", "_down_tma_kernel", "_wgrad_kernel",
                                    "_ws_kernel")),
    ("sparse FFN: routing", ("centroid_topk", "_plan_count", "_plan_scatter", "_expert_tiles")),
    ("loss (fused CE)", ("ce_rows_kernel",)),
    ("attention", ("flash", "fmha", "sdpa", "attention", "cudnn")),
    ("layernorm (fused by inductor)", ("layer_norm",)),
    ("optimizer + clip", ("adam", "multi_tensor", "foreach", "l2norm", "lpnorm")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "sm80_", "cublas", "_mm_", "triton_tem")),
    ("loss (unfused)", ("log_softmax", "softmax", "nll_loss", "cross_entropy")),
    ("embedding", ("embedding", "indexing_backward", "index_put", "scatter", "sort", "radix", "segment",
                   "grad_weight")),
    ("fused elementwise (inductor)", ("triton_",)),
    ("copy / cast", ("copy", "cast", "convert", "fill", "memset", "memcpy")),
)


def _category(name: str) -> str:
    n = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "other elementwise"


def profile_steps(step, start: int, device, out_dir: str, tag: str, n: int = 3) -> dict:
    """Profile `n` steps; append the top-kernel table to out_dir/profiles.txt, print the top rows
    and return device ms per step by kernel category."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=acts) as prof:
        for i in range(n):
            step(start + i)
        _sync(device)
    ka = prof.key_averages()
    table = ka.table(sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total",
                     row_limit=40, max_name_column_width=90)
    cats: dict[str, float] = {}
    kernels = []
    for e in ka:
        t = getattr(e, "self_device_time_total", 0.0) or 0.0
        if device.type != "cuda" or t <= 0 or str(getattr(e, "device_type", "")).endswith("CPU"):
            continue
        if getattr(e, "is_user_annotation", False) or "#" in e.key:
            continue  # a record_function range mirrored on the GPU (Optimizer.step#...): its kernels count already
        kernels.append((t, e.key, e.count))
        cats[_category(e.key)] = cats.get(_category(e.key), 0.0) + t
    kernels.sort(reverse=True)
    total = sum(cats.values())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {tag}: device time per step by category (ms), {n} steps profiled"]
    for c, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        lines.append(f"{c:32s} {t / n / 1e3:8.2f}  {100 * t / max(total, 1e-9):5.1f}%")
    lines.append(f"{'total kernel time':32s} {total / n / 1e3:8.2f}")
    lines.append("# top kernels: ms/step, calls/step, name")
    for t, k, c in kernels[:25]:
        lines.append(f"{t / n / 1e3:8.3f} {c / n:6.1f}  {k[:110]}")
    idle = _idle_gaps(prof, n) if device.type == "cuda" else None
    if idle:
        lines.append(f"# GPU idle between kernels: {idle['idle_ms_per_step']:.2f} ms/step of {idle['span_ms_per_step']:.2f}; "
                     "largest gaps (ms, kernel before -> kernel after):")
        lines.append(f"# {idle['kernels_per_step']:.0f} kernels per step; gaps per step by size [count, ms]: "
                     f"{idle['gaps_per_step_by_size']}")
        lines += [f"{g:8.3f}  {a[:60]} -> {b[:60]}" for g, a, b in idle["largest"]]
    summary = "\n".join(lines)
    with open(out / "profiles.txt", "a") as f:  # one file for all runs (the device tool returns few files)
        f.write(summary + "\n\n" + table + "\n\n")
    print(summary, flush=True)
    res = {"device_ms_per_step_by_category": {c: t / n / 1e3 for c, t in cats.items()},
           "device_ms_per_step_total": total / n / 1e3}
    if idle:
        res["idle"] = idle
    return res


def _idle_gaps(prof, n: int, top: int = 10) -> dict | None:
    """Where the GPU waits: gaps between consecutive kernels (busy intervals merged) over the profiled
    steps, in total per step and the largest ones with the kernels on either side."""
    from torch.autograd import DeviceType

    ev = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start), key=lambda t: t[0])
    if not ev:
        return None
    gaps, end, last = [], ev[0][1], ev[0][2]
    for s, e, name in ev[1:]:
        if s > end:
            gaps.append(((s - end) / 1e3, last, name))
        if e >= end:
            end, last = e, name
    span = (end - ev[0][0]) / 1e3
    edges = (0.002, 0.005, 0.02, math.inf)  # ms: launch-gap sized, short waits, longer stalls
    hist = {f"<{hi * 1e3:g}us" if hi < math.inf else ">=20us": [0, 0.0] for hi in edges}
    for g, _, _ in gaps:
        key = next(k for k, hi in zip(hist, edges) if g < hi)
        hist[key][0] += 1
        hist[key][1] += g
    return {"idle_ms_per_step": sum(g for g, _, _ in gaps) / n, "span_ms_per_step": span / n,
            "kernels_per_step": len(ev) / n,
            "gaps_per_step_by_size": {k: [c / n, round(t / n, 3)] for k, (c, t) in hist.items()},
            "largest": sorted(gaps, reverse=True)[:top]}


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


def check_fused_loss(device, vocab: int, d: int = 768, rows: int = 3000) -> dict:
    """Fused vs unfused loss and gradients on this device at the real vocabulary (uneven chunks, some
    ignored labels): relative errors in fp32 (no autocast) and under bf16 autocast."""
    from ..train.loss import IGNORE_INDEX, fused_lm_loss, lm_loss

    g = torch.Generator(device="cpu").manual_seed(2)
    h = torch.randn(rows, d, generator=g).to(device)
    w = (torch.randn(vocab, d, generator=g) * 0.05).to(device)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[::7] = IGNORE_INDEX
    y = y.to(device)
    out = {}
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, ac in (("fp32", False), ("bf16", True)):
            res = []
            for fused in (False, True):
                hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ac):
                    if fused:
                        ls, n = fused_lm_loss(hh, ww, y, chunk_rows=1000 + 24)
                    else:
                        ls, n = lm_loss(F.linear(hh, ww), y)
                (ls / n).backward()
                res.append((ls.detach().double(), hh.grad.double(), ww.grad.double()))
            (l0, gh0, gw0), (l1, gh1, gw1) = res
            rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))
            out[name] = {"loss": rel(l1, l0), "grad_hidden": rel(gh1, gh0), "grad_weight": rel(gw1, gw0)}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    print("fused vs unfused loss, relative error: " + json.dumps(out), flush=True)
    return out


def _set_inductor_options(pairs: list[str]) -> dict:
    """Apply --inductor KEY=VALUE options (VALUE a Python literal) to torch._inductor.config."""
    import ast

    import torch._inductor.config as cfg

    done = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        *path, name = key.strip().split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part, None)
        if not sep or obj is None or not hasattr(obj, name):
            raise UserError(f"--inductor {pair!r}: expected KEY=VALUE with KEY an option of torch._inductor.config")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            raise UserError(f"--inductor {pair!r}: VALUE must be a Python literal (True, 0, 'name')") from None
        setattr(obj, name, value)
        done[key.strip()] = value
    return done


def _parse(argv):
    from ..ffn.backends import BACKEND_NAMES

    ap = argparse.ArgumentParser(prog="ssd-bench step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shape for a CPU smoke test")
    ap.add_argument("--phase", choices=["dense", "sparse", "both"], default="dense")
    ap.add_argument("--backend", default="auto", choices=list(BACKEND_NAMES), help="expert backend for the sparse phase")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF GPT2LMHeadModel reference")
    ap.add_argument("--variant", action="append", default=None,
                    help="versions of our dense step to time (repeatable; default: loop, the training loop's); "
                         "join several with + (cuda-graph+torch-adamw); one of: " + ", ".join(VARIANTS))
    ap.add_argument("--profile", default="", metavar="DIR",
                    help="profile 3 steps of each run; kernel tables to DIR, category summary printed")
    ap.add_argument("--check", action="store_true", help="first compare the fused loss with lm_loss on this device")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--out", default="", help="write the JSON results here (rewritten after every record)")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set a torch._inductor.config option for this run (repeatable), e.g. "
                         "triton.mix_order_reduction=False; recorded in the JSON")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    for v in args.variant or ():
        bad = [p for p in v.split("+") if p not in VARIANTS]
        if bad:
            raise UserError(f"--variant: {bad[0]!r} is not a variant; accepted: {', '.join(VARIANTS)} (joined with +)")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    inductor = _set_inductor_options(args.inductor)
    dev_name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: 'cuda' requested but no CUDA device is available; accepted here: cpu, auto")
    device = torch.device(dev_name)
    shape = dict(TINY if args.tiny else BASE)
    shape.update({k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v})
    compile_model = args.compile if args.compile is not None else device.type == "cuda"
    bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the loop does (TF32 outside autocast)
    out = _header(args, device, shape, bf16, compile_model, inductor)
    if args.check:
        out["fused_loss_check"] = check_fused_loss(device, shape["vocab"], shape["d_model"])
    phases = ["dense", "sparse"] if args.phase == "both" else [args.phase]
    variants = args.variant or ["loop"]
    runs = [(ph, v) for ph in phases for v in variants
            if (ph == "dense" and not any(p in SPARSE_ONLY for p in v.split("+")))
            or (ph == "sparse" and all(p in PHASE_VARIANTS for p in v.split("+")))]
    for phase, variant in runs:
        _time_ours(out, args, device, phase, variant, compile_model, bf16)
    if not args.no_hf:
        _reset(device, compile_model)
        hf = build_hf(shape, device)
        before = compile_counts()
        run = torch.compile(hf) if compile_model else hf
        res = time_training(hf, run, lambda m, x, y: _hf_loss(m(input_ids=x).logits, y), shape, device,
                            args.steps, args.warmup, bf16, args.profile, "hf_dense")
        res.update(compile_counts(before))
        _record(out, "hf-gpt2", "dense", "hf", None, res, args.out)  # same shape: the analytic count needs no module
        del hf, run
    _reset(device, compile_model)  # leave no variant's switches or graphs behind
    _print_summary(out)
    return 0


def _header(args, device, shape: dict, bf16: bool, compile_model: bool, inductor: dict) -> dict:
    """The JSON's run-level entries (machine, versions, shape, options) and its empty record list."""
    from ..ffn.backends import tuning_env
    from ..train.flops import peak_flops

    return {
        "benchmark": "train_step",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": triton_version(),
        "shape": shape, "bf16": bf16, "compile": compile_model, "backend": args.backend,
        "peak_flops": peak_flops(device), "inductor_options": inductor, "env": tuning_env(),
        "records": [],
    }


def _time_ours(out: dict, args, device, phase: str, variant: str, compile_model: bool, bf16: bool) -> None:
    """One run of our model: `phase` with `variant`'s options, recorded into `out`; a variant other than the
    training loop's that fails is recorded under "failed" and does not stop the others."""
    _reset(device, compile_model)
    model = build_ours(out["shape"], device, phase, args.backend)
    run = None
    parts = set(variant.split("+"))
    before = compile_counts()
    try:
        run, loss_fn = prepare_ours(model, variant, compile_model)
        with _variant_context(variant, device):
            res = time_training(model, run, loss_fn, out["shape"], device, args.steps, args.warmup, bf16,
                                args.profile, f"ours_{phase}_{variant}", sync_clip="sync-clip" in parts,
                                sync_each_step="sync-step" in parts, cuda_graph="cuda-graph" in parts,
                                adamw="torch" if "torch-adamw" in parts else "auto",
                                block_graphs="cudagraph-blocks" in parts and compile_model)
        res.update(compile_counts(before))
    except Exception as e:  # an exploratory variant failing must not lose the others
        if variant == "loop":
            raise
        print(f"variant {variant} failed: {type(e).__name__}: {str(e)[:500]}", file=sys.stderr, flush=True)
        out.setdefault("failed", {})[variant] = f"{type(e).__name__}: {str(e)[:500]}"
        _save(out, args.out)
    else:
        _record(out, "ssd-megatron", phase, variant, model, res, args.out)
    del model, run


def _record(out: dict, name: str, phase: str, variant: str, model, res: dict, path: str) -> None:
    """A timed run's record (tokens/s, ms/step, MFU against the device's peak), printed, and the JSON rewritten."""
    shape, peak = out["shape"], out["peak_flops"]
    tokens = shape["batch"] * shape["seq"]
    flops = _flops(shape, phase, model)
    rec = dict(model=name, phase=phase, variant=variant, tokens_per_step=tokens, flops_per_step=flops,
               tokens_per_s=tokens / res["step_s_median"], step_ms=1e3 * res["step_s_median"],
               mfu=(flops / res["step_s_median"] / peak) if peak else None, **res)
    if phase == "sparse" and name == "ssd-megatron":
        rec["expert_backend"] = model.ffn_layers()[0].backend.name
    out["records"].append(rec)
    mfu = f"{100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else "n/a"
    if rec.get("graph_breaks"):
        print(f"note: {name} {phase} {variant}: torch.compile met {rec['graph_breaks']} graph break(s) "
              f"({rec['compiled_graphs']} graphs); each costs host time in every eager step "
              "(tools/profile_host.py names them)", file=sys.stderr, flush=True)
    host = f"  host {res['host_ms_median']:.2f} ms/step" if res.get("host_ms_median") else ""
    allocs = res.get("allocator_events_in_timed_steps")
    print(f"{name:14s} {phase:6s} {variant:14s} {rec['step_ms']:9.2f} ms/step {rec['tokens_per_s']:12.0f} tok/s"
          f"  MFU {mfu}{host}" + (f"  allocator {allocs}" if allocs else ""), file=sys.stderr, flush=True)
    _save(out, path)


def _save(out: dict, path: str) -> None:
    """The JSON with the ratios so far, after every record: a run cut short keeps what it timed."""
    _finish(out)
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1))


def _print_summary(out: dict) -> None:
    print("model          phase  variant         ms/step      tokens/s     MFU")
    for r in out["records"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['model']:14s} {r['phase']:6s} {r['variant']:14s} {r['step_ms']:8.2f} {r['tokens_per_s']:12.0f}   {mfu}")
    for k in ("speedup_dense_vs_hf", "speedup_sparse_vs_dense"):
        if k in out:
            print(f"{k}: {out[k]:.3f}")


def _finish(out: dict) -> None:
    """Ratios between records of the same run: per variant timed in both phases (loop, cuda-graph),
    sparse vs dense; each of our dense variants vs HF."""
    by = {(r["model"], r["phase"], r["variant"]): r for r in out["records"]}
    hf = by.get(("hf-gpt2", "dense", "hf"))
    for (model, phase, variant), rec in by.items():
        if model != "ssd-megatron" or phase != "dense":
            continue
        suffix = "" if variant == "loop" else "_" + variant.replace("-", "_").replace("+", "_")
        if hf:
            out["speedup_dense_vs_hf" + suffix] = rec["tokens_per_s"] / hf["tokens_per_s"]
        sparse = by.get(("ssd-megatron", "sparse", variant))
        if sparse:
            out["speedup_sparse_vs_dense" + suffix] = sparse["tokens_per_s"] / rec["tokens_per_s"]


def _reset(device, compiled: bool) -> None:
    from ..models.blocks import Attention

    Attention.fuse_qkv = True
    if compiled:
        # graphs compiled earlier in this process (another variant's, with its SDPA choice) must not serve this
        # run, which would also hide their graph breaks from its counts (dynamo counts a break when it compiles)
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def triton_version():
    """The imported Triton's version (a Triton put on the path, e.g. tools/carry_triton.sh's, has no metadata)."""
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _version(pkg: str):
    try:
        import importlib.metadata as md

        return md.version(pkg)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
