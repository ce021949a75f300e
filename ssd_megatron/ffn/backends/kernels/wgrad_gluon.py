"""The grouped weight gradients (kernels/wgrad.py's function) as a warp-specialised Gluon kernel (Hopper; a seventh
wgrad config entry of 5, WS). `auto`'s choice at base with balanced items and TMA reduces (below).

kernels/wgrad.py runs each program's loads and wgmma in one instruction stream, two CTAs per SM; Nsight Compute
found its launches latency-bound (tensor pipe ≈ 15%, L2 40-55% busy, docs/kernels.md v7), ≈ 224 TF/s at base and
≈ 390 at 8B. Here one persistent program per SM splits the work between warps:

- an **R loader** (four warps) gathers each reduction step's right-operand rows
  (`R[token[r]]`: x for dW1, dy for dW2; [BK, 128] as two [BK, 64] halves) with cp.async. Rows past the item's end
  are masked, and a masked cp.async writes zeros. The copies' addresses need the step's token indices, which the
  loader loads one step ahead: loaded just before their copies, they had put an L2 round trip between every two
  steps (H100, docs/kernels.md v39: 8B ReLU layer −0.01 to −0.40 ms in five of five rounds, mean −0.21; SwiGLU
  −0.24 / −0.66 ms);
- an **L loader** warp loads the step's left-operand rows ([BK, P]: dh for dW1, the gate-scaled activations for
  dW2; contiguous rows) by TMA, as one or two power-of-two column boxes of at most 128 (base's 192 = 128 + 64, 8B's
  256 = 128 + 128: `tile_configs.ws_boxes`). Rows past the item's end come in too (the next expert's, or TMA's
  zero fill past M) and meet R's zero rows;
- two **consumer** warpgroups each own 64 of the block's 128 columns of Q and all of P: per step
  acc[64, P] += R_half^T L, dW^T's block, with R^T as wgmma's A and L as its B straight from shared memory (both
  transposed), so that each product is m64nP as one or two wgmmas (N = 128 + 64 at base, 128 + 128 at 8B; N = 64
  had put an earlier version at shared memory's bandwidth). A consumer waits for a step's products and releases its
  slots before it waits for the next step's rows: while it starves, no slot is held and the R loader keeps all RS
  steps in flight. At 8B the gathered rows' latency is the bound (Nsight Compute, docs/kernels.md v40: both ends of
  the R ring waiting at once); releasing a step later, after the next step's products were issued, had kept one slot
  idle (H100: 8B ReLU layer −0.27 ms over six rounds, each won; launch alone −5 to −9%; base −1.6 to −2.8%).

Work items, each for one 128-column block: all of an expert's rows, stored into dW (deterministic; empty experts
store zeros), taken round-robin by the persistent programs; or **balanced** items (a sixth config entry n > 0):
one program per (row segment, column block), the segments S equal cuts of all experts' rows in expert order
(`segments`: one item per SM, none shorter than n rows). An item's pieces are its rows of each expert it meets; each
piece's fp32 partial sum is added into a zeroed fp32 dW: by a TMA reduce (TMA_OUT, where dW has a 2-D view,
`out_view`, and the staging fits in shared memory: each consumer stores its block there and one thread issues the
add, which runs while the consumer goes on), else by per-element relaxed atomics. So every program has the same
number of rows whatever the expert loads, which whole experts do not (a heavy expert's items run last and alone).
**Half sums** (`switches.sums_dtype`, the default; SSD_WGRAD_HALF_SUMS=0 turns them off): a bf16/fp16 dW
takes the TMA reduces itself, each piece's sum rounded to dW's dtype and added there (the reduce rounds again),
instead of an fp32 buffer zeroed before and cast after (fill and cast launches of 2 x (5.8 + 8.4) us per base
layer, docs/kernels.md v25); an expert cut into n pieces then takes up to 2n - 1 roundings instead of one, as the
bf16 combines' adds do (fp32 master weights' dW is fp32: unchanged). H100, base ReLU layer fwd+bwd, the WS wgrad
forced in both arms, three rounds: 0.7096 / 0.7189 / 0.7182 -> 0.6784 / 0.6790 / 0.6789 ms (v26), beyond the fill
and cast saved: the bf16 staging and reduces move half the bytes.

The router's term (dW1 only): FOLD 2, the piece holding an expert's first row adds COEF[e] (torch's dS^T x / E) to
the first fold_p rows, as kernels/wgrad.py does (an expert without rows has none to add: its term is a sum over its
tokens). FOLD 3 (`wgrad_launch.wgrad`'s "pairs", the default where this kernel serves): the kernel sums the term
itself from the rows it already streams. A gradient matrix of 16 columns per sorted row (kernels/score_grad.
row_matrix: the row's dS in column 0, zeros beside) comes in by TMA with L, each step issues one more wgmma (R^T
times it, m64n16), and every piece adds column 0 of that accumulator, times 1/E, to its block's first fold_p rows
before its store or reduce. That replaces a cuBLAS GEMM, its split-K reduce, a cast and a division (≈ 18 us of the
graphed base layer; H100, three rounds: 0.6597 / 0.6667 / 0.6753 ms against 0.6756 / 0.6782 / 0.6762, v26).

H200, Triton 3.9, docs/kernels.md v22, base ReLU layer fwd+bwd: kernels/wgrad.py 0.796-0.798 ms, whole experts
0.754, balanced with atomics 0.774, balanced with TMA reduces 0.732; graphed GPT-base sparse step 30.38-30.45 ->
29.65-29.69 ms (v21, H100: whole experts lost the step, whose expert loads are skewed). So `auto` takes the balanced
items with TMA reduces at base (`auto_ws.auto_wgrad_ws`), under kernels/gluon_launches.py's rule for
captures. At 8B, P = 256 in one box (an m64n256 accumulator, which ptxas would not fit in 128 registers, so 12 warps
with two R loader warps) lost in every form (v26, with half sums' bf16 staging: 8B ReLU fwd+bwd 9.47 / 9.49 against
kernels/wgrad.py's 8.39 / 8.42 ms); as two 128-column boxes in the 16-warp layout it wins (H200, v33, seven rounds:
7.48-7.72 against 7.83-7.94 ms), `auto`'s choice there. Its two equal boxes go through one staging buffer per
consumer (ONE_STAGING, v41; the second box's store waits for the first's reduce to have read it): half the staging,
so fp32 master weights' fp32 staging fits beside three-slot rings (H100, 8B ReLU layer fwd+bwd, four rounds: 8.23-8.68
ms with kernels/wgrad.py -> 7.55-8.13), and with half sums an R ring of 4 (`auto_ws.AUTO_WGRAD_WS_R4`).

Serves (`serves`) bf16/fp16 operands on sm_90, P's boxes up to 128 columns each (a wider P in slices of 256, one work
item each: SwiGLU 8B's dW1, P = 512, `auto`'s choice since v34: 8B SwiGLU layer −1.1 to −3.5% on the H100),
rows of L contiguous and 16-byte aligned, R gathered in the kernel with Q a multiple of 16 (Triton then proves the
copies 16 bytes wide), FOLD 0, 2 or 3, and the buffers within shared memory; the launcher (`wgrad_launch.wgrad`)
takes kernels/wgrad.py elsewhere. Needs Triton >= 3.9 (down_gluon.MIN_TRITON). Gluon has no interpreter: on CPU the
offline compile for sm_90 and the launcher's choice are tested (tests/backends/test_wgrad_gluon.py);
tests/backends/test_backends_gpu.py (`wgrad_ws`) checks the results on the GPU.
"""
from __future__ import annotations

