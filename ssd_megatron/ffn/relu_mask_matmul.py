"""(a @ b) * (h > 0) in one GEMM: the dense ReLU FFN's backward through W_o and the ReLU together.

dh = dy W_o is [tokens, d_ff]; written by cuBLAS and then re-read with h by a separate kernel to apply
ReLU's derivative, it costs a full extra pass over two [tokens, d_ff] tensors (0.2 ms per GPT-base layer
on an H100, docs/performance.md). Here a Triton GEMM loads the h tile in its epilogue and writes the
masked product once. torch does not expose cuBLASLt's DRELU epilogue, which would do the same.
Measured at 16384 x 768 x 6144 bf16 on an H100 (tools/bench_mask_gemm.py): 0.363 ms, against 0.423 ms
for the cuBLAS GEMM (0.222 ms alone) plus inductor's mask pass.

`relu_mask_matmul(a, b, h)`: a [M, K], b [K, N], h [M, N] (any strides) -> [M, N] in a's dtype. On CUDA
with Triton: the kernel (fp32 accumulation); elsewhere: torch ops, same result.
"""
from __future__ import annotations

import torch

_STATE = {"kernel": None, "tuned": None, "ok": None}
# Switch for benchmarks (bench/step.py --variant no-mask-gemm): False = cuBLAS GEMM, then the mask.
USE_TRITON = True


def _build():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3),
                                        (128, 256, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 5),
                                        (64, 256, 64, 4, 4), (128, 128, 128, 8, 3), (128, 64, 64, 4, 5))]

    @triton.jit
    def relu_mask_gemm_kernel(A, B, H, C, M, N, K, s_am, s_ak, s_bk, s_bn, s_hm, s_hn, s_cm, s_cn,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
               EVEN_K: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        # Groups of GROUP_M row tiles sweep the columns together, so b's tiles are reused from L2.
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        # Out-of-range rows/columns read a valid one (modulo) and are never stored. `%` (not a select)
        # keeps the compiler's knowledge that columns are contiguous (N, K divisible by 16 are
        # specialised), which vectorised, pipelined loads need: with tl.where here the kernel ran at
        # 83 TFLOP/s on an H100 instead of cuBLAS's 685.
        am = rm % M
        bn = rn % N
        a_ptr = A + am[:, None] * s_am + rk[None, :] * s_ak
        b_ptr = B + rk[:, None] * s_bk + bn[None, :] * s_bn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            if EVEN_K:  # no masks: the loads can be pipelined freely
                a = tl.load(a_ptr)
                b = tl.load(b_ptr)
            else:
                kmask = rk < K - k * BK
                a = tl.load(a_ptr, mask=kmask[None, :], other=0.0)
                b = tl.load(b_ptr, mask=kmask[:, None], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptr += BK * s_ak
            b_ptr += BK * s_bk
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        rows = rm[:, None].to(tl.int64)  # M x N may pass 2^31 elements
        h = tl.load(H + rows * s_hm + rn[None, :] * s_hn, mask=mask, other=0.0)
        out = tl.where(h > 0, acc, 0.0)
        tl.store(C + rows * s_cm + rn[None, :] * s_cn, out.to(C.dtype.element_ty), mask=mask)

    kernel = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BK"] == 0})(relu_mask_gemm_kernel)
    return kernel, triton.autotune(configs=configs, key=["M", "N", "K"])(kernel)


def _triton_ok() -> bool:
    if _STATE["ok"] is None:
        try:
            _STATE["kernel"], _STATE["tuned"] = _build()
            _STATE["ok"] = True
        except Exception:  # no triton / no compiler: the torch path computes the same
            _STATE["ok"] = False
    return bool(_STATE["ok"])


def relu_mask_matmul_torch(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    prod = a @ b
    return torch.where(h > 0, prod, torch.zeros_like(prod))


def use_mask_gemm(a: torch.Tensor) -> bool:
    """Whether the Triton kernel serves operands like `a` (CUDA, half precision, Triton available)."""
    return USE_TRITON and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _triton_ok()


@torch.library.custom_op("ssd_megatron::relu_mask_matmul", mutates_args=())
def relu_mask_matmul(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if not use_mask_gemm(a):
        return relu_mask_matmul_torch(a, b, h)
    return launch(a, b, h)


def launch(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, tiles: tuple | None = None) -> torch.Tensor:
    """Run the Triton kernel (autotuned, or with `tiles` = (BM, BN, BK, GROUP_M): tests under
    TRITON_INTERPRET use small tiles so that tiny shapes span several, with partial ones)."""
    if not _triton_ok():
        raise RuntimeError("relu_mask_matmul: Triton is not available")
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)

    def grid(meta):
        return (((M + meta["BM"] - 1) // meta["BM"]) * ((N + meta["BN"] - 1) // meta["BN"]),)

    args = (a, b, h, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            h.stride(0), h.stride(1), c.stride(0), c.stride(1))
    if tiles is None:
        _STATE["tuned"][grid](*args)
    else:
        bm, bn, bk, gm = tiles
        _STATE["kernel"][grid](*args, BM=bm, BN=bn, BK=bk, GROUP_M=gm)
    return c


@relu_mask_matmul.register_fake
def _(a, b, h):
    return a.new_empty(a.shape[0], b.shape[1])
