"""The fused expert MLP forward (kernels/mlp.py's function) as a warp-specialised Gluon kernel (Hopper; mlp
variant 5, WS).

kernels/mlp.py runs, per M-tile, the up GEMM, the activation, then the down GEMM with its atomic adds, one after
the other in one CTA per SM; Nsight Compute at base (docs/kernels.md v17) found it latency-bound: tensor pipe
39%, 30% of the stalls at barriers, nothing loading while the epilogues run. Here the work of one persistent
program per SM is split between warps:

- an **x loader** warpgroup gathers the tile's x rows (`X[token]`, [BM, BK] per reduction step) with cp.async,
  whose completion arrives on the step's barrier (`async_copy.mbarrier_arrive`, one arrival per thread);
- a **weight loader** warp issues every weight tile's TMA load into one ring, in the order the consumers take
  them: the tile's W1 tiles ([E, BK], one per reduction step), its W2 tiles ([E, BN], one per output column
  block), then the next tile's. So each GEMM has the whole ring ahead of it: the next tile's W1 tiles load
  during this tile's down GEMM and its W2 tiles during the up GEMM (BN = BK: the two kinds share the slots);
- two **consumer** warpgroups each take half of the tile's rows (BM / 2) and share every W tile. The up GEMM
  keeps one reduction step of wgmma in flight; its epilogue (bias, h stored when the backward needs it,
  activation) leaves a = act(h) in registers as the down GEMM's A operand; each output column block's wgmma is
  issued before the previous block's epilogue (gate scale, 16-byte atomic adds into the token rows or stores
  into the (t, k) rows), so that the adds run under the tensor cores' next product.

Config "mlp=128,64,64,6,4,5" (the fourth entry is the weight ring's depth, the fifth the x ring's). On an H100 under
Triton 3.9 the base ReLU layer's graphed inference forward takes 0.1836 / 0.1839 ms with it against 0.2083 with
kernels/mlp.py, 3.02-3.03x dense (docs/kernels.md v20); but its launch adds ~0.35 ms of host time to an eager
forward, and a first launch inside a CUDA-graph capture would load its module there, which CUDA refuses. So `auto`
takes it, for inference and training forwards, by kernels/gluon_launches.py's rule: while a CUDA graph is captured,
once an eager launch with the same launch key has loaded it, and for the first eager forward of each shape (the
warm-up every capture needs); other eager forwards keep kernels/mlp.py (`auto_ws.auto_mlp_ws`). In training
(h stored) it took 0.2 ms off the graphed GPT-base sparse step (H100, docs/kernels.md v23). Its 16 warps launch at
MAX_REGS = 128, which ptxas applies to the whole kernel.

E is one power-of-two tile of BE columns plus, with SPLIT, a second of BE2 (base's 192 = 128 + 64), and must
be exactly that (a TMA box cannot mask the next expert's rows). Serves (`serves`) activations without a gate,
bf16/fp16, sm_90, E = BE + BE2 with BE <= 128, D a multiple of BK, both weights as one 2-D matrix in either
layout (`descriptors.expert_descriptors`: rows [N * E, C] or W_out's column view [C, N * E]), and the
buffers within shared memory; the launcher (`mlp_launch.mlp_forward`) takes kernels/mlp.py elsewhere.

Needs Triton >= 3.9 (down_gluon.MIN_TRITON). Gluon has no interpreter: on CPU the offline compile for sm_90 and
the launcher's choice are tested (tests/backends/test_mlp_gluon.py); tests/backends/test_backends_gpu.py (`mlp_ws`)
checks the results on the GPU.
"""
from __future__ import annotations

import types

import torch

from . import down_gluon  # MIN_TRITON, SMEM_LIMIT, and _sm90 / _sms (one place for tests and tools to stand in)

