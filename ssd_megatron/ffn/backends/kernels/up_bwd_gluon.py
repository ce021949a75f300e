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
  shared memory. dh and gate · a leave by TMA stores from h's slot once read (`_put`; rows past the tile's expert
  by pointer stores), or with SSD_TRITON_UP_BWD_TMA_STORES=0 by 4-byte stores of the accumulator's column pairs.

On the H100 at base ReLU it takes 123.8 µs against kernels/up.py's 144.3 (143.9 with pointer stores), the layer's
fwd+bwd 0.650 against 0.660-0.666 ms (docs/kernels.md v28), so `auto` takes it for ReLU at base-like shapes under
kernels/gluon_launches.py's rule (`auto_ws.auto_up_bwd_ws`). The epilogue, which both consumers run at
once on the same tile, still leaves the tensor cores idle (75 µs without it). Three forms of an epilogue warpgroup
of its own did not beat it (docs/kernels.md v28, v29; the last, up_bwd variant 6, is in git history at 81dac01).

Serves activations without a gate, bf16/fp16, sm_90, E = BE + BE2 with BE <= 128 (192 = 128 + 64), D a multiple
of BK, W2 as one 2-D matrix in either layout (`common.expert_matrix`), h one contiguous [M, E] matrix, and the
buffers within shared memory (`serves`); `up_launch.up_backward` takes kernels/up.py elsewhere.

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

# registers per thread: as the fused forward's (mlp_gluon), but 32 for the weight loader's warp, which also fills
# (2 x 128 x 224 + 128 x 40 + 32 x 32 <= 64 K)
CONSUMER_REGS, LOADER_REGS, W_LOADER_REGS = mlp_gluon.CONSUMER_REGS, mlp_gluon.LOADER_REGS, 32
FILL_BLOCK = 256  # elements per store of the fill (one warp, 16 bytes per thread)
_STATE: dict = {"build": None}


