"""(a @ b) * (h > 0) in one GEMM: the dense ReLU FFN's backward through W_o and the ReLU together.

dh = dy W_o is [tokens, d_ff]; written by cuBLAS and then re-read with h by a separate kernel to apply
ReLU's derivative, it costs a full extra pass over two [tokens, d_ff] tensors (0.2 ms per GPT-base layer
on an H100, docs/performance.md). Here a Triton GEMM loads the h tile in its epilogue and writes the
masked product once. cuBLASLt's DRELU epilogue would do the same from a bit-mask, but on an H100 with
cuBLAS 13 it ran 0.75 ms at this shape (called through ctypes; docs/performance.md, round 4).

Three kernels:
- on an H100 (compute capability 9.0) with row-major fp16/bf16 operands, a warp-specialised Gluon kernel
  (relu_mask_gemm_gluon.py) whose epilogue overlaps the MMAs: 0.28 ms at the GPT-base shape;
- on Hopper and newer, when every operand can be described to the TMA engine (last dimension or, for a
  and b, first dimension contiguous; other strides and the base 16-byte aligned), a persistent Triton
  kernel (one program per SM, tiles looped inside) that reads a, b and h and writes c through TMA
  descriptors; the tile loops are flattened so that the next tile's loads are in flight while the
  current tile's epilogue (mask and store) runs;
- otherwise (other strides, older GPUs, explicit `tiles`, TRITON_INTERPRET tests) a pointer-based
  kernel, one program per tile, any strides.
Measured at 16384 x 768 x 6144 bf16 on an H100 (tools/bench_mask_gemm.py, one run, medians,
benchmarks/results/mask_gemm_h100_2026-11-23_v3.jsonl): the TMA kernel 0.308 ms (501 TFLOP/s), the
pointer kernel 0.361 ms, the cuBLAS GEMM alone 0.224 ms, cuBLAS plus inductor's mask pass 0.426 ms.
Most of the TMA kernel's gap to cuBLAS is its epilogue, which runs on the warps that issue the MMAs;
Triton 3.6 cannot split them on Hopper (its warp specialisation changed nothing measurable), which is
why the Gluon kernel exists.
A column-major a (read through TMA transposed) takes 0.407 ms, against 0.456 for the pointer kernel.

`relu_mask_matmul(a, b, h)`: a [M, K], b [K, N], h [M, N] (any strides) -> [M, N] in a's dtype. On CUDA
with Triton: one of the kernels (fp32 accumulation); elsewhere: torch ops, same result.
`relu_mask_matmul_colsum(a, b, h)` also returns the column sums of that product in fp32 (the FFN's b_i
gradient), each kernel summing its output tiles in the epilogue into a [row tiles, N] buffer that is
reduced once afterwards (deterministic; no atomics).
"""
from __future__ import annotations

import torch

from . import relu_mask_gemm_gluon

_STATE = {"kernel": None, "tuned": None, "ok": None, "tma_kernel": None, "tma_tuned": None, "sms": {}}
# Switch for benchmarks (bench/step.py --variant no-mask-gemm): False = cuBLAS GEMM, then the mask.
USE_TRITON = True
# Switch for benchmarks: False = always the pointer-based kernel.
USE_TMA = True
# Switch for benchmarks and tests: False = the Triton kernels even where the Gluon one applies.
USE_GLUON = True

# (BM, BN, BK, GROUP_M, num_warps, num_stages, SUBTILE, FLATTEN, OCC, INTERLEAVE) of the TMA kernel. One
# configuration: with several, Triton's autotuner (its own timing) picked one 6% slower than this at the
# GPT-base shape
# (benchmarks/results/mask_gemm_h100_2026-11-23_v3_run2.jsonl). 128 x 256 x 64 tiles, 3 stages, 8 warps
# (two warpgroups of 64 x 256), the epilogue in two halves: 213 kB of shared memory.
TMA_CONFIGS = [(128, 256, 64, 8, 8, 3, True, True, 1, False)]


