"""up_bwd (kernels/up.py's backward GEMM and epilogue) as a warp-specialised Gluon kernel (Hopper; up_bwd variant 5,
WS).

From dy's gathered rows, W2 and the saved pre-activation h, for the expert-sorted rows r of each M-tile:
da = dy[token r] @ W2[e]^T, then dh = gate · da · act'(h) (stored), gate · act(h) (stored: dW2's left operand),
the per-pair gate gradient Σ_j da · act(h) (one fp32 row of partials), and db1's column sums (fp32 atomics).

kernels/up.py runs this as one Triton program per (M-tile, 64-column block) at base: the gathered dy rows are read
once per column block, each program's loads wait on each other, and the epilogue's global load of h and its stores
run while the tensor cores idle (142 µs of the base ReLU layer's 677, ≈ 200 TF/s; docs/kernels.md v26). Here
persistent programs, one per SM, walk the expert-order M-tile table as kernels/mlp_gluon.py's fused forward does,
and share its parts:

- an **x loader** warpgroup gathers the tile's dy rows ([BM, BK] per reduction step) with cp.async
  (`mlp_gluon`'s x_loader);
- a **weight loader** warp issues W2's tiles ([E, BK] per reduction step, both of E's column tiles) into a ring
  by TMA, and once per M-tile the tile's rows of h ([BM, E], contiguous sorted rows) into a buffer of their own:
  after the tile's first ring-depth W tiles, i.e. once the consumers have left the previous tile's reduction, so
  h is in shared memory when the epilogue starts. Just before that, while the consumers finish the previous tile,
  it writes a chunk of its program's share of the zeros the next launch (down for dx) adds into (`fill`);
- two **consumer** warpgroups each take half of the tile's rows and share every W tile (`mlp_gluon`'s up GEMM, one
  reduction step of wgmma in flight), then run the epilogue from the accumulator's layout with h read from
  shared memory. dh and gate · a leave by 4-byte stores of the accumulator's column pairs, or with
  SSD_TRITON_UP_BWD_TMA_STORES=1 by TMA stores from h's slot (`_put`).

Opt-in (a forced config). On the H100 at base ReLU it took 144.5 µs against kernels/up.py's 142.3, the layer 0.671
against 0.665 ms (docs/kernels.md v27): the reduction runs at the fused forward's pace, and the epilogue, which both
consumers run at once on the same tile, leaves the tensor cores idle. The TMA stores are not timed yet.

Serves activations without a gate, bf16/fp16, sm_90, E = BE + BE2 with BE <= 128 (192 = 128 + 64), D a multiple
of BK, W2 as one 2-D matrix in either layout (`common.expert_matrix`), h one contiguous [M, E] matrix, and the
buffers within shared memory (`serves`); `_triton_kernels.up_backward` takes kernels/up.py elsewhere.

ptxas compiles every partition within the launch's 128 registers per thread (mlp_gluon.MAX_REGS), and the
consumers hold both of E's accumulators (96 at base) into the epilogue: at base with ReLU 8 bytes of stack (the
fused forward's), with squared ReLU without db1 168, with GELU 448 (erf, for act and act' both).

Needs Triton >= 3.9 (down_gluon.MIN_TRITON). Gluon has no interpreter: on CPU the offline compile for sm_90 and the
launcher's choice are tested (tests/backends/test_up_bwd_gluon.py); tests/backends/test_backends_gpu.py
(`up_bwd_ws`) checks the results on the GPU.
"""
from __future__ import annotations

import torch
import triton

from . import down_gluon, mlp_gluon

# registers per thread (setmaxnreg): the worker consumer, the loader warpgroup (dy gathers and W2's TMA), the
# epilogue warpgroup (its four unrolled row steps: at 128 registers it spilled 320 bytes, offline sm_90); the default
# partition (the other consumer) gets the rest of the 64 K, 512 - 128 - 40 - 216 = 128
CONSUMER_REGS, LOADER_REGS, EPILOGUE_REGS = 128, 40, 216
FILL_BLOCK = 1024  # elements per store of the fill (one warpgroup, 16 bytes per thread)
_STATE: dict = {"build": None}


