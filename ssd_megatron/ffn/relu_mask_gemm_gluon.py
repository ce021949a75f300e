"""(a @ b) * (h > 0) on Hopper as a warp-specialised "ping-pong" GEMM, written in Gluon.

The Triton kernel in relu_mask_matmul.py spends ~0.08 ms per GPT-base layer above cuBLAS speed: its
epilogue (read the h tile, mask, store) runs on the warps that issue the MMAs, so the tensor cores idle
while it runs. Triton 3.6 offers no way to overlap the two on Hopper, whose accumulators live in
registers. Gluon exposes the hardware pieces (TMA, mbarriers, wgmma, warp partitions), so this kernel
uses the schedule of CUTLASS's Hopper "ping-pong" GEMMs:

- one **loader** warp issues every TMA load: the a/b tiles of each K step into a ring of STAGES shared
  buffers (`full`/`empty` barriers per slot), and each output tile's h tile into the buffer of the
  consumer that will own it (`h_full`/`h_empty`);
- two **consumer** warpgroups take alternate output tiles of the persistent program. Their main loops
  run in turn (the `order` barriers), so the ring is consumed in order, and each one's epilogue (h from
  shared memory, mask, cast, write back into the same buffer, TMA store, the tile's column sums: the
  FFN's b_i gradient) runs while the other one's MMAs keep the tensor cores busy.

Per consumer the tile is 128 x 128 (a 128-register fp32 accumulator per thread); K steps of 64; 4 ring
slots (128 kB) and two 32 kB h/c buffers. Registers: 232 per consumer thread, 40 for the loader.
Measured at 16384 x 768 x 6144 bf16 on an H100 (tools/bench_mask_gemm.py,
benchmarks/results/mask_gemm_h100_2026-11-23_v4.jsonl): 0.278-0.284 ms, against 0.306-0.312 for the Triton
TMA kernel and 0.227 for cuBLAS's GEMM without the mask (docs/performance.md, round 5).

Used for row-major operands only (a [M, K], b [K, N], h and c [M, N], inner dimension contiguous,
16-byte aligned), fp16/bf16, on compute capability 9.0 (wgmma is Hopper-only); relu_mask_matmul.py
falls back to its Triton kernels otherwise. Gluon has no interpreter: on CPU (CI) only the selection
logic is exercised, the GPU tests (tests/ffn/test_relu_mask_matmul_gpu.py) check the kernel.
"""
from __future__ import annotations

import inspect

import torch

BM, BN, BK = 128, 128, 64
STAGES = 4
GROUP_M = 8  # tile order: groups of 8 row tiles sweep the columns together (a's tiles reused from L2)
H_AT = 2  # the loader fetches a tile's h at this K step (after the consumer's previous store left)
CONSUMER_REGS, LOADER_REGS, MAX_REGS = 232, 40, 168  # 3 warpgroups x 128 threads x 168 <= 64 K registers

_STATE: dict = {"kernel": None, "ok": None, "sms": {}}


