"""Micro-benchmark of the dense FFN's backward GEMM through W_o with ReLU's derivative: cuBLAS GEMM then
a masking pass, vs the GEMMs with the mask in their epilogue (ssd_megatron/ffn/relu_mask_matmul.py: the
Gluon ping-pong kernel of relu_mask_gemm_gluon.py, the persistent Triton TMA kernel and the pointer-based
one). GPT-base shape by default:
dy [16384, 768] @ W_o [768, 6144] (W_o row-major, as fused_relu_ffn passes it), h [16384, 6144], bf16;
CUDA events, median of 50 after warm-up. Checks every variant against torch first (exact zeros where
h <= 0, bf16 tolerance elsewhere, every element written), also at odd shapes and strides. Prints one
JSON line per variant (and writes them to --out).

    python tools/bench_mask_gemm.py [--tokens 16384 --d 768 --ff 6144] [--sweep] [--out FILE]

--sweep also times the TMA kernel at each configuration of SWEEP (tile, warps, stages, epilogue split and
order, tile order, flattened loops, warp specialisation, programs per SM), each checked before it is timed.
"""
import argparse
import datetime
import json
import math

import torch

from ssd_megatron.bench.timing import time_calls

from ssd_megatron.ffn import relu_mask_gemm_gluon as g
from ssd_megatron.ffn import relu_mask_matmul as m

# Configurations of the TMA kernel: changes to the one in TMA_CONFIGS. Runs 1 and 2 of this sweep
# (benchmarks/results/mask_gemm_h100_2026-11-23_v3_run{1,2}.jsonl, an older form of the kernel and its
# tuples) also tried 128x128, 256x128, 64x256 tiles, BK 32, 2 to 5 stages, two programs per SM with small
# tiles, one program per tile, h read by plain loads (before the K loop or in the epilogue) or in one
# piece: all slower than 128x256x64, 3 stages, halves, flattened loops. Warp specialisation
# (tl.range(warp_specialize=True)) changed nothing measurable on the H100 with Triton 3.6.
SWEEP = [
    {},
    {"WARP_SPEC": True},
    {"INTERLEAVE": True},
    {"GROUP_M": 4},
    {"GROUP_M": 16},
    {"FLATTEN": False},
    {"SUBTILE": False, "FLATTEN": False},
    {"BM": 64, "num_warps": 4, "num_stages": 2, "OCC": 2},
    {"BM": 64, "num_warps": 4, "num_stages": 2, "OCC": 2, "FLATTEN": False},
    {"BM": 64, "BK": 32, "num_warps": 4, "num_stages": 4, "OCC": 2},
]


def _cfg(change):
    bm, bn, bk, gm, w, s, sub, fl, occ, il = m.TMA_CONFIGS[0]
    base = dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm, SUBTILE=sub, FLATTEN=fl, WARP_SPEC=False, OCC=occ, INTERLEAVE=il,
                num_warps=w, num_stages=s)
    return {**base, **change}


def _time(fn, n=50):
    return time_calls(lambda i: fn(), n, 5)["median"]  # CUDA events, median ms


def _poison(M, N, dtype):
    """Leave NaN in the caching allocator's block that the next [M, N] output will get."""
    t = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
    del t


def check(fn, a, b, h):
    """None if fn(a, b, h) equals (a @ b) * (h > 0) (exact zeros, bf16 tolerance), else what differs."""
    M, N = h.shape
    _poison(M, N, a.dtype)
    c = fn(a, b, h)
    torch.cuda.synchronize()
    ref = torch.where(h > 0, a.float() @ b.float(), 0.0)
    if c.shape != ref.shape or c.dtype != a.dtype:
        return f"shape/dtype {tuple(c.shape)} {c.dtype}"
    if torch.isnan(c).any():
        return f"{int(torch.isnan(c).sum())} unwritten/NaN"
    if (c[h <= 0] != 0).any():
        return "nonzero where h <= 0"
    err = ((c.float() - ref).norm() / ref.norm()).item()
    if not err < 1e-2:
        return f"rel err {err:.3g}"
    return None


