"""up_bwd with its epilogue in a warpgroup of its own (Hopper; up_bwd variant 6, WS + epilogue warpgroup).

The same function as kernels/up_bwd_gluon.py's (variant 5): from dy's gathered rows, W2 and the saved
pre-activation h, per expert-sorted row r: da = dy[token r] @ W2[e]^T, dh = gate · da · act'(h), gate · act(h), the
per-pair gate gradient Σ_j da · act(h) and db1's column sums. Variant 5's consumers run that epilogue themselves,
both on the same tile at once, so the tensor cores idle through it: 124 µs at base ReLU on the H100, 75 µs with the
epilogue removed (docs/kernels.md v28). Here the consumers hand it on:

- one **loader** warpgroup fills both rings per reduction step: W2's tile by TMA, then the tile's dy rows gathered
  by cp.async (`mlp_gluon`'s parts; one warpgroup, as 16 warps at 128 registers is all a launch gets);
- two **consumer** warpgroups each run half of the M-tile's up GEMM (`mlp_gluon`'s up GEMM), store da rounded to
  dy's dtype into a shared [BM, E] tile (stmatrix) once the epilogue warpgroup is done with the previous tile's,
  and go straight on to the next tile;
- the **epilogue** warpgroup works through the tile RC rows at a time: h's rows by TMA into one of two small
  buffers (the next rows' load in flight during this step's work), then per column box dh written over da's rows and
  gate · a over h's, each sent by a TMA store where the whole tile is its expert's (else pointer stores, rows
  masked); the gate gradient's partials stored by pair, db1's sums by one fp32 atomic per column and tile, and a
  chunk of the dx zeros (the fill) between tiles.

Session 34 measured two earlier forms (git ff1b64d and the commit after it, docs/kernels.md v28): with h's whole
tile in shared memory the rings had only 3 + 3 slots and the main loop bound the kernel (123 µs); with h read and dh,
gate · a written by pointer loads and stores the one warpgroup could not keep up (137 µs). Here h takes two RC-row
buffers (24 kB at base) instead of its [128, 192] tile, so the rings keep 3 W2 + 4 dy slots (208 kB in all).
Rounding da to bf16 before the epilogue is the cost: relative differences ≈ 3e-3 in dh and db1 against
kernels/up.py (the earlier forms', measured), where variant 5 matches it to 1e-7 (kernels/up.py's two-pass up_bwd,
the 8B default, rounds da the same way). Opt-in, `SSD_TRITON_CONFIG="up_bwd=128,64,64,3,4,6"`; not yet timed.

Serves what variant 5 serves (`up_bwd_gluon.operands_served`, with this kernel's shared memory);
`_triton_kernels.up_backward` takes kernels/up.py elsewhere. Needs Triton >= 3.9. Gluon has no interpreter: on CPU the offline compile for sm_90
and the launcher's choice are tested (tests/backends/test_up_bwd_gluon.py); tests/backends/test_backends_gpu.py
(`up_bwd_ws`) checks the results on the GPU.
"""
from __future__ import annotations

import torch
import triton

from . import down_gluon, mlp_gluon, up_bwd_gluon

# registers per thread (setmaxnreg): the worker consumer, the loader warpgroup, the epilogue warpgroup; the default
# partition (the other consumer) gets the rest of the 64 K: 512 - 128 - 40 - 216 = 128 (offline sm_90, base ReLU:
# the split that spilled least)
CONSUMER_REGS, LOADER_REGS, EPILOGUE_REGS = 128, 40, 216
FILL_WARPS = 4  # the fill's stores: one warpgroup, up_bwd_gluon.FILL_BLOCK elements per warp and store
_STATE: dict = {"build": None}