def _build():
    # module-global: Gluon resolves the helpers' `gl.constexpr` annotations in the module's globals
    global gl
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    down_gluon.require_gluon("WS up_bwd", cp_async=True)
    forward = mlp_gluon._build_once()
    if forward is None:
        raise ImportError("the WS fused forward's parts, which this kernel shares, do not build here")
    _, descriptors, parts = forward
    _x_layout, _x_rows, _x_step, _w_load, _up_gemm, _act, _rings = (
        parts.x_layout, parts.x_rows, parts.x_step, parts.w_load, parts.up_gemm, parts.act, parts.rings)

    @gluon.jit
    def _act_grad(v, ACT: gl.constexpr):
        """act'(v) in fp32 (kernels/common.py `_act_grad` for mlp_gluon.ACTS)."""
        if ACT == 0:
            out = gl.where(v > 0.0, 1.0, 0.0)
        elif ACT == 1:
            cdf = 0.5 * (1.0 + gl.erf(v * 0.7071067811865476))
            out = cdf + v * gl.exp(-0.5 * v * v) * 0.3989422804014327
        elif ACT == 2:
            out = 2.0 * gl.maximum(v, 0.0)
        else:  # 4: tanh-approximate GELU, tanh(u) = 2 sigmoid(2u) - 1
            u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
            t = 2.0 / (1.0 + gl.exp(-2.0 * u)) - 1.0
            out = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * v * v)
        return out

    @gluon.jit
    def _zeros(FILL, lo, hi):
        """FILL[lo:hi] = 0 from one warpgroup, 16 bytes per thread and store (FILL_BLOCK elements)."""
        BLOCK: gl.constexpr = 1024
        layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[BLOCK // 128], threads_per_warp=[32],
                                                warps_per_cta=[4], order=[0])
        offs = gl.arange(0, BLOCK, layout=layout)
        zero = gl.zeros((BLOCK, ), dtype=FILL.dtype.element_ty, layout=layout)
        for i in range(lo, hi, BLOCK):
            gl.store(FILL + i + offs, zero, mask=i + offs < hi)

    @gluon.jit
    def loader(X, stride_x, w_desc, w_desc2, x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty, TILES, OFFS,
               TOK, M, D, E, n_tiles, SPLIT: gl.constexpr, W_RC: gl.constexpr, BE: gl.constexpr,
               LW: gl.constexpr):
        """Both rings, in the consumers' order: per reduction step W2's tile [E, BK] by TMA, then the tile's dy rows
        [BM, BK] gathered by cp.async (`mlp_gluon`'s x loader and weight loader as one warpgroup: the epilogue
        warpgroup needs the fourth)."""
        XS: gl.constexpr = x_bufs.type.shape[0]
        BM: gl.constexpr = x_bufs.type.shape[1]
        BK: gl.constexpr = x_bufs.type.shape[2]
        WS: gl.constexpr = w_bufs.type.shape[0]
        layout: gl.constexpr = _x_layout(BK, LW)
        kc = 0  # reduction steps loaded so far (both rings)
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            e = gl.load(TILES + 2 * t)
            row0 = gl.load(TILES + 2 * t + 1)
            if row0 < M:
                xrow, rmask = _x_rows(X, stride_x, OFFS, TOK, e, row0, BM, layout)
                for k in range(0, D, BK):
                    s = kc % WS
                    mbarrier.wait(w_empty.index(s), ((kc // WS) & 1) ^ 1)  # a fresh barrier passes phase 1
                    _w_load(w_desc, w_desc2, e * E, k, w_full.index(s), w_bufs.index(s), w_bufs2.index(s), SPLIT,
                            W_RC, BE)
                    _x_step(x_bufs, x_full, x_empty, kc, xrow, rmask, k, layout)
                    kc += 1

    @gluon.jit
    def consumer(x_bufs, w_bufs, w_bufs2, da_buf, da_buf2, x_full, x_empty, w_full, w_empty, da_full, da_empty,
                 w_desc, w_desc2, TILES, M, D, n_tiles, which: gl.constexpr, SPLIT: gl.constexpr,
                 W_RC: gl.constexpr, BE: gl.constexpr, BE2: gl.constexpr):
        """Half of each M-tile's rows: da = dy rows @ W2[e]^T (`mlp_gluon`'s up GEMM over both of E's tiles, sharing
        every W2 tile with the other consumer), rounded to dy's dtype into the shared da tile once the epilogue
        warpgroup has finished the previous tile's; then straight on to the next tile's GEMM."""
        HM: gl.constexpr = x_bufs.type.shape[1] // 2
        dtype: gl.constexpr = da_buf.dtype
        up_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BE, 16])
        up_l2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BE2, 16])
        kc = 0  # x ring steps taken
        wc = 0  # weight ring tiles taken
        j = 0   # live M-tiles taken (the da tile's phase)
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            row0 = gl.load(TILES + 2 * t + 1)
            if row0 < M:
                acc, acc2, kc, wc = _up_gemm(x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty, w_desc,
                                             w_desc2, D, kc, wc, which, up_l, up_l2, SPLIT, W_RC, BE, BE2)
                mbarrier.wait(da_empty.index(0), (j & 1) ^ 1)
                da_buf.slice(which * HM, HM).store(acc.to(dtype))
                if SPLIT:
                    da_buf2.slice(which * HM, HM).store(acc2.to(dtype))
                mbarrier.arrive(da_full.index(0), count=1)  # both consumers arrive: count 2
                j += 1

    @gluon.jit
    def _rows(ORDER, GATE, r0, end, RC: gl.constexpr, lay: gl.constexpr):
        """Rows r0 .. r0 + RC of the tile, in the row slice of `lay`: (rows, the mask of those that are the tile's
        expert's, their pairs, their gates in fp32)."""
        rows = r0 + gl.arange(0, RC, layout=gl.SliceLayout(1, lay))
        rmask = rows < end
        pair = gl.load(ORDER + rows, mask=rmask, other=0)
        return rows, rmask, pair, gl.load(GATE + pair, mask=rmask, other=0.0).to(gl.float32)

    @gluon.jit
    def _box(da_s, H, stride_h, rows, rmask, g, c0, OUT, stride_o, GA, stride_ga, lay: gl.constexpr,
             ACT: gl.constexpr, STORE_GA: gl.constexpr):
        """One column box of RC rows (kernels/up.py `_up_epilogue`'s backward without a gate) from da in shared memory
        and h's rows: dh, and gate * a, stored (16 bytes per thread, rows masked); returns (the rows' share of the
        gate gradient sum_j da * a, db1's column sums of dh)."""
        BC: gl.constexpr = da_s.type.shape[1]
        dtype: gl.constexpr = da_s.dtype
        cols = c0 + gl.arange(0, BC, layout=gl.SliceLayout(0, lay))
        r64 = rows.to(gl.int64)[:, None]
        hf = gl.load(H + r64 * stride_h + cols[None, :], mask=rmask[:, None], other=0.0).to(gl.float32)
        da = da_s.load(lay).to(gl.float32)
        a = _act(hf, ACT).to(dtype).to(gl.float32)  # rounded where a torch matmul + activation would
        dg = gl.sum(da * a, 1)
        dh = (da * g[:, None] * _act_grad(hf, ACT)).to(dtype)
        gl.store(OUT + r64 * stride_o + cols[None, :], dh, mask=rmask[:, None])
        if STORE_GA:
            gl.store(GA + r64 * stride_ga + cols[None, :], (a * g[:, None]).to(dtype), mask=rmask[:, None])
        return dg, gl.sum(gl.where(rmask[:, None], dh.to(gl.float32), 0.0), 0)

    @gluon.jit
    def epilogue(da_buf, da_buf2, da_full, da_empty, TILES, OFFS, ORDER, GATE, H, stride_h, OUT, stride_o, GA,
                 stride_ga, DGP, DB, stride_db, FILL, fill_numel, fill_share, fill_chunk, M, E, n_tiles,
                 ACT: gl.constexpr, STORE_GA: gl.constexpr, HAS_DB: gl.constexpr, HAS_FILL: gl.constexpr,
                 SPLIT: gl.constexpr, BE: gl.constexpr, BE2: gl.constexpr, TPC: gl.constexpr, RC: gl.constexpr):
        """Each M-tile's epilogue while the consumers run the next tile's GEMM: per RC rows, h's rows loaded (the
        next rows' in flight during this step's work), both column boxes (`_box`), the gate gradient's partials
        stored by pair; da's tile released once read; db1's sums by one fp32 atomic per column and tile; then a
        chunk of this program's share of the fill."""
        BM: gl.constexpr = da_buf.type.shape[0]
        # one layout for both boxes (16 bytes per thread along a row, TPC threads), so that their row sums add
        lay: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // TPC, TPC],
                                             warps_per_cta=[4, 1], order=[1, 0])
        done = gl.program_id(0) * fill_share  # the fill: this program's share [its start, hi), written up to `done`
        hi = done + fill_share
        if hi > fill_numel:
            hi = fill_numel
        j = 0  # live M-tiles so far (the barriers' phase)
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            e = gl.load(TILES + 2 * t)
            row0 = gl.load(TILES + 2 * t + 1)
            if row0 < M:
                end = gl.load(OFFS + e + 1)
                rows, rmask, pair, g = _rows(ORDER, GATE, row0, end, RC, lay)
                db = gl.zeros((BE, ), dtype=gl.float32, layout=gl.SliceLayout(0, lay))
                db2 = gl.zeros((BE2, ), dtype=gl.float32, layout=gl.SliceLayout(0, lay))
                mbarrier.wait(da_full.index(0), j & 1)
                for c in gl.static_range(0, BM, RC):
                    if c + RC < BM:  # the next rows' pairs and gates in flight during this step
                        nxt = _rows(ORDER, GATE, row0 + c + RC, end, RC, lay)
                    dg, s = _box(da_buf.slice(c, RC), H, stride_h, rows, rmask, g, 0, OUT, stride_o, GA, stride_ga, lay, ACT,
                                 STORE_GA)
                    db += s
                    if SPLIT:
                        dg2, s2 = _box(da_buf2.slice(c, RC), H, stride_h, rows, rmask, g, BE, OUT, stride_o, GA, stride_ga,
                                       lay, ACT, STORE_GA)
                        dg += dg2
                        db2 += s2
                    gl.store(DGP + pair, dg, mask=rmask)
                    if c + RC < BM:
                        rows, rmask, pair, g = nxt
                mbarrier.arrive(da_empty.index(0), count=1)  # da read: the consumers may write the next tile's
                if HAS_DB:
                    dst = DB + e.to(gl.int64) * stride_db
                    gl.atomic_add(dst + gl.arange(0, BE, layout=gl.SliceLayout(0, lay)), db, sem="relaxed")
                    if SPLIT:
                        gl.atomic_add(dst + BE + gl.arange(0, BE2, layout=gl.SliceLayout(0, lay)), db2, sem="relaxed")
                if HAS_FILL:
                    stop = done + fill_chunk
                    if stop > hi:
                        stop = hi
                    _zeros(FILL, done, stop)
                    done = stop
                j += 1
        if HAS_FILL:
            _zeros(FILL, done, hi)

    @gluon.jit
    def up_bwd_ws_kernel(X, stride_x, w_desc, w_desc2, TILES, OFFS, ORDER, TOK, GATE, H, stride_h, OUT, stride_o, GA,
                         stride_ga, DGP, DB, stride_db, FILL, fill_numel, fill_share, fill_chunk, M, D, E, n_tiles,
                         ACT: gl.constexpr, STORE_GA: gl.constexpr, HAS_DB: gl.constexpr, HAS_FILL: gl.constexpr,
                         SPLIT: gl.constexpr, W_RC: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
                         BE: gl.constexpr, BE2: gl.constexpr, TPC: gl.constexpr, RC: gl.constexpr,
                         XS: gl.constexpr, WS: gl.constexpr, LW: gl.constexpr, CREGS: gl.constexpr,
                         LREGS: gl.constexpr, EREGS: gl.constexpr, num_warps: gl.constexpr):
        dtype: gl.constexpr = w_desc.dtype
        x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty = _rings(w_desc, w_desc2, BM, BK, XS, WS, LW)
        # da's M-tile, one box per E tile (the second at least 16 columns), in the layouts TMA would use
        da_buf = gl.allocate_shared_memory(dtype, [BM, BE], gl.NVMMASharedLayout.get_default_for([BM, BE], dtype))
        da_buf2 = gl.allocate_shared_memory(dtype, [BM, BE2], gl.NVMMASharedLayout.get_default_for([BM, BE2], dtype))
        da_full = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        da_empty = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(da_full.index(0), count=2)
        mbarrier.init(da_empty.index(0), count=1)
        # the tuples inline: a constexpr bound to a name first would become a tensor (the partitions' flags must
        # stay compile-time constants)
        gl.warp_specialize([
            (consumer, (x_bufs, w_bufs, w_bufs2, da_buf, da_buf2, x_full, x_empty, w_full, w_empty, da_full, da_empty,
                        w_desc, w_desc2, TILES, M, D, n_tiles, 0, SPLIT, W_RC, BE, BE2)),
            (consumer, (x_bufs, w_bufs, w_bufs2, da_buf, da_buf2, x_full, x_empty, w_full, w_empty, da_full, da_empty,
                        w_desc, w_desc2, TILES, M, D, n_tiles, 1, SPLIT, W_RC, BE, BE2)),
            (loader, (X, stride_x, w_desc, w_desc2, x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty, TILES,
                      OFFS, TOK, M, D, E, n_tiles, SPLIT, W_RC, BE, LW)),
            (epilogue, (da_buf, da_buf2, da_full, da_empty, TILES, OFFS, ORDER, GATE, H, stride_h, OUT, stride_o, GA,
                        stride_ga, DGP, DB, stride_db, FILL, fill_numel, fill_share, fill_chunk, M, E, n_tiles, ACT,
                        STORE_GA, HAS_DB, HAS_FILL, SPLIT, BE, BE2, TPC, RC)),
        ], [4, LW, 4], [CREGS, LREGS, EREGS])

    return up_bwd_ws_kernel, descriptors