import torch

from . import down_gluon  # MIN_TRITON, SMEM_LIMIT, built_once, _sm90 / _sms (one place for tests and tools to stand in)
from . import score_grad  # ROW_WIDTH: FOLD 3's gradient matrix

# The warps and registers per thread (MAX_REGS at launch, ptxas's bound for the whole kernel; the partitions then
# set theirs): (R loader warps, consumer, R loader and L loader registers, MAX_REGS). 16 warps: four R loader warps,
# the L loader's one in a warpgroup of its own (2 x 128 x 216 + 128 x 56 + 128 x 24 = 64 K), P's boxes at most 128
# columns each (`tile_configs.ws_boxes`). The R loader's 56 (40 before session 45, when it spilled 32 bytes at 8B)
# hold the next step's token indices without spilling; the consumers' accumulators fit in 216 (offline compile: no
# stack in any launch of the layer).
WARPS = (4, 216, 56, 24, 128)
_STATE: dict = {"build": None}


def _build():
    # module-global: Gluon resolves the helpers' `gl.constexpr` annotations in the module's globals
    global gl
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    down_gluon.require_gluon("WS wgrad", cp_async=True)

    @gluon.jit
    def _range(OFFS, w, num_q, S, N, PB, NPS, NP2: gl.constexpr, NW: gl.constexpr, BALANCED: gl.constexpr):
        """Work item w's (column block, P's first column, first row, end row, first expert, end expert): P's slice
        w % NPS (of PB columns), then with BALANCED row segment w' // num_q of S equal segments of all experts' rows
        (w' = w // NPS; the experts it meets: NW warps count them), else all of expert w' // num_q's rows. Its pieces
        are its rows of each expert in [first expert, end expert). The slices of one block are neighbours, so that
        their R rows come from L2."""
        p0 = (w % NPS) * PB
        w = w // NPS
        qb = w % num_q
        if BALANCED:
            M = gl.load(OFFS + N)
            lo = (w // num_q) * M // S
            hi = (w // num_q + 1) * M // S
            i = gl.arange(0, NP2, layout=gl.BlockedLayout([1], [32], [NW], [0]))
            ends = gl.load(OFFS + 1 + i, mask=i < N, other=M + 1)
            e0 = gl.sum((ends <= lo).to(gl.int32), axis=0)
            e1 = gl.maximum(e0, gl.sum((ends < hi).to(gl.int32), axis=0) + 1)
        else:
            e0 = w // num_q
            e1 = e0 + 1
            lo = gl.load(OFFS + e0)
            hi = gl.load(OFFS + e1)
        return qb, p0, lo, hi, e0, e1

    @gluon.jit
    def _piece(OFFS, e, lo, hi):
        """Expert e's rows within [lo, hi): (first row, end row); empty where end <= first."""
        return gl.maximum(lo, gl.load(OFFS + e)), gl.minimum(hi, gl.load(OFFS + e + 1))

    @gluon.jit
    def r_loader(R, stride_r, r_bufs, r_bufs2, r_full, r_empty, OFFS, TOK, Q, n_items, num_q, S, N, PB, NPS,
                 BALANCED: gl.constexpr, NP2: gl.constexpr, LW: gl.constexpr):
        """Every step's gathered R rows by cp.async, both halves of the column block, arriving on r_full."""
        RS: gl.constexpr = r_bufs.type.shape[0]
        BK: gl.constexpr = r_bufs.type.shape[1]
        BH: gl.constexpr = r_bufs.type.shape[2]
        # 16 bytes per thread and copy: BH / 8 threads along a row
        layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (BH // 8), BH // 8],
                                                warps_per_cta=[LW, 1], order=[1, 0])
        cols = gl.arange(0, BH, layout=gl.SliceLayout(0, layout))
        ks = gl.arange(0, BK, layout=gl.SliceLayout(1, layout))
        rc = 0  # steps loaded so far (the R ring)
        for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
            qb, p0, lo, hi, e0, e1 = _range(OFFS, w, num_q, S, N, PB, NPS, NP2, LW, BALANCED)
            c1 = qb * 2 * BH + cols
            c2 = c1 + BH
            for e in range(e0, e1):
                row0, end = _piece(OFFS, e, lo, hi)
                # each step's token indices are loaded one step ahead: the copies wait on them, and a load per step
                # issued just before its copies would put an L2 round trip between every two steps
                tok_next = gl.load(TOK + row0 + ks, mask=row0 + ks < end, other=0)
                for r in range(row0, end, BK):
                    rows = r + ks
                    rmask = rows < end
                    tok = tok_next
                    tok_next = gl.load(TOK + BK + rows, mask=BK + rows < end, other=0)
                    rrow = R + tok.to(gl.int64)[:, None] * stride_r
                    s = rc % RS
                    mbarrier.wait(r_empty.index(s), ((rc // RS) & 1) ^ 1)  # a fresh barrier passes phase 1
                    async_copy.async_load(r_bufs.index(s), rrow + c1[None, :],
                                          mask=rmask[:, None] & (c1 < Q)[None, :])
                    async_copy.async_load(r_bufs2.index(s), rrow + c2[None, :],
                                          mask=rmask[:, None] & (c2 < Q)[None, :])
                    async_copy.mbarrier_arrive(r_full.index(s), increment_count=False)
                    rc += 1

    @gluon.jit
    def l_loader(l_desc, l_desc2, c_desc, l_bufs, l_bufs2, c_bufs, l_full, l_empty, OFFS, n_items, num_q, S, N, PB,
                 NPS, BALANCED: gl.constexpr, NP2: gl.constexpr, SPLIT: gl.constexpr, FOLD: gl.constexpr):
        """Every step's L rows [BK, PB] of the item's slice of P by TMA (its second box with SPLIT; with FOLD 3 the
        rows of the router's gradient matrix too), arriving on l_full."""
        LS: gl.constexpr = l_bufs.type.shape[0]
        BK: gl.constexpr = l_bufs.type.shape[1]
        BE: gl.constexpr = l_bufs.type.shape[2]
        nbytes: gl.constexpr = (l_desc.block_type.nbytes + (l_desc2.block_type.nbytes if SPLIT else 0)
                                + (c_desc.block_type.nbytes if FOLD == 3 else 0))
        lc = 0  # steps loaded so far (the L ring)
        for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
            qb, p0, lo, hi, e0, e1 = _range(OFFS, w, num_q, S, N, PB, NPS, NP2, 1, BALANCED)
            for e in range(e0, e1):
                row0, end = _piece(OFFS, e, lo, hi)
                for r in range(row0, end, BK):
                    s = lc % LS
                    mbarrier.wait(l_empty.index(s), ((lc // LS) & 1) ^ 1)
                    mbarrier.expect(l_full.index(s), nbytes)
                    tma.async_load(l_desc, [r, p0], l_full.index(s), l_bufs.index(s))
                    if SPLIT:
                        tma.async_load(l_desc2, [r, p0 + BE], l_full.index(s), l_bufs2.index(s))
                    if FOLD == 3:
                        tma.async_load(c_desc, [r, 0], l_full.index(s), c_bufs.index(s))
                    lc += 1

    @gluon.jit
    def _products(acc, acc2, acc3, ALL: gl.constexpr, SPLIT: gl.constexpr, FOLD: gl.constexpr):
        """acc, acc2 (SPLIT) and acc3 (FOLD 3) once every wgmma issued on them is done (ALL), or every one but the
        last step's (one per accumulator in use)."""
        if SPLIT and FOLD == 3:
            acc, acc2, acc3 = warpgroup_mma_wait(num_outstanding=0 if ALL else 3, deps=(acc, acc2, acc3))
        elif SPLIT:
            acc, acc2 = warpgroup_mma_wait(num_outstanding=0 if ALL else 2, deps=(acc, acc2))
        elif FOLD == 3:
            acc, acc3 = warpgroup_mma_wait(num_outstanding=0 if ALL else 2, deps=(acc, acc3))
        else:
            acc = warpgroup_mma_wait(num_outstanding=0 if ALL else 1, deps=(acc, ))
        return acc, acc2, acc3

    @gluon.jit
    def _router_sums(acc, acc3, pc, fold_p, scale):
        """FOLD 3: acc plus the piece's router term, column 0 of acc3 (R^T times the gradient matrix: the sum over
        the piece's rows of the gate gradient times R's row) times scale, on its columns before fold_p."""
        c3 = gl.arange(0, acc3.type.shape[1], layout=gl.SliceLayout(0, acc3.type.layout))
        v = gl.sum(gl.where(c3[None, :] == 0, acc3, 0.0), axis=1) * scale
        v = gl.convert_layout(v, gl.SliceLayout(1, acc.type.layout))
        return acc + gl.where(pc[None, :] < fold_p, v[:, None], 0.0)

    @gluon.jit
    def _dw_out(acc, pc, qc, e, row0, OFFS, COEF, fold_p, DW, stride_de, stride_dp, stride_dq, P, Q,
                BALANCED: gl.constexpr, FOLD: gl.constexpr):
        """A consumer's block of dW[e]^T ([q, p]: rows qc, columns pc) into dW: FOLD 2's COEF[e] added to the
        columns before fold_p by the piece holding the expert's first row, then relaxed fp32 atomic adds (BALANCED)
        or stores."""
        if FOLD == 2:
            if row0 == gl.load(OFFS + e):
                v = gl.load(COEF + e.to(gl.int64) * Q + qc, mask=qc < Q, other=0.0)
                acc += gl.where(pc[None, :] < fold_p, v[:, None], 0.0)
        ptrs = DW + e.to(gl.int64) * stride_de + pc[None, :] * stride_dp + qc[:, None] * stride_dq
        omask = (pc < P)[None, :] & (qc < Q)[:, None]
        if BALANCED:
            gl.atomic_add(ptrs, acc, mask=omask, sem="relaxed")
        else:
            gl.store(ptrs, acc.to(DW.dtype.element_ty), mask=omask)

    @gluon.jit
    def _dw_reduce(acc, o_smem, o_desc, c0, q0, pc, qc, e, row0, OFFS, COEF, fold_p, P, Q, FOLD: gl.constexpr,
                   OUT_T: gl.constexpr, PENDING: gl.constexpr):
        """_dw_out's block added by a TMA reduce from shared memory (TMA_OUT), P's columns c0.. of it: once the
        reduce issued PENDING + 1 blocks ago has read o_smem, the block goes there (transposed with OUT_T, for a dW
        whose Q is contiguous) and one thread issues its add; the consumer moves on while it runs."""
        if FOLD == 2:
            if row0 == gl.load(OFFS + e):
                v = gl.load(COEF + e.to(gl.int64) * Q + qc, mask=qc < Q, other=0.0)
                acc += gl.where(pc[None, :] < fold_p, v[:, None], 0.0)
        tma.store_wait(PENDING)
        if OUT_T:
            o_smem.store(gl.permute(acc, (1, 0)).to(o_smem.dtype))
            fence_async_shared()
            tma.async_atomic_add(o_desc, [e * P + c0, q0], o_smem)
        else:
            o_smem.store(acc.to(o_smem.dtype))
            fence_async_shared()
            tma.async_atomic_add(o_desc, [q0, e * P + c0], o_smem)

    @gluon.jit
    def consumer(l_bufs, l_bufs2, c_bufs, r_bufs, l_full, l_empty, r_full, r_empty, OFFS, COEF, fold_p, scale, DW,
                 stride_de, stride_dp, stride_dq, P, Q, n_items, num_q, S, N, PB, NPS, o_smem, o_smem2, o_desc,
                 o_desc2, which: gl.constexpr, BALANCED: gl.constexpr, NP2: gl.constexpr, FOLD: gl.constexpr,
                 SPLIT: gl.constexpr, TMA_OUT: gl.constexpr, OUT_T: gl.constexpr, ONE_STAGING: gl.constexpr):
        LS: gl.constexpr = l_bufs.type.shape[0]
        BK: gl.constexpr = l_bufs.type.shape[1]
        BE: gl.constexpr = l_bufs.type.shape[2]
        BE2: gl.constexpr = l_bufs2.type.shape[2]
        RS: gl.constexpr = r_bufs.type.shape[0]
        BH: gl.constexpr = r_bufs.type.shape[2]
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BE, 16])
        acc_l2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BE2, 16])
        BC: gl.constexpr = c_bufs.type.shape[2]
        acc_l3: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BC, 16])
        lc = 0  # L ring steps taken
        rc = 0  # R ring steps taken
        for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
            qb, p0, lo, hi, e0, e1 = _range(OFFS, w, num_q, S, N, PB, NPS, NP2, 4, BALANCED)
            q0 = qb * 2 * BH + which * BH
            for e in range(e0, e1):
                row0, end = _piece(OFFS, e, lo, hi)
                if (row0 < end) or (not BALANCED):  # (whole experts: an empty one's zeros are stored too)
                    # dW[e]^T's [BH, PB] block: R^T (this consumer's columns of R) @ L, each step's wgmma done before
                    # the next step's slots are awaited
                    acc = gl.zeros((BH, BE), dtype=gl.float32, layout=acc_l)
                    acc2 = gl.zeros((BH, BE2), dtype=gl.float32, layout=acc_l2)
                    acc3 = gl.zeros((BH, BC), dtype=gl.float32, layout=acc_l3)  # FOLD 3's router sums
                    for r in range(row0, end, BK):
                        s = rc % RS
                        sl = lc % LS
                        if r > row0:
                            # the previous step's slots go back before this step's rows are awaited: a consumer that
                            # waits for R then holds no slot, and the loader keeps RS steps in flight, not RS - 1 (the
                            # gathered rows' latency bounds this kernel at 8B; docs/kernels.md v40: launch -5 to -9%,
                            # 8B ReLU layer -0.27 ms over six rounds)
                            acc, acc2, acc3 = _products(acc, acc2, acc3, True, SPLIT, FOLD)
                            mbarrier.arrive(r_empty.index((rc + RS - 1) % RS), count=1)
                            mbarrier.arrive(l_empty.index((lc + LS - 1) % LS), count=1)
                        mbarrier.wait(r_full.index(s), (rc // RS) & 1)
                        mbarrier.wait(l_full.index(sl), (lc // LS) & 1)
                        fence_async_shared()  # the cp.async writes (generic proxy) before wgmma's reads (async proxy)
                        rt = r_bufs.index(s).permute((1, 0))
                        acc = warpgroup_mma(rt, l_bufs.index(sl), acc, is_async=True)
                        if SPLIT:
                            acc2 = warpgroup_mma(rt, l_bufs2.index(sl), acc2, is_async=True)
                        if FOLD == 3:
                            acc3 = warpgroup_mma(rt, c_bufs.index(sl), acc3, is_async=True)
                        # (tensors again for the loop; this step's products run on)
                        acc, acc2, acc3 = _products(acc, acc2, acc3, False, SPLIT, FOLD)
                        rc += 1
                        lc += 1
                    acc, acc2, acc3 = _products(acc, acc2, acc3, True, SPLIT, FOLD)
                    if row0 < end:
                        mbarrier.arrive(r_empty.index((rc + RS - 1) % RS), count=1)
                        mbarrier.arrive(l_empty.index((lc + LS - 1) % LS), count=1)
                    pc = p0 + gl.arange(0, BE, layout=gl.SliceLayout(0, acc_l))
                    qc = q0 + gl.arange(0, BH, layout=gl.SliceLayout(1, acc_l))
                    pc2 = p0 + BE + gl.arange(0, BE2, layout=gl.SliceLayout(0, acc_l2))
                    qc2 = q0 + gl.arange(0, BH, layout=gl.SliceLayout(1, acc_l2))
                    if FOLD == 3:  # every piece adds its own rows' share of the router's term
                        acc = _router_sums(acc, acc3, pc, fold_p, scale)
                        if SPLIT:
                            acc2 = _router_sums(acc2, acc3, pc2, fold_p, scale)
                    if TMA_OUT:
                        # (ONE_STAGING: both boxes through one buffer, each reduce done reading before the next store)
                        _dw_reduce(acc, o_smem, o_desc, p0, q0, pc, qc, e, row0, OFFS, COEF, fold_p, P, Q, FOLD, OUT_T,
                                   1 if SPLIT and not ONE_STAGING else 0)
                        if SPLIT:
                            _dw_reduce(acc2, o_smem2, o_desc2, p0 + BE, q0, pc2, qc2, e, row0, OFFS, COEF, fold_p, P, Q,
                                       FOLD, OUT_T, 0 if ONE_STAGING else 1)
                    else:
                        _dw_out(acc, pc, qc, e, row0, OFFS, COEF, fold_p, DW, stride_de, stride_dp, stride_dq, P, Q,
                                BALANCED, FOLD)
                        if SPLIT:
                            _dw_out(acc2, pc2, qc2, e, row0, OFFS, COEF, fold_p, DW, stride_de, stride_dp, stride_dq,
                                    P, Q, BALANCED, FOLD)
        if TMA_OUT:
            tma.store_wait(0)  # the reduces have read o_smem before the program ends

    @gluon.jit
    def wgrad_ws_kernel(R, stride_r, l_desc, l_desc2, c_desc, OFFS, TOK, COEF, fold_p, scale, DW, stride_de,
                        stride_dp, stride_dq, P, Q, n_items, num_q, S, N, PB, NPS, o_desc, o_desc2,
                        BALANCED: gl.constexpr, NP2: gl.constexpr, TMA_OUT: gl.constexpr, OUT_T: gl.constexpr,
                        FOLD: gl.constexpr, SPLIT: gl.constexpr, BH: gl.constexpr,
                        LS: gl.constexpr, RS: gl.constexpr, ONE_STAGING: gl.constexpr, LW: gl.constexpr,
                        CREGS: gl.constexpr, LREGS: gl.constexpr,
                        L_REGS: gl.constexpr, num_warps: gl.constexpr):
        dtype: gl.constexpr = l_desc.dtype
        BK: gl.constexpr = l_desc.block_type.shape[0]
        r_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BK, BH], dtype)
        r_bufs = gl.allocate_shared_memory(dtype, [RS, BK, BH], r_layout)
        r_bufs2 = gl.allocate_shared_memory(dtype, [RS, BK, BH], r_layout)
        l_bufs = gl.allocate_shared_memory(dtype, [LS] + l_desc.block_type.shape, l_desc.layout)
        l_bufs2 = gl.allocate_shared_memory(dtype, [LS] + l_desc2.block_type.shape, l_desc2.layout)
        # FOLD 3: the router's gradient matrix's rows beside L's (a token buffer otherwise)
        CB: gl.constexpr = c_desc.block_type.shape if FOLD == 3 else [16, 16]
        c_layout: gl.constexpr = c_desc.layout if FOLD == 3 else gl.NVMMASharedLayout.get_default_for([16, 16], dtype)
        c_bufs = gl.allocate_shared_memory(dtype, [LS if FOLD == 3 else 1] + CB, c_layout)
        r_full = gl.allocate_shared_memory(gl.int64, [RS, 1], mbarrier.MBarrierLayout())
        r_empty = gl.allocate_shared_memory(gl.int64, [RS, 1], mbarrier.MBarrierLayout())
        l_full = gl.allocate_shared_memory(gl.int64, [LS, 1], mbarrier.MBarrierLayout())
        l_empty = gl.allocate_shared_memory(gl.int64, [LS, 1], mbarrier.MBarrierLayout())
        # each consumer's staging of its dW blocks for the TMA reduce (TMA_OUT; a token buffer otherwise)
        OB: gl.constexpr = o_desc.block_type.shape if TMA_OUT else [16, 16]
        OB2: gl.constexpr = o_desc2.block_type.shape if TMA_OUT else [16, 16]
        o_dtype: gl.constexpr = o_desc.dtype if TMA_OUT else gl.float32  # the reduces' target: fp32, or dW's half
        o_layout: gl.constexpr = (o_desc.layout if TMA_OUT
                                  else gl.NVMMASharedLayout.get_default_for([16, 16], gl.float32))
        o_a = gl.allocate_shared_memory(o_dtype, OB, o_layout)
        o_b = gl.allocate_shared_memory(o_dtype, OB, o_layout)
        if ONE_STAGING:  # each consumer's second box through its first's buffer (equal boxes: 8B's)
            o_a2 = o_a
            o_b2 = o_b
        else:
            o_a2 = gl.allocate_shared_memory(o_dtype, OB2, o_layout)
            o_b2 = gl.allocate_shared_memory(o_dtype, OB2, o_layout)
        for i in gl.static_range(RS):
            mbarrier.init(r_full.index(i), count=32 * LW)  # every loader thread's cp.async arrival
            mbarrier.init(r_empty.index(i), count=2)  # both consumers
        for i in gl.static_range(LS):
            mbarrier.init(l_full.index(i), count=1)
            mbarrier.init(l_empty.index(i), count=2)
        # the tuples inline: a constexpr bound to a name first would become a tensor (the partitions' flags must
        # stay compile-time constants)
        gl.warp_specialize([
            (consumer, (l_bufs, l_bufs2, c_bufs, r_bufs, l_full, l_empty, r_full, r_empty, OFFS, COEF, fold_p, scale,
                        DW, stride_de, stride_dp, stride_dq, P, Q, n_items, num_q, S, N, PB, NPS, o_a, o_a2, o_desc,
                        o_desc2, 0, BALANCED, NP2, FOLD, SPLIT, TMA_OUT, OUT_T, ONE_STAGING)),
            (consumer, (l_bufs, l_bufs2, c_bufs, r_bufs2, l_full, l_empty, r_full, r_empty, OFFS, COEF, fold_p,
                        scale, DW, stride_de, stride_dp, stride_dq, P, Q, n_items, num_q, S, N, PB, NPS, o_b, o_b2,
                        o_desc, o_desc2, 1, BALANCED, NP2, FOLD, SPLIT, TMA_OUT, OUT_T, ONE_STAGING)),
            (r_loader, (R, stride_r, r_bufs, r_bufs2, r_full, r_empty, OFFS, TOK, Q, n_items, num_q, S, N, PB, NPS,
                        BALANCED, NP2, LW)),
            (l_loader, (l_desc, l_desc2, c_desc, l_bufs, l_bufs2, c_bufs, l_full, l_empty, OFFS, n_items, num_q, S, N,
                        PB, NPS, BALANCED, NP2, SPLIT, FOLD)),
        ], [4, LW, 1], [CREGS, LREGS, L_REGS])

    def out_descriptors(out2d, boxes):
        """TMA descriptors of dW's 2-D view (`out_view`, fp32 or dW's bf16/fp16) in each box shape of `boxes`,
        unswizzled (a box's inner dimension is up to 128 columns, past the 128-byte swizzles)."""
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8 * out2d.element_size(), rank=2)
        return tuple(TensorDescriptor.from_tensor(out2d, list(b), layout) for b in boxes)

    return wgrad_ws_kernel, out_descriptors


def smem_bytes(BK: int, BQ: int, P2: int, l_stages: int, r_stages: int, element_size: int = 2,
               tma_out: bool = False, out_size: int = 4, fold_cols: int = 0, one_staging: bool = False) -> int:
    """Shared memory of one program: the L ring (slots of BK x P2, P2 = P's boxes, plus fold_cols: FOLD 3's
    gradient matrix), the R ring (BK x BQ), with tma_out the consumers' staging of their dW blocks (BQ x P2 in all,
    out_size bytes each; half that with one_staging: two equal boxes through one buffer), and the barriers."""
    staging = BQ * P2 * out_size // (2 if one_staging else 1) if tma_out else 0
    return (l_stages * BK * (P2 + fold_cols) + r_stages * BK * BQ) * element_size + staging + 1024


def out_view(dw: torch.Tensor, P: int, target: torch.dtype = torch.float32):
    """(dW [N, P, Q] as a 2-D matrix a TMA reduce can address, whether Q is its contiguous dimension) or None:
    P contiguous with experts side by side (W_out's [N, E, D] column view: [Q, N * P]), or Q contiguous with
    experts stacked ([N * P, Q]); rows 16-byte aligned in the reduces' `target` dtype (dW itself when of that
    dtype, else a fresh buffer with dW's strides)."""
    N, _, Q = dw.shape
    if dw.dtype == target and dw.data_ptr() % 16:
        return None
    align = 16 // target.itemsize
    sde, sdp, sdq = dw.stride()
    if sdp == 1 and sde == P and sdq % align == 0:
        return dw.as_strided((Q, N * P), (sdq, 1)), False
    if sdq == 1 and sde == P * sdp and sdp % align == 0:
        return dw.as_strided((N * P, Q), (sdp, 1)), True
    return None


def serves(lhs: torch.Tensor, rhs: torch.Tensor, dw_dtype: torch.dtype, fold: int, balanced: bool, BQ: int, BK: int,
           l_stages: int, r_stages: int, be: int, be2: int, tma_out: bool = False) -> bool:
    """Whether this kernel takes the left operand lhs [M, P] (rows in expert order), the token-major right operand rhs
    [T, Q] (gathered in the kernel) and a dW of `dw_dtype` with this tile: sm_90, bf16 or fp16 operands, P's boxes be +
    be2 (powers of two, wgmma's N, each at most 128: the consumers' accumulators in the 16-warp layout, WARPS;
    `tile_configs.ws_boxes`), a wider P in slices of be + be2 columns (one work item each), BQ = 128 (a 64-row wgmma
    per consumer), BK a power of two in 16..128, lhs's rows contiguous and 16-byte aligned, rhs's rows contiguous with Q
    a multiple of 16 (Triton's specialisation then proves the copies 16 bytes wide, as cp.async needs), for whole
    experts (not `balanced`) a dW of fp32, bf16 or fp16 to store into; balanced items add into an fp32 buffer (or dW
    itself when fp32; dw_dtype is then the target of their adds), or with `tma_out` into a bf16/fp16 dW itself
    (`switches.sums_dtype`); FOLD 0, 2 or 3, two or more slots in each ring, the buffers within shared memory
    (with `tma_out`, for balanced items only, the reduces' staging too, and each slice of P exactly its boxes: a box
    must not reach into the next expert's rows), and a Triton whose Gluon builds the kernel."""
    M, P = lhs.shape
    es = lhs.element_size()
    if not down_gluon._sm90(lhs) or lhs.dtype not in (torch.bfloat16, torch.float16) or rhs.dtype != lhs.dtype:
        return False
    if dw_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if balanced and dw_dtype != torch.float32 and not tma_out:  # (relaxed atomics add in fp32 only)
        return False
    if fold not in (0, 2, 3) or min(l_stages, r_stages) < 2 or M == 0 or BQ != 128:
        return False
    if BK & (BK - 1) or not 16 <= BK <= 128:
        return False
    if max(be, be2) > 128 or lhs.stride(1) != 1 or (lhs.stride(0) * es) % 16 or lhs.data_ptr() % 16:
        return False
    Q = rhs.shape[1]
    if rhs.stride(1) != 1 or (rhs.stride(0) * es) % 16 or Q % 16 or rhs.data_ptr() % 16:
        return False
    if tma_out and (not balanced or P % (be + be2)):  # (each slice of P exactly its boxes)
        return False
    fold_cols = score_grad.ROW_WIDTH if fold == 3 else 0
    return (smem_bytes(BK, BQ, be + max(be2, 16), l_stages, r_stages, es, tma_out, dw_dtype.itemsize, fold_cols,
                       be == be2) <= down_gluon.SMEM_LIMIT
            and _build_once() is not None)


def _build_once():
    return down_gluon.built_once(_STATE, _build)


def segments(M: int, num_q: int, min_rows: int, sms: int) -> int:
    """How many equal row segments the balanced items cut all experts' M rows into: enough for one item per SM
    (times the num_q column blocks), none shorter than min_rows, and S * M within int32 (the kernel's segment bounds
    s * M // S)."""
    return max(1, min(sms // num_q, M // min_rows, (2 ** 31 - 1) // max(M, 1)))


def launch(lhs, rhs, offsets, token, coef, fold_p: int, out, fold: int, min_rows: int, BK: int, l_stages: int,
           r_stages: int, be: int, be2: int, tma_out: bool = False, rows=None, scale: float = 1.0):
    """The kernel, for each 128-column block of Q and slice of P (be + be2 columns), over balanced items (min_rows > 0:
    equal row segments of all experts' rows, `segments`; adds into the zeroed `out` [N, P, Q], any strides: relaxed fp32
    atomics, or with tma_out TMA reduces in out's dtype through `out_view`) or whole experts (stores into `out`). P's
    columns in boxes of be and be2 (0: one box). FOLD 2: coef [N, Q] fp32, the router's term per expert; FOLD 3: `rows`,
    the router's gradient matrix (kernels/score_grad.row_matrix, [M, ROW_WIDTH] in lhs's dtype), whose first column's
    products with R the kernel sums, times `scale`. The caller checked `serves`."""
    kernel, out_descriptors = _build_once()
    (M, P), Q, N = lhs.shape, rhs.shape[1], out.shape[0]
    num_q = -(-Q // 128)
    sms = down_gluon._sms(lhs.device)
    l_desc, l_desc2 = down_gluon.box_descriptors(lhs, ([BK, be], [BK, be2 or 16]))
    c_desc = down_gluon.box_descriptors(rows, ([BK, rows.shape[1]],))[0] if fold == 3 else None
    o_desc = o_desc2 = None
    out_t = False
    if tma_out:
        out2d, out_t = out_view(out, P, out.dtype)
        boxes = [(c, 64) if out_t else (64, c) for c in (be, be2 or 16)]
        o_desc, o_desc2 = out_descriptors(out2d, boxes)
    PB = be + be2  # P's slices: one item per slice of each block (SwiGLU 8B's dW1, P = 512: two of 128 + 128)
    NPS = -(-P // PB)
    S = segments(M, num_q * NPS, min_rows, sms) if min_rows else 1
    n_items = (S if min_rows else N) * num_q * NPS
    grid = (n_items if min_rows else max(1, min(n_items, sms)),)
    lw, cregs, lregs, l_regs, max_regs = WARPS
    kernel[grid](rhs, rhs.stride(0), l_desc, l_desc2, c_desc, offsets, token, coef, fold_p, float(scale), out,
                 out.stride(0), out.stride(1), out.stride(2), P, Q, n_items, num_q, S, N, PB, NPS, o_desc, o_desc2,
                 BALANCED=min_rows > 0, NP2=1 << (N - 1).bit_length(), TMA_OUT=tma_out, OUT_T=out_t, FOLD=fold,
                 SPLIT=be2 > 0, BH=64,
                 LS=l_stages, RS=r_stages, ONE_STAGING=tma_out and be == be2, LW=lw, CREGS=cregs, LREGS=lregs,
                 L_REGS=l_regs, num_warps=4, maxnreg=max_regs)