def _build():
    # module-global: Gluon resolves the helpers' `gl.constexpr` annotations in the module's globals
    global gl
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

    down_gluon.require_gluon("WS up_bwd", cp_async=True)
    forward = mlp_gluon._build_once()
    if forward is None:
        raise ImportError("the WS fused forward's parts, which this kernel shares, do not build here")
    _, parts = forward
    x_loader, _w_load, _up_gemm, _act, _rings = (parts.x_loader, parts.w_load, parts.up_gemm, parts.act,
                                                 parts.rings)

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
        """FILL[lo:hi] = 0 from one warp, 16 bytes per thread and store (FILL_BLOCK elements)."""
        BLOCK: gl.constexpr = 256
        layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[BLOCK // 32], threads_per_warp=[32],
                                                warps_per_cta=[1], order=[0])
        offs = gl.arange(0, BLOCK, layout=layout)
        zero = gl.zeros((BLOCK, ), dtype=FILL.dtype.element_ty, layout=layout)
        for i in range(lo, hi, BLOCK):
            gl.store(FILL + i + offs, zero, mask=i + offs < hi)

    @gluon.jit
    def w_loader(w_desc, w_desc2, h_desc, h_desc2, w_bufs, w_bufs2, h_buf, h_buf2, w_full, w_empty, h_full, h_empty,
                 TILES, M, D, E, n_tiles, FILL, fill_numel, fill_share, fill_chunk, SPLIT: gl.constexpr,
                 W_RC: gl.constexpr, HAS_FILL: gl.constexpr, BE: gl.constexpr, BK: gl.constexpr):
        """W2's tiles by TMA in the consumers' order (a tile's reduction steps, then the next tile's), the tile's h rows
        after its first ring-depth W tiles (module docstring), and this program's share of the fill, a chunk per
        tile and the rest after the last."""
        WS: gl.constexpr = w_bufs.type.shape[0]
        h_bytes: gl.constexpr = h_desc.block_type.nbytes + (h_desc2.block_type.nbytes if SPLIT else 0)
        h_at = D // BK - 1
        if h_at > WS - 1:
            h_at = WS - 1
        done = gl.program_id(0) * fill_share  # the fill: this program's share [its start, hi), written up to `done`
        hi = done + fill_share
        if hi > fill_numel:
            hi = fill_numel
        wc = 0  # weight tiles loaded so far (the ring)
        j = 0   # live M-tiles so far (the h buffer's uses)
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            e = gl.load(TILES + 2 * t)
            row0 = gl.load(TILES + 2 * t + 1)
            if row0 < M:
                i = 0
                for k in range(0, D, BK):
                    s = wc % WS
                    mbarrier.wait(w_empty.index(s), ((wc // WS) & 1) ^ 1)  # a fresh barrier passes phase 1
                    _w_load(w_desc, w_desc2, e * E, k, w_full.index(s), w_bufs.index(s), w_bufs2.index(s), SPLIT,
                            W_RC, BE)
                    wc += 1
                    if i == h_at:  # the consumers are done with the last tile's reduction, and in its epilogue
                        if HAS_FILL:  # (while they finish it)
                            nxt = done + fill_chunk
                            if nxt > hi:
                                nxt = hi
                            _zeros(FILL, done, nxt)
                            done = nxt
                        mbarrier.wait(h_empty.index(0), (j & 1) ^ 1)
                        mbarrier.expect(h_full.index(0), h_bytes)
                        tma.async_load(h_desc, [row0, 0], h_full.index(0), h_buf)
                        if SPLIT:
                            tma.async_load(h_desc2, [row0, BE], h_full.index(0), h_buf2)
                    i += 1
                j += 1
        if HAS_FILL:
            _zeros(FILL, done, hi)

    @gluon.jit
    def _store_rows(P, stride, rows, rmask, c0, E, t, lay: gl.constexpr):
        """P[rows, c0 + j] = t[:, j] (rows masked, columns below E) from t's layout `lay`: 4-byte stores of the
        accumulator layout's column pairs."""
        cols = c0 + gl.arange(0, t.type.shape[1], layout=gl.SliceLayout(0, lay))
        gl.store(P + rows.to(gl.int64)[:, None] * stride + cols[None, :], t, mask=rmask[:, None] & (cols < E)[None, :])

    @gluon.jit
    def _put(P, stride, rows, rmask, c0, E, t, slot, desc, r0, full, lay: gl.constexpr, TMA_OUT: gl.constexpr):
        """P[rows, c0 + j] = t[:, j]: with TMA_OUT, where this warpgroup's rows all belong to the tile's expert
        (`full`), by a TMA store from the shared-memory slot of h's rows (read already); else `_store_rows`."""
        if TMA_OUT:
            if full:
                slot.store(t)
                fence_async_shared()
                tma.async_store(desc, [r0, c0], slot)
            else:
                _store_rows(P, stride, rows, rmask, c0, E, t, lay)
        else:
            _store_rows(P, stride, rows, rmask, c0, E, t, lay)

    @gluon.jit
    def _epilogue(acc, h_tile, rows, rmask, g, e, c0, E, OUT, stride_o, GA, stride_ga, DB, stride_db, dh_desc,
                  ga_desc, r0, full, lay: gl.constexpr, ACT: gl.constexpr, STORE_GA: gl.constexpr,
                  HAS_DB: gl.constexpr, TMA_OUT: gl.constexpr):
        """One column tile's epilogue (kernels/up.py `_up_epilogue`'s backward without a gate), from the accumulator
        da [HM, BC] in layout `lay` and h's rows in shared memory: dh and gate · a stored, db1's column sums added;
        returns the tile's share of each row's gate gradient Σ_j da · a."""
        BC: gl.constexpr = acc.type.shape[1]
        dtype: gl.constexpr = OUT.dtype.element_ty
        cols = c0 + gl.arange(0, BC, layout=gl.SliceLayout(0, lay))
        cmask = cols < E
        omask = rmask[:, None] & cmask[None, :]
        h = h_tile.load(lay)  # (kept in h's dtype: the accumulator and a second [HM, BC] fp32 tile use up the
        # registers that ptxas allots the whole kernel, mlp_gluon.MAX_REGS)
        a = _act(h.to(gl.float32), ACT).to(dtype).to(gl.float32)  # rounded where a torch matmul + activation would
        dg = gl.sum(acc * a, 1)
        dh = (acc * g[:, None] * _act_grad(h.to(gl.float32), ACT)).to(dtype)
        _put(OUT, stride_o, rows, rmask, c0, E, dh, h_tile, dh_desc, r0, full, lay, TMA_OUT)
        if HAS_DB:
            gl.atomic_add(DB + e.to(gl.int64) * stride_db + cols, gl.sum(gl.where(omask, dh.to(gl.float32), 0.0), 0),
                          mask=cmask, sem="relaxed")
        if STORE_GA:  # a again from h, after the accumulator's last use
            a = _act(h.to(gl.float32), ACT).to(dtype).to(gl.float32)
            if TMA_OUT:
                tma.store_wait(0)  # dh's store has read the slot
            _put(GA, stride_ga, rows, rmask, c0, E, (a * g[:, None]).to(dtype), h_tile, ga_desc, r0, full, lay,
                 TMA_OUT)
        return dg

    @gluon.jit
    def consumer(x_bufs, w_bufs, w_bufs2, h_buf, h_buf2, x_full, x_empty, w_full, w_empty, h_full, h_empty, w_desc,
                 w_desc2, dh_desc, dh_desc2, ga_desc, ga_desc2, TILES, OFFS, ORDER, GATE, OUT, stride_o, GA, stride_ga,
                 DGP, DB, stride_db, M, D, E, n_tiles, which: gl.constexpr, ACT: gl.constexpr,
                 STORE_GA: gl.constexpr, HAS_DB: gl.constexpr, SPLIT: gl.constexpr, W_RC: gl.constexpr,
                 BE: gl.constexpr, BE2: gl.constexpr, TMA_OUT: gl.constexpr):
        HM: gl.constexpr = x_bufs.type.shape[1] // 2  # this warpgroup's rows of the tile
        up_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BE, 16])
        up_l2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BE2, 16])
        row_l: gl.constexpr = gl.SliceLayout(1, up_l)
        row_l2: gl.constexpr = gl.SliceLayout(1, up_l2)
        kc = 0  # x ring steps taken
        wc = 0  # weight ring tiles taken
        j = 0   # live M-tiles taken (the h buffer's phase)
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            e = gl.load(TILES + 2 * t)
            row0 = gl.load(TILES + 2 * t + 1)
            if row0 < M:
                acc, acc2, kc, wc = _up_gemm(x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty, w_desc,
                                             w_desc2, D, kc, wc, which, up_l, up_l2, SPLIT, W_RC, BE, BE2)
                r0 = row0 + which * HM
                end = gl.load(OFFS + e + 1)
                full = r0 + HM <= end
                rows = r0 + gl.arange(0, HM, layout=row_l)
                rmask = rows < end
                pair = gl.load(ORDER + rows, mask=rmask, other=0)
                g = gl.load(GATE + pair, mask=rmask, other=0.0).to(gl.float32)
                mbarrier.wait(h_full.index(0), j & 1)
                if SPLIT:  # the narrow tile first: fewer registers live beside the wide tile's accumulator
                    dg2 = _epilogue(acc2, h_buf2.slice(which * HM, HM), gl.convert_layout(rows, row_l2),
                                    gl.convert_layout(rmask, row_l2), gl.convert_layout(g, row_l2), e, BE, E, OUT,
                                    stride_o, GA, stride_ga, DB, stride_db, dh_desc2, ga_desc2, r0, full, up_l2, ACT,
                                    STORE_GA, HAS_DB, TMA_OUT)
                dg = _epilogue(acc, h_buf.slice(which * HM, HM), rows, rmask, g, e, 0, E, OUT, stride_o, GA,
                               stride_ga, DB, stride_db, dh_desc, ga_desc, r0, full, up_l, ACT, STORE_GA, HAS_DB,
                               TMA_OUT)
                if SPLIT:
                    dg += gl.convert_layout(dg2, row_l)
                if TMA_OUT:
                    tma.store_wait(0)  # the stores have read h's slots before the loader refills them
                mbarrier.arrive(h_empty.index(0), count=1)  # both consumers arrive: count 2
                gl.store(DGP + pair, dg, mask=rmask)
                j += 1

    @gluon.jit
    def up_bwd_ws_kernel(X, stride_x, w_desc, w_desc2, h_desc, h_desc2, dh_desc, dh_desc2, ga_desc, ga_desc2, TILES,
                         OFFS, ORDER, TOK, GATE, OUT, stride_o,
                         GA, stride_ga, DGP, DB, stride_db, FILL, fill_numel, fill_share, fill_chunk, M, D, E, n_tiles,
                         ACT: gl.constexpr, STORE_GA: gl.constexpr, HAS_DB: gl.constexpr, HAS_FILL: gl.constexpr,
                         SPLIT: gl.constexpr, W_RC: gl.constexpr, TMA_OUT: gl.constexpr,
                         BM: gl.constexpr, BK: gl.constexpr,
                         BE: gl.constexpr, BE2: gl.constexpr, XS: gl.constexpr, WS: gl.constexpr, LW: gl.constexpr,
                         CREGS: gl.constexpr, LREGS: gl.constexpr, W_LOADER_REGS: gl.constexpr,
                         num_warps: gl.constexpr):
        dtype: gl.constexpr = w_desc.dtype
        x_bufs, w_bufs, w_bufs2, x_full, x_empty, w_full, w_empty = _rings(w_desc, w_desc2, BM, BK, XS, WS, LW)
        h_buf = gl.allocate_shared_memory(dtype, h_desc.block_type.shape, h_desc.layout)
        h_buf2 = gl.allocate_shared_memory(dtype, h_desc2.block_type.shape, h_desc2.layout)
        h_full = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        h_empty = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(h_full.index(0), count=1)
        mbarrier.init(h_empty.index(0), count=2)
        # the tuples inline: a constexpr bound to a name first would become a tensor (the partitions' flags must
        # stay compile-time constants)
        gl.warp_specialize([
            (consumer, (x_bufs, w_bufs, w_bufs2, h_buf, h_buf2, x_full, x_empty, w_full, w_empty, h_full, h_empty,
                        w_desc, w_desc2, dh_desc, dh_desc2, ga_desc, ga_desc2, TILES, OFFS, ORDER, GATE, OUT,
                        stride_o, GA, stride_ga, DGP, DB, stride_db, M, D, E, n_tiles, 0, ACT, STORE_GA, HAS_DB, SPLIT,
                        W_RC, BE, BE2, TMA_OUT)),
            (consumer, (x_bufs, w_bufs, w_bufs2, h_buf, h_buf2, x_full, x_empty, w_full, w_empty, h_full, h_empty,
                        w_desc, w_desc2, dh_desc, dh_desc2, ga_desc, ga_desc2, TILES, OFFS, ORDER, GATE, OUT,
                        stride_o, GA, stride_ga, DGP, DB, stride_db, M, D, E, n_tiles, 1, ACT, STORE_GA, HAS_DB, SPLIT,
                        W_RC, BE, BE2, TMA_OUT)),
            (x_loader, (X, stride_x, x_bufs, x_full, x_empty, TILES, OFFS, TOK, M, D, n_tiles, LW)),
            (w_loader, (w_desc, w_desc2, h_desc, h_desc2, w_bufs, w_bufs2, h_buf, h_buf2, w_full, w_empty, h_full,
                        h_empty, TILES, M, D, E, n_tiles, FILL, fill_numel, fill_share, fill_chunk, SPLIT, W_RC,
                        HAS_FILL, BE, BK)),
        ], [4, LW, 1], [CREGS, LREGS, W_LOADER_REGS])

    return up_bwd_ws_kernel