LOADER_WARPS = 4
# registers per thread: the two consumer warpgroups, the x loader's warpgroup, the weight loader's warp (a
# warpgroup's worth: 16 warps in all, MAX_REGS at launch, also ptxas's bound for the whole kernel, hence `serves`'s
# E tile of at most 128 columns): 2 x 128 x 224 + 128 x 40 + 128 x 24 = 64 K
CONSUMER_REGS, LOADER_REGS, W_LOADER_REGS, MAX_REGS = 224, 40, 24, 128
ACTS = (0, 1, 2, 4)  # kernels/common.ACT_CODES without a gate: relu, gelu, squared_relu, gelu_tanh
_STATE: dict = {"build": None}


def _build():
    # module-global: Gluon resolves the helpers' `gl.constexpr` annotations in the module's globals
    global gl
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    down_gluon.require_gluon("WS fused forward", cp_async=True)
    down = down_gluon._build_once()
    if down is None:
        raise ImportError("the WS down kernel's parts, which this kernel shares, do not build here")
    row_targets, store_block, _w_tile, _b_operand = (down[2].row_targets, down[2].store_block, down[2].w_tile,
                                                     down[2].b_operand)

    @gluon.jit
    def _as_box(buf, desc):
        """A ring slot viewed as `desc`'s box (W1's [E, BK] and W2's [BN, E] boxes share the slots)."""
        return buf.reinterpret(shape=desc.block_type.shape, layout=desc.layout)

    @gluon.jit
    def x_loader(X, stride_x, x_bufs, x_full, x_empty, TILES, OFFS, TOK, M, D, n_tiles, LW: gl.constexpr):
        """The up GEMM's A operand of every tile: the gathered x rows by cp.async."""
        XS: gl.constexpr = x_bufs.type.shape[0]
        BM: gl.constexpr = x_bufs.type.shape[1]
        BK: gl.constexpr = x_bufs.type.shape[2]
        # 16 bytes per thread and copy: BK / 8 threads along a row
        layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (BK // 8), BK // 8],
                                                warps_per_cta=[LW, 1], order=[1, 0])
        cols = gl.arange(0, BK, layout=gl.SliceLayout(0, layout))
        kc = 0  # reduction steps loaded so far (the x ring)
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            e = gl.load(TILES + 2 * t)
            row0 = gl.load(TILES + 2 * t + 1)
            if row0 < M:
                rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
                rmask = rows < gl.load(OFFS + e + 1)
                tok = gl.load(TOK + rows, mask=rmask, other=0)
                xrow = X + tok.to(gl.int64)[:, None] * stride_x
                for k in range(0, D, BK):
                    s = kc % XS
                    mbarrier.wait(x_empty.index(s), ((kc // XS) & 1) ^ 1)  # a fresh barrier passes phase 1
                    async_copy.async_load(x_bufs.index(s), xrow + (k + cols)[None, :], mask=rmask[:, None])
                    async_copy.mbarrier_arrive(x_full.index(s), increment_count=False)
                    kc += 1

    @gluon.jit
    def _w_load(desc, desc2, r0, c0, bar, buf, buf2, SPLIT: gl.constexpr, RC: gl.constexpr, BE: gl.constexpr):
        """One weight tile (both of E's column tiles with SPLIT) into a ring slot, arriving on `bar`."""
        nbytes: gl.constexpr = desc.block_type.nbytes + (desc2.block_type.nbytes if SPLIT else 0)
        mbarrier.expect(bar, nbytes)
        _w_tile(desc, r0, c0, bar, _as_box(buf, desc), RC)
        if SPLIT:
            _w_tile(desc2, r0 + BE, c0, bar, _as_box(buf2, desc2), RC)

    @gluon.jit
    def w_loader(w1_desc, w1_desc2, w2_desc, w2_desc2, w_bufs, w_bufs2, w_full, w_empty, TILES, M, D, Dout, E,
                 n_tiles, SPLIT: gl.constexpr, W1_RC: gl.constexpr, W2_RC: gl.constexpr, BE: gl.constexpr,
                 BK: gl.constexpr):
        """Every weight tile by TMA, in the order the consumers take them: a tile's W1 tiles (one per reduction
        step), then its W2 tiles (one per output column block), then the next tile's. One ring serves both
        GEMMs, so each has the ring's whole depth: the next tile's W1 tiles load during this tile's down GEMM,
        and W2's during its up GEMM (two rings of their own had left the consumers waiting on W2 tiles for
        10% of their samples, Nsight Compute, docs/kernels.md v20)."""
        WS: gl.constexpr = w_bufs.type.shape[0]
        wc = 0  # weight tiles loaded so far (the weight ring)
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            e = gl.load(TILES + 2 * t)
            row0 = gl.load(TILES + 2 * t + 1)
            if row0 < M:
                for k in range(0, D, BK):
                    s = wc % WS
                    mbarrier.wait(w_empty.index(s), ((wc // WS) & 1) ^ 1)
                    _w_load(w1_desc, w1_desc2, e * E, k, w_full.index(s), w_bufs.index(s), w_bufs2.index(s), SPLIT,
                            W1_RC, BE)
                    wc += 1
                for n in range(0, Dout, BK):  # (BN = BK: a W2 tile fills a slot as a W1 tile does)
                    s = wc % WS
                    mbarrier.wait(w_empty.index(s), ((wc // WS) & 1) ^ 1)
                    _w_load(w2_desc, w2_desc2, e * E, n, w_full.index(s), w_bufs.index(s), w_bufs2.index(s), SPLIT,
                            W2_RC, BE)
                    wc += 1

    @gluon.jit
    def _activation(acc, cols, cmask, rows, rmask, e, B1, stride_b1, H, stride_h, dtype: gl.constexpr,
                    ACT: gl.constexpr, HAS_BIAS: gl.constexpr, SAVE_H: gl.constexpr):
        """kernels/up.py `_up_act` without a gate: bias, h rounded to the storage dtype (stored when SAVE_H), then
        act(h) in fp32."""
        if HAS_BIAS:
            acc += gl.load(B1 + e.to(gl.int64) * stride_b1 + cols, mask=cmask, other=0.0).to(gl.float32)[None, :]
        h = acc.to(dtype)
        if SAVE_H:
            gl.store(H + rows.to(gl.int64)[:, None] * stride_h + cols[None, :], h,
                     mask=rmask[:, None] & cmask[None, :])
        return _act(h.to(gl.float32), ACT)

    @gluon.jit
    def _act(v, ACT: gl.constexpr):
        """act(v) in fp32 (kernels/common.py `_act` for the activations without a gate, ACTS)."""
        if ACT == 0:
            out = gl.maximum(v, 0.0)
        elif ACT == 1:
            out = 0.5 * v * (1.0 + gl.erf(v * 0.7071067811865476))
        elif ACT == 2:
            r = gl.maximum(v, 0.0)
            out = r * r
        else:  # 4: tanh-approximate GELU, tanh(u) = 2 sigmoid(2u) - 1
            u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
            out = v / (1.0 + gl.exp(-2.0 * u))
        return out

    @gluon.jit
    def _rings(w_desc, w_desc2, BM: gl.constexpr, BK: gl.constexpr, XS: gl.constexpr, WS: gl.constexpr,
               LW: gl.constexpr):
        """The x ring ([XS, BM, BK]), the weight ring (WS slots of `w_desc`'s and `w_desc2`'s boxes) and their
        barriers, initialised: (x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty)."""
        dtype: gl.constexpr = w_desc.dtype
        x_bufs = gl.allocate_shared_memory(dtype, [XS, BM, BK], gl.NVMMASharedLayout.get_default_for([BM, BK], dtype))
        w_bufs = gl.allocate_shared_memory(dtype, [WS] + w_desc.block_type.shape, w_desc.layout)
        w_bufs2 = gl.allocate_shared_memory(dtype, [WS] + w_desc2.block_type.shape, w_desc2.layout)
        x_full = gl.allocate_shared_memory(gl.int64, [XS, 1], mbarrier.MBarrierLayout())
        x_empty = gl.allocate_shared_memory(gl.int64, [XS, 1], mbarrier.MBarrierLayout())
        w_full = gl.allocate_shared_memory(gl.int64, [WS, 1], mbarrier.MBarrierLayout())
        w_empty = gl.allocate_shared_memory(gl.int64, [WS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(XS):
            mbarrier.init(x_full.index(i), count=32 * LW)  # every loader thread's cp.async arrival
            mbarrier.init(x_empty.index(i), count=2)  # both consumers
        for i in gl.static_range(WS):
            mbarrier.init(w_full.index(i), count=1)
            mbarrier.init(w_empty.index(i), count=2)
        return x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty

    @gluon.jit
    def _release(acc, acc2, x_empty, w_empty, kc, wc, XS: gl.constexpr, WS: gl.constexpr, SPLIT: gl.constexpr):
        """Once every product issued on acc (and acc2, with SPLIT) is done, the x and weight ring slots of the step
        before counts kc and wc go back to the loaders. Returns (acc, acc2)."""
        if SPLIT:
            acc, acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc2))
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(x_empty.index((kc + XS - 1) % XS), count=1)
        mbarrier.arrive(w_empty.index((wc + WS - 1) % WS), count=1)
        return acc, acc2

    @gluon.jit
    def _up_gemm(x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty, w_desc, w_desc2, D, kc, wc,
                 which: gl.constexpr, up_l: gl.constexpr, up_l2: gl.constexpr, SPLIT: gl.constexpr,
                 W_RC: gl.constexpr, BE: gl.constexpr, BE2: gl.constexpr):
        """This consumer's half of an M-tile's up GEMM, X rows [BM / 2, D] @ W[e]^T ([BE] and, with SPLIT, [BE2]
        columns in fp32, layouts up_l and up_l2), from the x ring and the weight ring at their counts kc and wc:
        one reduction step of wgmma in flight; each step's slots go back once its products are done, before the
        next step's rows are awaited (as the wgrad's consumers do, docs/kernels.md v40: a consumer starved for rows
        then holds no slot, and the loaders keep every slot in flight; H100, v41, base ReLU layer fwd+bwd 0.6252 ->
        0.6171 ms, six rounds, each won; inference 0.1765 -> 0.1749 ms, five of six). Returns (acc, acc2, kc, wc), the
        counts past the tile's steps."""
        XS: gl.constexpr = x_bufs.type.shape[0]
        HM: gl.constexpr = x_bufs.type.shape[1] // 2
        BK: gl.constexpr = x_bufs.type.shape[2]
        WS: gl.constexpr = w_bufs.type.shape[0]
        acc = gl.zeros((HM, BE), dtype=gl.float32, layout=up_l)
        acc2 = gl.zeros((HM, BE2), dtype=gl.float32, layout=up_l2)
        for k in range(0, D, BK):
            s = kc % XS
            sw = wc % WS
            if k > 0:  # the previous step's products done: its slots may be refilled while this step's are awaited
                acc, acc2 = _release(acc, acc2, x_empty, w_empty, kc, wc, XS, WS, SPLIT)
            mbarrier.wait(x_full.index(s), (kc // XS) & 1)
            mbarrier.wait(w_full.index(sw), (wc // WS) & 1)
            fence_async_shared()  # the cp.async writes (generic proxy) before wgmma's reads (async proxy)
            xa = x_bufs.index(s).slice(which * HM, HM)
            acc = warpgroup_mma(xa, _b_operand(_as_box(w_bufs.index(sw), w_desc), not W_RC), acc, is_async=True)
            if SPLIT:
                acc2 = warpgroup_mma(xa, _b_operand(_as_box(w_bufs2.index(sw), w_desc2), not W_RC), acc2,
                                     is_async=True)
                acc, acc2 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc2))
            else:
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            # (tensors again for the loop; this step's products run on until the next `_release`)
            kc += 1
            wc += 1
        acc, acc2 = _release(acc, acc2, x_empty, w_empty, kc, wc, XS, WS, SPLIT)
        return acc, acc2, kc, wc

    @gluon.jit
    def consumer(x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty, w1_desc, w1_desc2, w2_desc, w2_desc2,
                 TILES, OFFS, ORDER, TOK, GATE, B1, stride_b1, H, stride_h, OUT, stride_o, M, D, Dout, E, n_tiles,
                 which: gl.constexpr,
                 ACT: gl.constexpr, HAS_BIAS: gl.constexpr, SAVE_H: gl.constexpr, SCALE: gl.constexpr,
                 ATOMIC: gl.constexpr, SPLIT: gl.constexpr, W1_RC: gl.constexpr, W2_RC: gl.constexpr,
                 BE: gl.constexpr, BE2: gl.constexpr, BN: gl.constexpr):
        BM: gl.constexpr = x_bufs.type.shape[1]
        WS: gl.constexpr = w_bufs.type.shape[0]
        HM: gl.constexpr = BM // 2  # this warpgroup's rows of the tile
        dtype: gl.constexpr = x_bufs.dtype
        up_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BE, 16])
        up_l2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BE2, 16])
        dn_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dn_l, k_width=2)
        # the epilogue's layout: 8 consecutive columns per thread (16-byte vector atomics)
        layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (BN // 8), BN // 8],
                                                warps_per_cta=[4, 1], order=[1, 0])
        row_l: gl.constexpr = gl.SliceLayout(1, layout)
        kc = 0  # x ring steps taken
        wc = 0  # weight ring tiles taken (W1's and W2's, in w_loader's order)
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            e = gl.load(TILES + 2 * t)
            row0 = gl.load(TILES + 2 * t + 1)
            if row0 < M:
                r0 = row0 + which * HM
                end = gl.load(OFFS + e + 1)
                # ---- up GEMM: h [HM, E] = x rows @ W1[e]^T
                acc, acc2, kc, wc = _up_gemm(x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty, w1_desc,
                                             w1_desc2, D, kc, wc, which, up_l, up_l2, SPLIT, W1_RC, BE, BE2)
                # ---- bias, h, activation: a = act(h) stays in registers as the down GEMM's A operand
                rows_u = r0 + gl.arange(0, HM, layout=gl.SliceLayout(1, up_l))
                cols_u = gl.arange(0, BE, layout=gl.SliceLayout(0, up_l))
                a1 = _activation(acc, cols_u, cols_u < E, rows_u, rows_u < end, e, B1, stride_b1, H, stride_h, dtype,
                                 ACT, HAS_BIAS, SAVE_H)
                a1 = gl.convert_layout(a1.to(dtype), a_l)
                if SPLIT:
                    rows_u2 = r0 + gl.arange(0, HM, layout=gl.SliceLayout(1, up_l2))
                    cols_u2 = BE + gl.arange(0, BE2, layout=gl.SliceLayout(0, up_l2))
                    a2 = _activation(acc2, cols_u2, cols_u2 < E, rows_u2, rows_u2 < end, e, B1, stride_b1, H, stride_h,
                                     dtype, ACT, HAS_BIAS, SAVE_H)
                    a2 = gl.convert_layout(a2.to(dtype), a_l)
                else:
                    a2 = a1
                # ---- down GEMM by column blocks, each block's epilogue under the next block's wgmma
                rows = r0 + gl.arange(0, HM, layout=row_l)
                rmask = rows < end
                g, dst = row_targets(rows, rmask, ORDER, GATE, TOK, stride_o, SCALE, ATOMIC)
                g = gl.convert_layout(g, gl.SliceLayout(1, dn_l))
                zero = gl.zeros((HM, BN), dtype=gl.float32, layout=dn_l)
                sw = wc % WS
                mbarrier.wait(w_full.index(sw), (wc // WS) & 1)
                cur = warpgroup_mma(a1, _b_operand(_as_box(w_bufs.index(sw), w2_desc), W2_RC), zero, use_acc=False,
                                    is_async=True)
                if SPLIT:
                    cur = warpgroup_mma(a2, _b_operand(_as_box(w_bufs2.index(sw), w2_desc2), W2_RC), cur,
                                        is_async=True)
                cur = warpgroup_mma_wait(num_outstanding=0, deps=(cur, a1, a2))[0]
                mbarrier.arrive(w_empty.index(sw), count=1)
                wc += 1
                num_n = gl.cdiv(Dout, BN)
                for n in range(1, num_n):
                    sw = wc % WS
                    mbarrier.wait(w_full.index(sw), (wc // WS) & 1)
                    nxt = warpgroup_mma(a1, _b_operand(_as_box(w_bufs.index(sw), w2_desc), W2_RC), zero,
                                        use_acc=False, is_async=True)
                    if SPLIT:
                        nxt = warpgroup_mma(a2, _b_operand(_as_box(w_bufs2.index(sw), w2_desc2), W2_RC), nxt,
                                            is_async=True)
                    store_block(cur, n - 1, e, rmask, dst, g, OUT, 0, OUT, Dout, layout, SCALE, ATOMIC, False)
                    cur = warpgroup_mma_wait(num_outstanding=0, deps=(nxt, a1, a2))[0]
                    mbarrier.arrive(w_empty.index(sw), count=1)
                    wc += 1
                store_block(cur, num_n - 1, e, rmask, dst, g, OUT, 0, OUT, Dout, layout, SCALE, ATOMIC, False)

    @gluon.jit
    def mlp_ws_kernel(X, stride_x, w1_desc, w1_desc2, w2_desc, w2_desc2, TILES, OFFS, ORDER, TOK, GATE, B1, stride_b1,
                      H, stride_h, OUT, stride_o, M, D, Dout, E, n_tiles,
                      ACT: gl.constexpr, HAS_BIAS: gl.constexpr, SAVE_H: gl.constexpr, SCALE: gl.constexpr,
                      ATOMIC: gl.constexpr, SPLIT: gl.constexpr, W1_RC: gl.constexpr, W2_RC: gl.constexpr,
                      BM: gl.constexpr, BK: gl.constexpr, BE: gl.constexpr, BE2: gl.constexpr, BN: gl.constexpr,
                      XS: gl.constexpr, WS: gl.constexpr, LW: gl.constexpr,
                      CREGS: gl.constexpr, LREGS: gl.constexpr, W_LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):
        # the weight ring's slots, in W1's box shapes and layouts; W2's tiles use them through `_as_box`
        x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty = _rings(w1_desc, w1_desc2, BM, BK, XS, WS, LW)
        # the tuples inline: a constexpr bound to a name first would become a tensor (the partitions' flags must
        # stay compile-time constants)
        gl.warp_specialize([
            (consumer, (x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty, w1_desc, w1_desc2, w2_desc, w2_desc2,
                        TILES, OFFS, ORDER, TOK, GATE, B1, stride_b1, H, stride_h, OUT, stride_o, M, D, Dout, E,
                        n_tiles, 0, ACT, HAS_BIAS, SAVE_H, SCALE, ATOMIC, SPLIT, W1_RC, W2_RC, BE, BE2, BN)),
            (consumer, (x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty, w1_desc, w1_desc2, w2_desc, w2_desc2,
                        TILES, OFFS, ORDER, TOK, GATE, B1, stride_b1, H, stride_h, OUT, stride_o, M, D, Dout, E,
                        n_tiles, 1, ACT, HAS_BIAS, SAVE_H, SCALE, ATOMIC, SPLIT, W1_RC, W2_RC, BE, BE2, BN)),
            (x_loader, (X, stride_x, x_bufs, x_full, x_empty, TILES, OFFS, TOK, M, D, n_tiles, LW)),
            (w_loader, (w1_desc, w1_desc2, w2_desc, w2_desc2, w_bufs, w_bufs2, w_full, w_empty, TILES, M, D, Dout, E,
                        n_tiles, SPLIT, W1_RC, W2_RC, BE, BK)),
        ], [4, LW, 1], [CREGS, LREGS, W_LOADER_REGS])

    # the parts kernels/up_bwd_gluon.py's kernel shares
    parts = types.SimpleNamespace(x_loader=x_loader, w_load=_w_load, up_gemm=_up_gemm, act=_act, rings=_rings)
    return mlp_ws_kernel, parts



def smem_bytes(BM: int, BK: int, E: int, stages: int, w_stages: int, element_size: int = 2) -> int:
    """Shared memory of one program: the x ring, the weight ring (slots of E x BK), and at most 17 kB for the
    epilogues' layout conversion and the barriers (Triton 3.9, sm_90: 16.1 kB at base with 64-column blocks)."""
    return (stages * BM * BK + w_stages * E * BK) * element_size + 17 * 1024


def serves(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, act: int, glu: bool, BM: int, BN: int, BK: int,
           w_stages: int, stages: int, be: int, be2: int) -> bool:
    """Whether this kernel takes tokens x [T, D], W1 [N, E, D] and W2 [N, E, Dout] with this tile: sm_90, bf16 or fp16,
    an activation without a gate, BM = 128 (two warpgroups of 64 rows), BN = BK (W1's and W2's tiles share the weight
    ring's slots) a power of two in 16..128, D a multiple of BK, E exactly the column tiles be + be2 each at most 128
    (MAX_REGS bounds ptxas for the whole kernel, and one m64n256 wgmma needs more than 128 registers: the launcher gives
    8B's E = 256 as 128 + 128, `tile_configs.ws_boxes`), both weights one 2-D matrix (`common.expert_matrix`) with
    16-byte aligned rows, x's rows contiguous, two or more slots in each ring, the buffers within shared memory, and a
    Triton whose Gluon builds the kernel."""
    from .common import expert_matrix, tma_aligned

    N, E, D = w1.shape
    es = x.element_size()
    if not down_gluon._sm90(x) or x.dtype not in (torch.bfloat16, torch.float16) or {w1.dtype, w2.dtype} != {x.dtype}:
        return False
    if glu or act not in ACTS or BM != 128 or min(stages, w_stages) < 2 or x.shape[0] == 0 or w2.shape[1] != E:
        return False
    if BN != BK or BK & (BK - 1) or not 16 <= BK <= 128 or D % BK:
        return False
    if be + be2 != E or be > 128 or not tma_aligned(x):
        return False
    for w in (w1, w2):
        matrix = expert_matrix(w)
        if matrix is None or not tma_aligned(matrix[0]):
            return False
    return smem_bytes(BM, BK, E, stages, w_stages, es) <= down_gluon.SMEM_LIMIT and _build_once() is not None


def _build_once():
    return down_gluon.built_once(_STATE, _build)


def launch(x, w1, b1, w2, tiles, offsets, order, token, gate, h, out, act: int, atomic: bool, BM: int, BN: int,
           BK: int, w_stages: int, stages: int, be: int, be2: int):
    """The kernel over `tiles` ([n, 2] int32 (expert, first row), first row M = empty) with persistent programs,
    one per SM. h: the pre-activation [M, E] to store (the backward's), or None. The caller checked `serves`."""
    kernel, _ = _build_once()
    N, E, D = w1.shape
    M = order.shape[0]
    (d1, d1b), rc1, _ = down_gluon.weight_descriptors(w1, (be, be2), BK)
    (d2, d2b), rc2, _ = down_gluon.weight_descriptors(w2, (be, be2), BN)
    n_tiles = tiles.shape[0]
    grid = (max(1, min(n_tiles, down_gluon._sms(x.device))),)
    hh = h if h is not None else out
    bias = b1 if b1 is not None else out
    kernel[grid](x, x.stride(0), d1, d1b, d2, d2b, tiles, offsets, order, token, gate if gate is not None else out,
                 bias, bias.stride(0), hh, hh.stride(0), out, out.stride(0), M, D, w2.shape[2], E, n_tiles,
                 ACT=act, HAS_BIAS=b1 is not None, SAVE_H=h is not None, SCALE=gate is not None, ATOMIC=atomic,
                 SPLIT=be2 > 0, W1_RC=rc1, W2_RC=rc2, BM=BM, BK=BK, BE=be, BE2=max(be2, 16), BN=BN, XS=stages,
                 WS=w_stages, LW=LOADER_WARPS,
                 CREGS=CONSUMER_REGS, LREGS=LOADER_REGS, W_LOADER_REGS=W_LOADER_REGS, num_warps=4,
                 maxnreg=MAX_REGS)