def smem_bytes(BM: int, BK: int, be: int, be2: int, stages: int, w_stages: int, element_size: int = 2) -> int:
    """Shared memory of one program: the x ring, the weight ring (slots of E x BK), the da tile (a second box of at
    least 16 columns) and 4 kB for the epilogue's column sums and the barriers."""
    return (stages * BM * BK + w_stages * (be + be2) * BK + BM * (be + max(be2, 16))) * element_size + 4 * 1024


def serves(dy: torch.Tensor, w2: torch.Tensor, h: torch.Tensor, act: int, glu: bool, fill, BM: int, BK: int,
           w_stages: int, stages: int, be: int, be2: int) -> bool:
    """Whether this kernel takes dy [T, D], W2 [N, E, D] and h [M, E] with this tile: the fused forward's conditions
    on the gathered operand, the weights, the activation and the tile (`mlp_gluon.serves` with W2 in W1's place),
    h one contiguous [M, E] matrix with 16-byte aligned rows, and `fill` (the zeros' target, or None) contiguous,
    16-byte aligned and under 2^31 elements; the buffers within shared memory."""
    M = h.shape[0]
    if M == 0 or h.dtype != dy.dtype or h.stride() != (w2.shape[1], 1) or h.data_ptr() % 16:
        return False
    if fill is not None and (not fill.is_contiguous() or fill.data_ptr() % 16 or fill.numel() >= 2 ** 31):
        return False
    if not mlp_gluon.serves(dy, w2, w2, act, glu, BM, BK, BK, w_stages, stages, be, be2):
        return False
    return smem_bytes(BM, BK, be, be2, stages, w_stages, dy.element_size()) <= down_gluon.SMEM_LIMIT \
        and _build_once() is not None