def smem_bytes(BM: int, BK: int, E: int, stages: int, w_stages: int, element_size: int = 2) -> int:
    """Shared memory of one program: the fused forward's rings (`mlp_gluon.smem_bytes`) and one M-tile of h (with
    at most 16 columns of an unused second box)."""
    return mlp_gluon.smem_bytes(BM, BK, E, stages, w_stages, element_size) + BM * (E + 16) * element_size


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
    return smem_bytes(BM, BK, w2.shape[1], stages, w_stages, dy.element_size()) <= down_gluon.SMEM_LIMIT \
        and _build_once() is not None


def _build_once():
    return down_gluon.built_once(_STATE, _build)


def launch(dy, w2, h, tiles, offsets, order, token, gate, dh, ga, dgp, db, fill, act: int, BM: int, BK: int,
           w_stages: int, stages: int, be: int, be2: int, tma_stores: bool = False):
    """The kernel over `tiles` ([n, 2] int32 (expert, first row), first row M = empty) with persistent programs,
    one per SM: dh, ga (or None), the gate gradient's one row of partials dgp [1, M] (by pair), db1's fp32 sums db
    (zeroed; or None) and `fill` (or None) zeroed; dh and gate * a by TMA stores where a consumer's rows are all
    its tile's expert's with `tma_stores` (`_put`). The caller checked `serves`."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    kernel = _build_once()
    N, E, D = w2.shape
    M = h.shape[0]
    (d, d2), rc, _ = down_gluon.weight_descriptors(w2, (be, be2), BK)
    hd, hd2 = down_gluon.box_descriptors(h, ([BM, be], [BM, max(be2, 16)]))
    # dh's and gate * a's TMA stores from h's slots: half a tile's rows per box, h's layouts
    half = ([BM // 2, be], [BM // 2, max(be2, 16)])
    ga_ = ga if ga is not None else dh
    outs = [TensorDescriptor.from_tensor(t, b, d.layout) for t in (dh, ga_) for b, d in zip(half, (hd, hd2))]
    n_tiles = tiles.shape[0]
    grid = max(1, min(n_tiles, down_gluon._sms(dy.device)))
    numel = fill.numel() if fill is not None else 0
    # each program zeroes `share` elements (a multiple of the fill's block), `chunk` of them per M-tile
    share = triton.cdiv(triton.cdiv(numel, grid), FILL_BLOCK) * FILL_BLOCK
    chunk = triton.cdiv(triton.cdiv(share, max(1, triton.cdiv(M, BM) // grid)), FILL_BLOCK) * FILL_BLOCK
    db_ = db if db is not None else dgp
    kernel[(grid,)](dy, dy.stride(0), d, d2, hd, hd2, *outs, tiles, offsets, order, token, gate, dh, dh.stride(0), ga_,
                    ga_.stride(0), dgp, db_, db_.stride(0), fill if fill is not None else dh, numel, share, chunk, M,
                    D, E, n_tiles, ACT=act, STORE_GA=ga is not None, HAS_DB=db is not None, HAS_FILL=fill is not None,
                    SPLIT=be2 > 0, W_RC=rc, TMA_OUT=tma_stores, BM=BM, BK=BK, BE=be, BE2=max(be2, 16),
                    XS=stages, WS=w_stages,
                    LW=mlp_gluon.LOADER_WARPS, CREGS=CONSUMER_REGS, LREGS=LOADER_REGS, W_LOADER_REGS=W_LOADER_REGS,
                    num_warps=4, maxnreg=mlp_gluon.MAX_REGS)