def _build():
    # module-global: Gluon resolves the helpers' `gl.constexpr` annotations in the module's globals
    global gl
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

    down_gluon.require_gluon("WS up_bwd with an epilogue warpgroup", cp_async=True)
    forward, variant5 = mlp_gluon._build_once(), up_bwd_gluon._build_once()
    if forward is None or variant5 is None:
        raise ImportError("the WS kernels' parts, which this kernel shares, do not build here")
    _, descriptors, parts = forward
    _x_layout, _x_rows, _x_step, _w_load, _up_gemm, _act, _act_grad, _rings = (
        parts.x_layout, parts.x_rows, parts.x_step, parts.w_load, parts.up_gemm, parts.act, parts.act_grad,
        parts.rings)
    _zeros = variant5[2].zeros

    @gluon.jit
    def loader(X, stride_x, w_desc, w_desc2, x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty, TILES, OFFS,
               TOK, M, D, E, n_tiles, SPLIT: gl.constexpr, W_RC: gl.constexpr, BE: gl.constexpr,
               LW: gl.constexpr):
        """Both rings, in the consumers' order: per reduction step W2's tile [E, BK] by TMA, then the tile's dy rows
        [BM, BK] gathered by cp.async."""
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
        """Half of each M-tile's rows: da = dy rows @ W2[e]^T, rounded to dy's dtype into the shared da tile once the
        epilogue warpgroup is done with the previous tile's; then straight on to the next tile's GEMM."""
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
        """Rows r0 .. r0 + RC, in the row slice of `lay`: (rows, the mask of those that are the tile's expert's, their
        pairs, their gates in fp32)."""
        rows = r0 + gl.arange(0, RC, layout=gl.SliceLayout(1, lay))
        rmask = rows < end
        pair = gl.load(ORDER + rows, mask=rmask, other=0)
        return rows, rmask, pair, gl.load(GATE + pair, mask=rmask, other=0.0).to(gl.float32)

    @gluon.jit
    def _h_load(h_desc, h_desc2, r0, bar, h_s, h_s2, SPLIT: gl.constexpr, BE: gl.constexpr):
        """h's rows r0 .. r0 + RC (both column boxes) by TMA into one of the two row buffers, arriving on `bar`."""
        nbytes: gl.constexpr = h_desc.block_type.nbytes + (h_desc2.block_type.nbytes if SPLIT else 0)
        mbarrier.expect(bar, nbytes)
        tma.async_load(h_desc, [r0, 0], bar, h_s)
        if SPLIT:
            tma.async_load(h_desc2, [r0, BE], bar, h_s2)

    @gluon.jit
    def _box(da_s, h_s, rows, rmask, g, c0, OUT, stride_o, GA, stride_ga, full, lay: gl.constexpr,
             ACT: gl.constexpr, STORE_GA: gl.constexpr):
        """One column box of RC rows (kernels/up.py `_up_epilogue`'s backward without a gate) from da's and h's rows in
        shared memory: dh written over da's rows and gate * a over h's for the TMA stores (`full`), else stored from
        registers (rows masked); returns (the rows' share of the gate gradient sum_j da * a, db1's column sums)."""
        BC: gl.constexpr = da_s.type.shape[1]
        dtype: gl.constexpr = da_s.dtype
        da = da_s.load(lay).to(gl.float32)
        hf = h_s.load(lay).to(gl.float32)
        a = _act(hf, ACT).to(dtype).to(gl.float32)  # rounded where a torch matmul + activation would
        dg = gl.sum(da * a, 1)
        dh = (da * g[:, None] * _act_grad(hf, ACT)).to(dtype)
        ga = (a * g[:, None]).to(dtype)
        if full:
            da_s.store(dh)
            if STORE_GA:
                h_s.store(ga)
        else:
            cols = c0 + gl.arange(0, BC, layout=gl.SliceLayout(0, lay))
            r64 = rows.to(gl.int64)[:, None]
            gl.store(OUT + r64 * stride_o + cols[None, :], dh, mask=rmask[:, None])
            if STORE_GA:
                gl.store(GA + r64 * stride_ga + cols[None, :], ga, mask=rmask[:, None])
        return dg, gl.sum(gl.where(rmask[:, None], dh.to(gl.float32), 0.0), 0)

    @gluon.jit
    def _stores(desc, desc2, r0, buf, buf2, SPLIT: gl.constexpr, BE: gl.constexpr):
        """TMA stores of rows r0 .. r0 + RC of both column boxes."""
        tma.async_store(desc, [r0, 0], buf)
        if SPLIT:
            tma.async_store(desc2, [r0, BE], buf2)

    @gluon.jit
    def epilogue(da_buf, da_buf2, h_bufs, h_bufs2, da_full, da_empty, h_full, h_desc, h_desc2, dh_desc, dh_desc2,
                 ga_desc, ga_desc2, TILES, OFFS, ORDER, GATE, OUT, stride_o, GA, stride_ga, DGP, DB, stride_db, FILL,
                 fill_numel, fill_share, fill_chunk, M, n_tiles, ACT: gl.constexpr, STORE_GA: gl.constexpr,
                 HAS_DB: gl.constexpr, HAS_FILL: gl.constexpr, SPLIT: gl.constexpr, BE: gl.constexpr,
                 BE2: gl.constexpr, TPC: gl.constexpr):
        """Each M-tile's epilogue while the consumers run the next tile's GEMM (module docstring)."""
        BM: gl.constexpr = da_buf.type.shape[0]
        RC: gl.constexpr = h_bufs.type.shape[1]
        # one layout for both boxes (16 bytes per thread along a row, TPC threads), so that their row sums add
        lay: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // TPC, TPC],
                                             warps_per_cta=[4, 1], order=[1, 0])
        done = gl.program_id(0) * fill_share  # the fill: this program's share [its start, hi), written up to `done`
        hi = done + fill_share
        if hi > fill_numel:
            hi = fill_numel
        j = 0  # live M-tiles so far (the da tile's phase)
        q = 0  # row steps so far (h's buffers: step q uses buffer q % 2)
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            e = gl.load(TILES + 2 * t)
            row0 = gl.load(TILES + 2 * t + 1)
            if row0 < M:
                end = gl.load(OFFS + e + 1)
                full = row0 + BM <= end
                _h_load(h_desc, h_desc2, row0, h_full.index(q % 2), h_bufs.index(q % 2), h_bufs2.index(q % 2), SPLIT,
                        BE)
                rows, rmask, pair, g = _rows(ORDER, GATE, row0, end, RC, lay)
                db = gl.zeros((BE, ), dtype=gl.float32, layout=gl.SliceLayout(0, lay))
                db2 = gl.zeros((BE2, ), dtype=gl.float32, layout=gl.SliceLayout(0, lay))
                mbarrier.wait(da_full.index(0), j & 1)
                for c in gl.static_range(0, BM, RC):
                    b = q % 2
                    if c + RC < BM:  # the next rows' h, pairs and gates in flight during this step
                        tma.store_wait(0)  # the last step's stores have read the other buffer
                        _h_load(h_desc, h_desc2, row0 + c + RC, h_full.index(1 - b), h_bufs.index(1 - b),
                                h_bufs2.index(1 - b), SPLIT, BE)
                        nxt = _rows(ORDER, GATE, row0 + c + RC, end, RC, lay)
                    mbarrier.wait(h_full.index(b), (q // 2) & 1)
                    dg, s = _box(da_buf.slice(c, RC), h_bufs.index(b), rows, rmask, g, 0, OUT, stride_o, GA,
                                 stride_ga, full, lay, ACT, STORE_GA)
                    db += s
                    if SPLIT:
                        dg2, s2 = _box(da_buf2.slice(c, RC), h_bufs2.index(b), rows, rmask, g, BE, OUT, stride_o, GA,
                                       stride_ga, full, lay, ACT, STORE_GA)
                        dg += dg2
                        db2 += s2
                    gl.store(DGP + pair, dg, mask=rmask)
                    if full:
                        fence_async_shared()  # the generic writes of dh and gate * a before the TMA stores read them
                        _stores(dh_desc, dh_desc2, row0 + c, da_buf.slice(c, RC), da_buf2.slice(c, RC), SPLIT, BE)
                        if STORE_GA:
                            _stores(ga_desc, ga_desc2, row0 + c, h_bufs.index(b), h_bufs2.index(b), SPLIT, BE)
                    if c + RC < BM:
                        rows, rmask, pair, g = nxt
                    q += 1
                tma.store_wait(0)  # the stores have read da's tile
                mbarrier.arrive(da_empty.index(0), count=1)
                if HAS_DB:
                    dst = DB + e.to(gl.int64) * stride_db
                    gl.atomic_add(dst + gl.arange(0, BE, layout=gl.SliceLayout(0, lay)), db, sem="relaxed")
                    if SPLIT:
                        gl.atomic_add(dst + BE + gl.arange(0, BE2, layout=gl.SliceLayout(0, lay)), db2, sem="relaxed")
                if HAS_FILL:
                    stop = done + fill_chunk
                    if stop > hi:
                        stop = hi
                    _zeros(FILL, done, stop, 4)
                    done = stop
                j += 1
        if HAS_FILL:
            _zeros(FILL, done, hi, 4)

    @gluon.jit
    def up_bwd_epi_kernel(X, stride_x, w_desc, w_desc2, h_desc, h_desc2, dh_desc, dh_desc2, ga_desc, ga_desc2, TILES,
                          OFFS, ORDER, TOK, GATE, OUT, stride_o, GA, stride_ga, DGP, DB, stride_db, FILL, fill_numel,
                          fill_share, fill_chunk, M, D, E, n_tiles,
                          ACT: gl.constexpr, STORE_GA: gl.constexpr, HAS_DB: gl.constexpr, HAS_FILL: gl.constexpr,
                          SPLIT: gl.constexpr, W_RC: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
                          BE: gl.constexpr, BE2: gl.constexpr, TPC: gl.constexpr, XS: gl.constexpr,
                          WS: gl.constexpr, LW: gl.constexpr, CREGS: gl.constexpr, LREGS: gl.constexpr,
                          EREGS: gl.constexpr, num_warps: gl.constexpr):
        dtype: gl.constexpr = w_desc.dtype
        x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty = _rings(w_desc, w_desc2, BM, BK, XS, WS, LW)
        # da's M-tile in TMA's layouts (row slices of it are the dh stores' sources), h's two row buffers
        da_buf = gl.allocate_shared_memory(dtype, [BM, BE], h_desc.layout)
        da_buf2 = gl.allocate_shared_memory(dtype, [BM, BE2], h_desc2.layout)
        h_bufs = gl.allocate_shared_memory(dtype, [2] + h_desc.block_type.shape, h_desc.layout)
        h_bufs2 = gl.allocate_shared_memory(dtype, [2] + h_desc2.block_type.shape, h_desc2.layout)
        da_full = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        da_empty = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        h_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(da_full.index(0), count=2)
        mbarrier.init(da_empty.index(0), count=1)
        for i in gl.static_range(2):
            mbarrier.init(h_full.index(i), count=1)
        # the tuples inline: a constexpr bound to a name first would become a tensor (the partitions' flags must
        # stay compile-time constants)
        gl.warp_specialize([
            (consumer, (x_bufs, w_bufs, w_bufs2, da_buf, da_buf2, x_full, x_empty, w_full, w_empty, da_full, da_empty,
                        w_desc, w_desc2, TILES, M, D, n_tiles, 0, SPLIT, W_RC, BE, BE2)),
            (consumer, (x_bufs, w_bufs, w_bufs2, da_buf, da_buf2, x_full, x_empty, w_full, w_empty, da_full, da_empty,
                        w_desc, w_desc2, TILES, M, D, n_tiles, 1, SPLIT, W_RC, BE, BE2)),
            (loader, (X, stride_x, w_desc, w_desc2, x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty, TILES,
                      OFFS, TOK, M, D, E, n_tiles, SPLIT, W_RC, BE, LW)),
            (epilogue, (da_buf, da_buf2, h_bufs, h_bufs2, da_full, da_empty, h_full, h_desc, h_desc2, dh_desc,
                        dh_desc2, ga_desc, ga_desc2, TILES, OFFS, ORDER, GATE, OUT, stride_o, GA, stride_ga, DGP, DB,
                        stride_db, FILL, fill_numel, fill_share, fill_chunk, M, n_tiles, ACT, STORE_GA, HAS_DB,
                        HAS_FILL, SPLIT, BE, BE2, TPC)),
        ], [4, LW, 4], [CREGS, LREGS, EREGS])

    return up_bwd_epi_kernel, descriptors


def _layout(be: int, be2: int):
    """(TPC, RC): the epilogue's threads along a row (16 bytes each, no more than the narrower box holds) and its rows
    per step (at least one layout's worth, at least 32)."""
    tpc = min(8, min(be, be2 or be) // 8)
    return tpc, max(32, 128 // tpc)


def smem_bytes(BM: int, BK: int, be: int, be2: int, stages: int, w_stages: int, element_size: int = 2) -> int:
    """Shared memory of one program: the x ring, the weight ring (slots of E x BK), the da tile and h's two row
    buffers (each with a second box of at least 16 columns), and 4 kB for the epilogue's sums and the barriers."""
    width = be + max(be2, 16)
    rows = BM + 2 * _layout(be, be2)[1]
    return (stages * BM * BK + w_stages * (be + be2) * BK + rows * width) * element_size + 4 * 1024


def serves(dy: torch.Tensor, w2: torch.Tensor, h: torch.Tensor, act: int, glu: bool, fill, BM: int, BK: int,
           w_stages: int, stages: int, be: int, be2: int) -> bool:
    """Whether this kernel takes these operands with this tile: variant 5's conditions on them
    (`up_bwd_gluon.operands_served`), this kernel's buffers within shared memory, and a Triton whose Gluon builds it."""
    return (up_bwd_gluon.operands_served(dy, w2, h, act, glu, fill, BM, BK, w_stages, stages, be, be2)
            and smem_bytes(BM, BK, be, be2, stages, w_stages, dy.element_size()) <= down_gluon.SMEM_LIMIT
            and _build_once() is not None)


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
    tpc, rc_rows = _layout(be, be2)
    rows = ([rc_rows, be], [rc_rows, max(be2, 16)])  # h's loads and dh's and gate * a's stores: RC rows at a time
    ga_ = ga if ga is not None else dh
    hd, hd2, dhd, dhd2, gad, gad2 = (x for t in (h, dh, ga_) for x in descriptors(t, rows, dy.dtype))
    n_tiles = tiles.shape[0]
    grid = max(1, min(n_tiles, down_gluon._sms(dy.device)))
    numel = fill.numel() if fill is not None else 0
    share, chunk = up_bwd_gluon.fill_shares(numel, grid, M, BM, FILL_WARPS * up_bwd_gluon.FILL_BLOCK)
    db_ = db if db is not None else dgp
    kernel[(grid,)](dy, dy.stride(0), d, d2, hd, hd2, dhd, dhd2, gad, gad2, tiles, offsets, order, token, gate, dh,
                    dh.stride(0), ga_, ga_.stride(0), dgp, db_, db_.stride(0), fill if fill is not None else dh, numel,
                    share, chunk, M, D, E, n_tiles, ACT=act, STORE_GA=ga is not None, HAS_DB=db is not None,
                    HAS_FILL=fill is not None, SPLIT=be2 > 0, W_RC=rc, BM=BM, BK=BK, BE=be, BE2=max(be2, 16),
                    TPC=tpc, XS=stages, WS=w_stages, LW=mlp_gluon.LOADER_WARPS, CREGS=CONSUMER_REGS,
                    LREGS=LOADER_REGS, EREGS=EPILOGUE_REGS, num_warps=4, maxnreg=mlp_gluon.MAX_REGS)