def odd_cases():
    """(label, a, b, h): shapes off the tile grid, K not a multiple of BK, column-major a, transposed b,
    unaligned strides (pointer-kernel fallback), fp16."""
    g = torch.Generator(device="cuda").manual_seed(1)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, device="cuda", generator=g).to(dt)
    cases = []
    for M, K, N in [(1000, 768, 6144), (1000, 768, 6136), (1000, 768, 6100), (77, 64, 130), (4099, 200, 1000),
                    (16384, 768, 6144)]:
        cases.append((f"{M}x{K}x{N}", r(M, K), r(K, N), torch.relu(r(M, N))))
    cases.append(("colmajor_a", r(768, 3000).t(), r(768, 2048), torch.relu(r(3000, 2048))))
    cases.append(("transposed_b", r(3000, 768), r(2048, 768).t(), torch.relu(r(3000, 2048))))
    cases.append(("strided_h", r(3000, 768), r(768, 2048), torch.relu(r(3000, 4096))[:, 1000:3048]))
    cases.append(("odd_stride_a", r(1000, 771)[:, :768], r(768, 2048), torch.relu(r(1000, 2048))))
    cases.append(("fp16", r(2000, 768, dt=torch.float16), r(768, 6144, dt=torch.float16),
                  torch.relu(r(2000, 6144, dt=torch.float16))))
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--ff", type=int, default=6144)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    T, D, F = args.tokens, args.d, args.ff
    out = open(args.out, "a") if args.out else None
    meta = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": __import__("triton").__version__, "shape": [T, D, F]}

    def emit(rec):
        line = json.dumps({**rec, **meta})
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    dy = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    w_out = torch.randn(D, F, device="cuda", dtype=torch.bfloat16)
    h = torch.relu(torch.randn(T, F, device="cuda", dtype=torch.bfloat16))
    flops = 2 * T * D * F
    where = torch.compile(lambda p, h: torch.where(h > 0, p, 0))

    def old(a, b, hh):
        m.USE_TMA = m.USE_GLUON = False
        try:
            return m.launch(a, b, hh)
        finally:
            m.USE_TMA = m.USE_GLUON = True

    def triton_only(a, b, hh):
        m.USE_GLUON = False
        try:
            return m.launch(a, b, hh)
        finally:
            m.USE_GLUON = True

    # Correctness first: the entry point (Gluon, else TMA, where they apply), the Triton kernels, the old one.
    for label, a, b, hh in odd_cases():
        for name, fn in (("launch", m.launch), ("triton_only", triton_only), ("pointer_kernel", old),
                         ("custom_op", m.relu_mask_matmul)):
            err = check(fn, a, b, hh)
            c = torch.empty(hh.shape, device="cuda", dtype=a.dtype)
            tma = m._tma_operands(a, b, hh, c) is not None
            gluon = g.serves(a, b, hh, c) and name in ("launch", "custom_op")
            emit({"check": label, "fn": name, "gluon_path": gluon,
                  "tma_path": tma and not gluon and name != "pointer_kernel", "ok": err is None, "error": err})

    variants = {
        "cublas_gemm_only": lambda: dy @ w_out,
        "cublas_then_compiled_where": lambda: where(dy @ w_out, h),
        "cublas_then_eager_where": lambda: m.relu_mask_matmul_torch(dy, w_out, h),
        "triton_pointer_kernel_old": lambda: old(dy, w_out, h),
        "triton_masked_gemm": lambda: triton_only(dy, w_out, h),
        "gluon_pingpong_masked_gemm": lambda: m.launch(dy, w_out, h),
        "triton_masked_gemm_dy_colmajor": lambda: m.launch(dy.t().contiguous().t(), w_out, h),
        "triton_pointer_kernel_old_dy_colmajor": lambda: old(dy.t().contiguous().t(), w_out, h),
        "triton_masked_gemm_again": lambda: triton_only(dy, w_out, h),
        "gluon_pingpong_masked_gemm_again": lambda: m.launch(dy, w_out, h),
    }
    for name, fn in variants.items():
        ms = _time(fn)
        emit({"variant": name, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)})
    ms = _time(lambda: dy @ w_out)
    emit({"variant": "cublas_gemm_only_again", "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)})
    best = m._STATE["tuned"].best_config if m._STATE.get("tuned") is not None else None
    tbest = getattr(m._STATE.get("tma_tuned"), "best_config", None)
    emit({"triton_best_config_pointer": str(best), "triton_best_config_tma": str(tbest)})

    if args.sweep:
        rows = []
        for change in SWEEP:
            cfg = _cfg(change)
            fn = lambda a, b, hh: m.launch(a, b, hh, tma_config=cfg)
            try:
                err = check(fn, dy, w_out, h)
                ms = _time(lambda: fn(dy, w_out, h)) if err is None else math.nan
            except Exception as e:  # a configuration the compiler or the chip refuses
                err, ms = f"{type(e).__name__}: {str(e)[:200]}", math.nan
            ok = ms == ms
            rec = {"sweep": change, "config": cfg, "ms": round(ms, 4) if ok else None,
                   "tflops": round(flops / ms / 1e9, 1) if ok else None, "error": err}
            rows.append(rec)
            emit(rec)
        for rec in sorted((r for r in rows if r["ms"] is not None), key=lambda r: r["ms"]):
            print("SWEEP", rec["sweep"], rec["ms"])
        for rec in rows:
            if rec["error"]:
                print("FAILED", rec["sweep"], rec["error"][:150])


if __name__ == "__main__":
    main()