def _build():
    import triton  # noqa: F401  (Gluon needs its runtime)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if "functions_and_args" not in inspect.signature(gl.warp_specialize).parameters:
        raise ImportError("this Gluon's warp_specialize has the older signature")
    # Triton 3.9 renamed the TMA copies (the old names raise there); 3.6 has only the old ones
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

    @gluon.jit
    def tile_origin(tile, num_m, num_n, TM: gl.constexpr, TN: gl.constexpr, GM: gl.constexpr):
        per_group = GM * num_n
        first_m = (tile // per_group) * GM
        size_m = gl.minimum(num_m - first_m, GM)
        return (first_m + (tile % per_group) % size_m) * TM, ((tile % per_group) // size_m) * TN

    @gluon.jit
    def loader(a_desc, b_desc, h_desc, c_desc, a_bufs, b_bufs, hc, full, empty, h_full, h_empty, order, P, M, N, K,
               which, GM: gl.constexpr, HAT: gl.constexpr):
        TM: gl.constexpr = c_desc.block_type.shape[0]
        TN: gl.constexpr = c_desc.block_type.shape[1]
        TK: gl.constexpr = a_desc.block_type.shape[1]
        NS: gl.constexpr = a_bufs.type.shape[0]
        num_m = gl.cdiv(M, TM)
        num_n = gl.cdiv(N, TN)
        k_tiles = gl.cdiv(K, TK)
        h_at = gl.minimum(k_tiles - 1, HAT)
        it = 0  # ring position: this program's K steps over all its tiles, in order
        j = 0  # this program's tile count; consumer j % 2 owns tile j
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            om, on = tile_origin(tile, num_m, num_n, TM, TN, GM)
            c = j % 2
            for ki in range(k_tiles):
                if ki == h_at:
                    mbarrier.wait(h_empty.index(c), ((j // 2) & 1) ^ 1)
                    mbarrier.expect(h_full.index(c), h_desc.block_type.nbytes)
                    tma_load(h_desc, [om, on], h_full.index(c), hc.index(c))
                s = it % NS
                mbarrier.wait(empty.index(s), ((it // NS) & 1) ^ 1)
                mbarrier.expect(full.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma_load(a_desc, [om, ki * TK], full.index(s), a_bufs.index(s))
                tma_load(b_desc, [ki * TK, on], full.index(s), b_bufs.index(s))
                it += 1
            j += 1

    @gluon.jit
    def consumer(a_desc, b_desc, h_desc, c_desc, a_bufs, b_bufs, hc, full, empty, h_full, h_empty, order, P, M, N, K,
                 which, GM: gl.constexpr, HAT: gl.constexpr):
        TM: gl.constexpr = c_desc.block_type.shape[0]
        TN: gl.constexpr = c_desc.block_type.shape[1]
        TK: gl.constexpr = a_desc.block_type.shape[1]
        NS: gl.constexpr = a_bufs.type.shape[0]
        dtype: gl.constexpr = c_desc.dtype
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, TN, 16])
        num_m = gl.cdiv(M, TM)
        num_n = gl.cdiv(N, TN)
        k_tiles = gl.cdiv(K, TK)
        pid = gl.program_id(0)
        progs = gl.num_programs(0)
        buf = hc.index(which)
        turn = 0
        for j in range(which, gl.cdiv(num_m * num_n - pid, progs), 2):
            om, on = tile_origin(pid + j * progs, num_m, num_n, TM, TN, GM)
            base = j * k_tiles
            acc = gl.zeros((TM, TN), dtype=gl.float32, layout=layout)
            # Main loops take turns: consumer 0 goes first (a fresh barrier's "previous" phase counts as done).
            mbarrier.wait(order.index(which), (turn & 1) ^ (1 - which))
            for ki in range(k_tiles):
                s = (base + ki) % NS
                mbarrier.wait(full.index(s), ((base + ki) // NS) & 1)
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                mbarrier.arrive(empty.index((base + ki - 1) % NS), count=1, pred=ki > 0)  # that MMA is done
            mbarrier.arrive(order.index(1 - which), count=1)  # the other may start while our last MMA runs
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((base + k_tiles - 1) % NS), count=1)
            mbarrier.wait(h_full.index(which), turn & 1)
            h = buf.load(layout)
            c = gl.where(h > 0, acc, 0.0).to(dtype)
            buf.store(c)  # each thread rewrites only what it read
            fence_async_shared()
            tma_store(c_desc, [om, on], buf)
            # This tile's column sums while the store drains (h past M is zero-filled: those rows add 0).
            cols = on + gl.arange(0, TN, layout=gl.SliceLayout(0, layout))
            gl.store(P + (om // TM) * N + cols, gl.sum(c.to(gl.float32), axis=0), mask=cols < N)
            tma.store_wait(0)
            mbarrier.arrive(h_empty.index(which), count=1)
            turn += 1

    @gluon.jit
    def relu_mask_gemm_pingpong_kernel(a_desc, b_desc, h_desc, c_desc, P, M, N, K, NUM_STAGES: gl.constexpr,
                                       GM: gl.constexpr, HAT: gl.constexpr, CREGS: gl.constexpr,
                                       LREGS: gl.constexpr, num_warps: gl.constexpr):
        TM: gl.constexpr = c_desc.block_type.shape[0]
        TN: gl.constexpr = c_desc.block_type.shape[1]
        TK: gl.constexpr = a_desc.block_type.shape[1]
        dtype: gl.constexpr = a_desc.dtype
        a_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, TM, TK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, TK, TN], b_desc.layout)
        hc = gl.allocate_shared_memory(dtype, [2, TM, TN], c_desc.layout)
        full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        h_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        h_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(full.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(h_full.index(i), count=1)
            mbarrier.init(h_empty.index(i), count=1)
            mbarrier.init(order.index(i), count=1)
        shared = (a_desc, b_desc, h_desc, c_desc, a_bufs, b_bufs, hc, full, empty, h_full, h_empty, order, P, M, N,
                  K)
        first = shared + (0, GM, HAT)  # (bound to names first: an int literal inline in the call is not lowered)
        second = shared + (1, GM, HAT)
        gl.warp_specialize([(consumer, first), (consumer, second), (loader, second)], [4, 1], [CREGS, LREGS])

    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}

    def run(a, b, h, c, p):
        M, K = a.shape
        N = b.shape[1]
        g = gl_dtype[a.dtype]
        descs = [TensorDescriptor.from_tensor(t, blk, gl.NVMMASharedLayout.get_default_for(blk, g))
                 for t, blk in ((a, [BM, BK]), (b, [BK, BN]), (h, [BM, BN]), (c, [BM, BN]))]
        tiles = -(-M // BM) * -(-N // BN)
        relu_mask_gemm_pingpong_kernel[(min(tiles, _sms(a.device)),)](
            *descs, p, M, N, K, STAGES, GROUP_M, H_AT, CONSUMER_REGS, LOADER_REGS, num_warps=4, maxnreg=MAX_REGS)
        return c

    return run


def _sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _STATE["sms"]:
        _STATE["sms"][idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _STATE["sms"][idx]


def available(device: torch.device) -> bool:
    """Gluon with the warp_specialize this file uses, on a compute capability 9.0 GPU."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    if _STATE["ok"] is None:
        try:
            _STATE["kernel"] = _build()
            _STATE["ok"] = True
        except Exception:  # no Gluon, or another API: the Triton kernels serve
            _STATE["ok"] = False
    return bool(_STATE["ok"])


def _row_major(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def serves(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether this kernel takes these operands (else the caller uses its Triton kernels)."""
    return (a.dtype in (torch.bfloat16, torch.float16) and b.dtype == h.dtype == c.dtype == a.dtype
            and min(a.shape + b.shape) > 0 and all(_row_major(t) for t in (a, b, h, c)) and available(a.device))


def launch(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
           partial: torch.Tensor | None = None) -> torch.Tensor:
    """c = (a @ b) * (h > 0), and each row tile's column sums of c into `partial` ([cdiv(M, BM), N] fp32;
    a scratch one when None). The caller checked `serves`.

    The sums are always computed (about 5 us of 0.25 ms at GPT-base): a variant of the kernel with them
    switched off by a constexpr, i.e. an unused pointer argument in every partition, crashed Triton 3.6's
    LLVM lowering on an H200 (an assertion in ConvertTritonGPUToLLVM)."""
    if partial is None:
        partial = torch.empty(-(-a.shape[0] // BM), b.shape[1], dtype=torch.float32, device=a.device)
    return _STATE["kernel"](a, b, h, c, partial)
