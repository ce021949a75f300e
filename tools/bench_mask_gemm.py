"""Micro-benchmark of the dense FFN's backward GEMM through W_o with ReLU's derivative: cuBLAS GEMM then
a masking pass, vs the Triton GEMM with the mask in its epilogue (ssd_megatron/ffn/relu_mask_matmul.py).
GPT-base shape by default: dy [16384, 768] @ W_o [768, 6144], h [16384, 6144], bf16; CUDA events,
median of 50 after warm-up. Prints one JSON line per variant.

    python tools/bench_mask_gemm.py [--tokens 16384 --d 768 --ff 6144]
"""
import argparse
import json
import statistics

import torch

from ssd_megatron.ffn import relu_mask_matmul as m


def _time(fn, n=50):
    for _ in range(5):
        fn()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in evs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in evs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--ff", type=int, default=6144)
    args = ap.parse_args()
    T, D, F = args.tokens, args.d, args.ff
    dy = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    w_out = torch.randn(D, F, device="cuda", dtype=torch.bfloat16)
    h = torch.relu(torch.randn(T, F, device="cuda", dtype=torch.bfloat16))
    flops = 2 * T * D * F
    where = torch.compile(lambda p, h: torch.where(h > 0, p, 0))
    variants = {
        "cublas_gemm_only": lambda: dy @ w_out,
        "cublas_then_compiled_where": lambda: where(dy @ w_out, h),
        "cublas_then_eager_where": lambda: m.relu_mask_matmul_torch(dy, w_out, h),
        "triton_masked_gemm": lambda: m.launch(dy, w_out, h),
        "triton_masked_gemm_dy_colmajor": lambda: m.launch(dy.t().contiguous().t(), w_out, h),
    }
    for name, fn in variants.items():
        ms = _time(fn)
        print(json.dumps({"variant": name, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}), flush=True)
    best = m._STATE["tuned"].best_config if m._STATE.get("tuned") is not None else None
    print(json.dumps({"triton_best_config": str(best), "gpu": torch.cuda.get_device_name(0)}))


if __name__ == "__main__":
    main()