def _build_once():
    return down_gluon.built_once(_STATE, _build)


def launch(dy, w2, h, tiles, offsets, order, token, gate, dh, ga, dgp, db, fill, act: int, BM: int, BK: int,
           w_stages: int, stages: int, be: int, be2: int):
    """The kernel over `tiles` ([n, 2] int32 (expert, first row), first row M = empty) with persistent programs,
    one per SM: dh, ga (or None), the gate gradient's one row of partials dgp [1, M] (by pair), db1's fp32 sums db
    (zeroed; or None) and `fill` (or None) zeroed. The caller checked `serves`."""
    kernel, descriptors = _build_once()
    N, E, D = w2.shape
    M = h.shape[0]
    w2d, rc, boxes = mlp_gluon._boxes(w2, (be, be2), BK)
    d, d2 = descriptors(w2d, boxes, dy.dtype)
    n_tiles = tiles.shape[0]
    grid = max(1, min(n_tiles, down_gluon._sms(dy.device)))
    numel = fill.numel() if fill is not None else 0
    # each program zeroes `share` elements (a multiple of the fill's block), `chunk` of them per M-tile
    share = triton.cdiv(triton.cdiv(numel, grid), FILL_BLOCK) * FILL_BLOCK
    chunk = triton.cdiv(triton.cdiv(share, max(1, triton.cdiv(M, BM) // grid)), FILL_BLOCK) * FILL_BLOCK
    # the epilogue's threads along a row: 16 bytes each, no more than the narrower box holds; RC rows per step, at
    # least one layout's worth
    tpc = min(8, min(be, be2 or be) // 8)
    ga_ = ga if ga is not None else dh
    db_ = db if db is not None else dgp
    kernel[(grid,)](dy, dy.stride(0), d, d2, tiles, offsets, order, token, gate, h, h.stride(0), dh, dh.stride(0),
                    ga_, ga_.stride(0), dgp, db_, db_.stride(0), fill if fill is not None else dh, numel, share, chunk,
                    M, D, E, n_tiles, ACT=act, STORE_GA=ga is not None, HAS_DB=db is not None,
                    HAS_FILL=fill is not None, SPLIT=be2 > 0, W_RC=rc, BM=BM, BK=BK, BE=be, BE2=max(be2, 16),
                    TPC=tpc, RC=max(32, 128 // tpc), XS=stages, WS=w_stages, LW=mlp_gluon.LOADER_WARPS,
                    CREGS=CONSUMER_REGS, LREGS=LOADER_REGS, EREGS=EPILOGUE_REGS, num_warps=4,
                    maxnreg=mlp_gluon.MAX_REGS)