def _build():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3),
                                        (128, 256, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 5),
                                        (64, 256, 64, 4, 4), (128, 128, 128, 8, 3), (128, 64, 64, 4, 5))]

    @triton.jit
    def relu_mask_gemm_kernel(A, B, H, C, P, M, N, K, s_am, s_ak, s_bk, s_bn, s_hm, s_hn, s_cm, s_cn,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
               EVEN_K: tl.constexpr, COL_SUM: tl.constexpr):
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
        out = tl.where(h > 0, acc, 0.0).to(C.dtype.element_ty)
        tl.store(C + rows * s_cm + rn[None, :] * s_cn, out, mask=mask)
        if COL_SUM:  # rows past M read h as 0, so they add nothing
            tl.store(P + pid_m * N + rn, tl.sum(out.to(tl.float32), axis=0), mask=rn < N)

    @triton.jit
    def relu_mask_gemm_tma_kernel(a_desc, b_desc, h_desc, c_desc, P, M, N, K,
                                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                  GROUP_M: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr,
                                  SUBTILE: tl.constexpr, FLATTEN: tl.constexpr,
                                  WARP_SPEC: tl.constexpr, OCC: tl.constexpr, INTERLEAVE: tl.constexpr,
                                  COL_SUM: tl.constexpr):
        # Persistent: program p does tiles p, p + P, p + 2P, ... (P programs). TMA zero-fills reads
        # outside a, b, h and drops writes outside c, so partial tiles need no masks. With FLATTEN the
        # compiler fuses the tile loop and the K loop into one software-pipelined loop: the next tile's
        # a/b loads are issued before this tile's epilogue. The epilogue uses its own tile counter
        # (tile_c), as Triton's persistent-matmul tutorial does, so prologue and epilogue share no value.
        start = tl.program_id(0)
        progs = tl.num_programs(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        k_tiles = tl.cdiv(K, BK)
        num_tiles = num_m * num_n
        HN: tl.constexpr = BN // 2 if SUBTILE else BN
        dtype = c_desc.dtype
        per_group = GROUP_M * num_n  # tile -> (row, column) tile as in the pointer kernel
        tile_c = start - progs
        for tile in tl.range(start, num_tiles, progs, flatten=FLATTEN, warp_specialize=WARP_SPEC):
            first_m = (tile // per_group) * GROUP_M
            size_m = tl.minimum(num_m - first_m, GROUP_M)
            om = (first_m + (tile % per_group) % size_m) * BM
            on = ((tile % per_group) // size_m) * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in range(k_tiles):
                ok = ki * BK
                if A_T:
                    a = a_desc.load([ok, om]).T
                else:
                    a = a_desc.load([om, ok])
                if B_T:
                    b = b_desc.load([on, ok]).T
                else:
                    b = b_desc.load([ok, on])
                acc = tl.dot(a, b, acc)
            tile_c += progs
            first_m_c = (tile_c // per_group) * GROUP_M
            size_m_c = tl.minimum(num_m - first_m_c, GROUP_M)
            om_c = (first_m_c + (tile_c % per_group) % size_m_c) * BM
            on_c = ((tile_c % per_group) // size_m_c) * BN
            # h's tile through TMA, read here: Triton waits for a descriptor load right after issuing it,
            # so this read is not overlapped (plain loads here or before the K loop, or one read of the
            # whole tile, measured slower: benchmarks/results/mask_gemm_h100_2026-11-23_v3_run*.jsonl).
            if SUBTILE:  # two [BM, BN/2] halves: half the shared memory for the h and c tiles
                acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, HN)), (0, 2, 1)))
                h0 = h_desc.load([om_c, on_c])
                c0 = tl.where(h0 > 0, acc0, 0.0).to(dtype)
                if INTERLEAVE:  # the first half's store (asynchronous) overlaps the second half's read
                    c_desc.store([om_c, on_c], c0)
                    h1 = h_desc.load([om_c, on_c + HN])
                else:
                    h1 = h_desc.load([om_c, on_c + HN])
                    c_desc.store([om_c, on_c], c0)
                c1 = tl.where(h1 > 0, acc1, 0.0).to(dtype)
                c_desc.store([om_c, on_c + HN], c1)
                if COL_SUM:  # TMA zero-fills h past M: those rows add nothing
                    cols = on_c + tl.arange(0, HN)
                    row = P + (om_c // BM) * N
                    tl.store(row + cols, tl.sum(c0.to(tl.float32), axis=0), mask=cols < N)
                    tl.store(row + HN + cols, tl.sum(c1.to(tl.float32), axis=0), mask=cols + HN < N)
            else:
                h = h_desc.load([om_c, on_c])
                c = tl.where(h > 0, acc, 0.0).to(dtype)
                c_desc.store([om_c, on_c], c)
                if COL_SUM:
                    cols = on_c + tl.arange(0, BN)
                    tl.store(P + (om_c // BM) * N + cols, tl.sum(c.to(tl.float32), axis=0), mask=cols < N)

    def set_blocks(nargs):
        bm, bn, bk, hn = nargs["BM"], nargs["BN"], nargs["BK"], nargs["BN"] // (2 if nargs["SUBTILE"] else 1)
        nargs["a_desc"].block_shape = [bk, bm] if nargs["A_T"] else [bm, bk]
        nargs["b_desc"].block_shape = [bn, bk] if nargs["B_T"] else [bk, bn]
        nargs["h_desc"].block_shape = nargs["c_desc"].block_shape = [bm, hn]

    tma_configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": gm, "SUBTILE": sub, "FLATTEN": fl,
                                  "WARP_SPEC": False, "OCC": occ, "INTERLEAVE": il}, num_warps=w, num_stages=s,
                                 pre_hook=set_blocks)
                   for bm, bn, bk, gm, w, s, sub, fl, occ, il in TMA_CONFIGS]

    kernel = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BK"] == 0})(relu_mask_gemm_kernel)
    _STATE["tma_kernel"] = relu_mask_gemm_tma_kernel
    _STATE["tma_tuned"] = triton.autotune(configs=tma_configs, key=["M", "N", "K", "A_T", "B_T"])(
        relu_mask_gemm_tma_kernel)
    _STATE["set_blocks"] = set_blocks
    try:  # host-side TMA descriptors (Triton >= 3.4); without them only the pointer kernel runs
        from triton.tools.tensor_descriptor import TensorDescriptor
        _STATE["descriptor"] = TensorDescriptor
    except ImportError:
        _STATE["descriptor"] = None
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


def colsum_dtype(t: torch.Tensor) -> torch.dtype:
    """dtype of relu_mask_matmul_colsum's sums for operands like `t`."""
    return torch.promote_types(t.dtype, torch.float32)  # fp32 sums of half precision, float64 stays


def use_mask_gemm(a: torch.Tensor) -> bool:
    """Whether the Triton kernel serves operands like `a` (CUDA, half precision, Triton available)."""
    return USE_TRITON and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _triton_ok()


@torch.library.custom_op("ssd_megatron::relu_mask_matmul", mutates_args=())
def relu_mask_matmul(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if not use_mask_gemm(a):
        return relu_mask_matmul_torch(a, b, h)
    return launch(a, b, h)


@torch.library.custom_op("ssd_megatron::relu_mask_matmul_colsum", mutates_args=())
def relu_mask_matmul_colsum(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, c's column sums in fp32): the FFN's b_i gradient from the masked GEMM's epilogue, which holds
    every tile of c anyway, instead of a pass over c (or over an augmented copy of x) afterwards."""
    if not use_mask_gemm(a):
        c = relu_mask_matmul_torch(a, b, h)
        return c, c.sum(0, dtype=colsum_dtype(c))
    c, partial = launch(a, b, h, col_sum=True)
    return c, partial.sum(0)


def _sms(device: torch.device) -> int:
    """Multiprocessors of a Hopper-or-newer CUDA device, 0 for older ones (no TMA)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _STATE["sms"]:
        props = torch.cuda.get_device_properties(idx)
        _STATE["sms"][idx] = props.multi_processor_count if props.major >= 9 else 0
    return _STATE["sms"][idx]


def _tma_view(t: torch.Tensor, allow_t: bool):
    """(tensor to describe, transposed?) if a TMA descriptor can describe `t` (16-byte aligned base and
    outer stride, contiguous inner dimension; with `allow_t` a column-major `t` through `t.T`), else None."""
    es = t.element_size()
    if t.data_ptr() % 16:
        return None
    if t.stride(1) == 1 and (t.stride(0) * es) % 16 == 0:
        return t, False
    if allow_t and t.stride(0) == 1 and (t.stride(1) * es) % 16 == 0:
        return t.t(), True
    return None


def _tma_operands(a, b, h, c):
    """The four operands as TMA views, or None where the pointer kernel must serve them."""
    if not USE_TMA or not a.is_cuda or a.dtype != b.dtype or a.element_size() != 2 or min(a.shape + b.shape) == 0:
        return None
    if not _triton_ok() or _STATE.get("descriptor") is None or not _sms(a.device):  # built on first use
        return None
    views = (_tma_view(a, True), _tma_view(b, True), _tma_view(h, False), _tma_view(c, False))
    return None if any(v is None for v in views) else views


def _launch_tma(views, a, h, c, p, M, N, K, config: dict | None = None):
    """The persistent TMA kernel: with TMA_CONFIGS, or with `config` (BM, BN, BK, GROUP_M, SUBTILE, FLATTEN,
    WARP_SPEC, OCC, INTERLEAVE, num_warps, num_stages; tools/bench_mask_gemm.py sweeps these)."""
    TensorDescriptor = _STATE["descriptor"]
    (av, a_t), (bv, b_t), (hv, _), (cv, _) = views
    sms = _sms(a.device)
    dummy = [16, 16]  # block shapes are set per config (set_blocks), before the launch
    descs = [TensorDescriptor(v, list(v.shape), list(v.stride()), dummy) for v in (av, bv, hv, cv)]

    def grid(meta):
        tiles = ((M + meta["BM"] - 1) // meta["BM"]) * ((N + meta["BN"] - 1) // meta["BN"])
        return (min(tiles, meta["OCC"] * sms) if meta["OCC"] else tiles,)

    args = (*descs, p if p is not None else c, M, N, K)
    if config is None:
        _STATE["tma_tuned"][grid](*args, A_T=a_t, B_T=b_t, COL_SUM=p is not None)
    else:
        meta = dict(config)
        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
        _STATE["set_blocks"]({"a_desc": descs[0], "b_desc": descs[1], "h_desc": descs[2], "c_desc": descs[3],
                              "A_T": a_t, "B_T": b_t, **meta})
        _STATE["tma_kernel"][grid](*args, A_T=a_t, B_T=b_t, COL_SUM=p is not None, num_warps=warps,
                                   num_stages=stages, **meta)
    return c


def launch(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, tiles: tuple | None = None,
           tma_config: dict | None = None, col_sum: bool = False):
    """Run a GPU kernel: on Hopper with row-major operands the Gluon ping-pong kernel
    (relu_mask_gemm_gluon.py), else the persistent TMA one where it applies (TMA_CONFIGS, or `tma_config`),
    else the pointer-based one (autotuned, or with `tiles` = (BM, BN, BK, GROUP_M): tests under
    TRITON_INTERPRET use small tiles so that tiny shapes span several, with partial ones).

    Returns c, or with `col_sum` (c, partial) where partial [row tiles, N] fp32 holds each row tile's
    column sums of c (every element written by exactly one tile; `partial.sum(0)` is c's column sum)."""
    if not _triton_ok():
        raise RuntimeError("relu_mask_matmul: Triton is not available")
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)

    def partial(bm):
        return torch.empty(-(-M // bm), N, dtype=torch.float32, device=a.device) if col_sum else None

    def out(p):
        return (c, p) if col_sum else c

    if tiles is None and tma_config is None and USE_GLUON and relu_mask_gemm_gluon.serves(a, b, h, c):
        p = partial(relu_mask_gemm_gluon.BM)
        relu_mask_gemm_gluon.launch(a, b, h, c, p)
        return out(p)
    if tiles is None:
        views = _tma_operands(a, b, h, c)
        if views is not None:
            p = partial((tma_config or {}).get("BM", TMA_CONFIGS[0][0]))
            _launch_tma(views, a, h, c, p, M, N, K, tma_config)
            return out(p)

    def grid(meta):
        return (((M + meta["BM"] - 1) // meta["BM"]) * ((N + meta["BN"] - 1) // meta["BN"]),)

    p = partial(tiles[0]) if tiles is not None else None
    args = (a, b, h, c, c if p is None else p, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            h.stride(0), h.stride(1), c.stride(0), c.stride(1))
    if tiles is None:  # autotuned BM, so no fixed row-tile count: the fallback sums c afterwards
        _STATE["tuned"][grid](*args, COL_SUM=False)
        return out(c.sum(0, dtype=torch.float32)[None] if col_sum else None)
    bm, bn, bk, gm = tiles
    _STATE["kernel"][grid](*args, BM=bm, BN=bn, BK=bk, GROUP_M=gm, COL_SUM=p is not None)
    return out(p)


@relu_mask_matmul.register_fake
def _(a, b, h):
    return a.new_empty(a.shape[0], b.shape[1])


@relu_mask_matmul_colsum.register_fake
def _(a, b, h):
    return a.new_empty(a.shape[0], b.shape[1]), a.new_empty(b.shape[1], dtype=colsum_dtype(a))
