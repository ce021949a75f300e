"""The down GEMM with STAGED's schedule as a warp-specialised Gluon kernel (Hopper; down variants 5 and 6, WS and
WS_PAIR).

`auto` takes it (`auto_ws.AUTO_WS`: 128 x 64, two W stages, in pairs: below) for the atomic combines into
rows >= 2048 wide where it serves: of the layer's launches, the 8B ReLU dx. H100 (docs/kernels.md v16): that launch
1.87 ms against 2.21 for 3.6's ROWLOOP default (2.66 for the same under 3.9), the 8B ReLU layer 9.17-9.19 ->
8.99 ms; in pairs (v44) the launch 1.39 -> 1.35 ms and the layer -0.8%. And (`AUTO_WS_BOXES`: 128 x 64, three W
stages, not in pairs) for narrower atomic combines whose Ein is two TMA boxes: base ReLU's dx, where the graphed
layer's fwd+bwd went 0.620 -> 0.594 ms (docs/kernels.md v42; in pairs 0.62 ms, v44). A config string names it
elsewhere (e.g. SSD_TRITON_CONFIG="down=64,64,64,4,3,5", or 6 in pairs; BK and WARPS are not read, STAGES is the
depth of the W ring).

STAGED (kernels/down.py) keeps an M-tile's A rows on chip and sweeps the output column blocks, but in
Triton each block's product is waited for at once and its epilogue (gate scale, the router's rank-1 term,
atomic adds into the scattered token rows) runs while the tensor cores idle: Triton 3.6 makes a wgmma
asynchronous only when its result feeds the next dot (docs/kernels.md v13). Here the schedule of
ffn/relu_mask_gemm_gluon.py's "ping-pong" GEMM (the pattern of CUTLASS's Hopper ping-pong kernels):

- one **loader** warp issues every TMA load: an M-tile's A rows ([BM, Ein], all of the reduction) into one
  of two buffers (the next tile's while the current one is in use), and the W tile of every (M-tile,
  column block) work item into a ring of STAGES slots;
- two **consumer** warpgroups take alternate work items. Their products are issued in turn (the `order`
  barriers), so that one's epilogue runs while the other's wgmma chain keeps the tensor cores busy. The
  epilogue (`store_block`, which kernels/mlp_gluon.py shares) is `_down_store`'s: gate scale (SCALE) or the
  rank-1 term g * C[e] (RANK1), in the product's own layout, then its change to a 16-byte-per-thread layout in
  OUT's dtype (bf16: half the shared-memory bytes of an fp32 change; the 8B dx is bound by shared memory,
  docs/kernels.md v38), then relaxed atomic adds into the token rows (ATOMIC) or plain stores into the (t, k) rows.

In pairs (PAIR, down variant 6, WS_PAIR) an M-tile is 2 * BM rows: consumer i takes rows i * BM.. of it, in A
buffer i, over every column block, both on the same W tile (its slot is freed by both: count 2). Each W tile is
then read once per 2 * BM rows, not per BM, for the same registers and shared memory (one A buffer per consumer
instead of two shared ones: the next tile's rows load only once a consumer is done with its half). A half that
lies past its expert's end (the expert's last tile) issues no product and only passes its barriers on.

Persistent programs (one per SM) walk a table of M-tiles: in expert order (`tile_order.expert_tiles`), or
where the output rows are >= 2048 wide (the 8B dx) in token windows of 16 experts (`token_window_tiles`,
docs/kernels.md v37: the adds then meet their token rows in L2 more often);
rows of A past the expert's end are loaded (they belong to the next expert, or are TMA's zero fill) and
masked at the store. Serves (`serves`) an Ein of one power-of-two TMA box of 16 to 256 columns, or two
(`ein_boxes`: base's 192 = 128 + 64, each item then two products), with W as one [N * Ein, Dout] row-major
matrix, bf16/fp16, BM 64, 128 or 256, BN 16 to 256 and two or more W stages, on sm_90: of the layer's launches,
the 8B ReLU dx (dh [M, 256] @ w1, w1 a view of W_in) and base ReLU's (dh [M, 192], AUTO_WS_BOXES); the forward's
down too where w2 is a contiguous [N, E, D] tensor (the tests' inputs). W_out's column view, which the layer
passes there ([N, E, D] with unit stride along E), it serves only when asked (`down_scatter(view=...)`,
TritonBackend's w2_view, docs/kernels.md v49): "copy", a row-major copy made for the launch, or "tma", the view
read in place (W_RC false: [BN, Ein] boxes of the [Dout, N * Ein] matrix, each W slot transposed as wgmma's B
operand, as kernels/mlp_gluon.py reads W2). An Ein longer than two boxes but a multiple of PASS_WIDTH (SwiGLU 8B's
dx: 512) runs in passes (`ein_passes`), one launch per 256-column slice of A and of each expert's W rows, each
adding into the output; only a forced config takes it so far (`auto` does not: not yet timed, docs/kernels.md
v49). The launcher falls back to STAGED otherwise (the column view by default, fp32, passes into the (t, k)
buffer, shared memory: e.g. 128 x 64 with three W stages of 256 rows).

Needs Triton >= 3.9 (`MIN_TRITON`): Triton 3.6's LLVM lowering asserts when a warp_specialize partition
holds gl.atomic_add (commit 923b111, docs/kernels.md v13), and 3.9's Gluon names the TMA load `async_load`;
with an older Triton the launcher falls back to STAGED. Gluon has no interpreter: on CPU only the offline
compile (tools/compile_report.py, tests/backends/test_offline_compile.py) and the launcher's choice are
tested; the GPU tests (tests/backends/test_backends_gpu.py, `down-ws`) check the results.
"""
from __future__ import annotations

import functools
import types

import torch

from .common import expert_boxes, strided_expert_matrix, tma_aligned

MIN_TRITON = (3, 9)
CONSUMER_REGS, LOADER_REGS, MAX_REGS = 232, 40, 168  # 3 warpgroups x 128 threads x 168 <= 64 K registers
SMEM_LIMIT = 227 * 1024  # an sm_90 block's shared memory: the bound of all three WS kernels' buffers
PASS_WIDTH = 256  # a longer Ein (SwiGLU 8B's dx: 512) runs in launches over slices of this many columns (`ein_passes`)
_STATE: dict = {"build": None}


@functools.lru_cache(maxsize=None)
def new_enough_triton() -> bool:
    """Whether the installed Triton is at least MIN_TRITON."""
    import triton

    return tuple(int(v) for v in triton.__version__.split(".")[:2]) >= MIN_TRITON


def require_gluon(kernel: str, cp_async: bool = False) -> None:
    """Raise ImportError unless this Triton's Gluon is the one the warp-specialised kernels are written for:
    Triton >= MIN_TRITON, the TMA load named `async_load`, warp_specialize taking (function, args) pairs, and with
    `cp_async` the cp.async copies' barrier arrival."""
    import inspect

    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import tma

    if not new_enough_triton():
        raise ImportError(f"triton {triton.__version__}: the {kernel} needs {MIN_TRITON}")
    if not hasattr(tma, "async_load") or (cp_async and not hasattr(async_copy, "mbarrier_arrive")) or \
            "functions_and_args" not in inspect.signature(gl.warp_specialize).parameters:
        raise ImportError(f"this Gluon's TMA load, cp.async or warp_specialize differs from the one the {kernel} uses")


def _build():
    # module-global: Gluon resolves the helpers' `gl.constexpr` annotations in the module's globals (b_operand's RC
    # must be one: its branches return different types)
    global gl
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

    require_gluon("WS down kernel")

    @gluon.jit
    def row_targets(rows, rmask, ORDER, GATE, TOK, stride_o, LOAD_G: gl.constexpr, ATOMIC: gl.constexpr):
        """(gate, output row offset) of each sorted row (kernels/mlp_gluon.py's combine too): its (t, k) pair's gate
        (zeros without LOAD_G), and its output row: its token's (atomic adds), else its pair's, times stride_o."""
        pair = gl.load(ORDER + rows, mask=rmask, other=0)
        if LOAD_G:
            g = gl.load(GATE + pair, mask=rmask, other=0.0).to(gl.float32)
        else:
            g = gl.zeros(rows.shape, dtype=gl.float32, layout=rows.type.layout)
        if ATOMIC:
            dst = gl.load(TOK + rows, mask=rmask, other=0).to(gl.int64) * stride_o
        else:
            dst = pair.to(gl.int64) * stride_o
        return g, dst

    @gluon.jit
    def store_block(acc, n, e, rmask, dst, g, C, stride_c, OUT, Dout, layout: gl.constexpr, SCALE: gl.constexpr,
                    ATOMIC: gl.constexpr, RANK1: gl.constexpr):
        """One output column block's epilogue (kernels/mlp_gluon.py's too): the gate scale (SCALE) or the rank-1 term
        g * C[e] (RANK1) in the product's own layout (`g`: the gates in its rows), the change to `layout` (16 bytes per
        thread) in OUT's dtype (half the shared-memory bytes of an fp32 change, docs/kernels.md v38), then relaxed
        atomic adds into the token rows (ATOMIC) or stores into the (t, k) rows (`dst`: each row's offset, `rmask`
        its rows in `layout`)."""
        BN: gl.constexpr = acc.type.shape[1]
        if SCALE:
            acc = acc * g[:, None]
        if RANK1:
            cols_m = n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, acc.type.layout))
            c = gl.load(C + e.to(gl.int64) * stride_c + cols_m, mask=cols_m < Dout, other=0.0).to(gl.float32)
            acc = acc + g[:, None] * c[None, :]
        val = gl.convert_layout(acc.to(OUT.dtype.element_ty), layout)
        cols = n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        omask = rmask[:, None] & (cols < Dout)[None, :]
        if ATOMIC:  # the K rows of a token come from different work items: add them in place
            gl.atomic_add(OUT + dst[:, None] + cols[None, :], val, mask=omask, sem="relaxed")
        else:
            gl.store(OUT + dst[:, None] + cols[None, :], val, mask=omask)

    @gluon.jit
    def w_tile(desc, r0, c0, bar, buf, RC: gl.constexpr):
        """TMA load of the W tile at row r0 of all experts' rows and column c0 (kernels/mlp_gluon.py's too): an
        [r, c] box of the [N * R, C] matrix (RC), else a [c, r] box of the [C, N * R] column view
        (`common.expert_matrix`)."""
        if RC:
            tma.async_load(desc, [r0, c0], bar, buf)
        else:
            tma.async_load(desc, [c0, r0], bar, buf)

    @gluon.jit
    def b_operand(buf, RC: gl.constexpr):
        """The wgmma B operand [K, N] of a W tile stored [K, N] (RC) or [N, K] (the column view's box, read
        transposed from shared memory; kernels/mlp_gluon.py's too)."""
        if RC:
            out = buf
        else:
            out = buf.permute((1, 0))
        return out

    @gluon.jit
    def loader(a_desc, a_desc2, w_desc, w_desc2, a_bufs, a_bufs2, b_bufs, b_bufs2, a_full, a_empty, b_full, b_empty,
               TILES, M, Dout, n_tiles, W_STEP, SPLIT: gl.constexpr, PAIR: gl.constexpr, W_RC: gl.constexpr):
        BE: gl.constexpr = a_desc.block_type.shape[1]
        BM: gl.constexpr = a_desc.block_type.shape[0]
        a_bytes: gl.constexpr = a_desc.block_type.nbytes + (a_desc2.block_type.nbytes if SPLIT else 0)
        w_bytes: gl.constexpr = w_desc.block_type.nbytes + (w_desc2.block_type.nbytes if SPLIT else 0)
        BN: gl.constexpr = w_desc.block_type.shape[1] if W_RC else w_desc.block_type.shape[0]
        NS: gl.constexpr = b_bufs.type.shape[0]
        num_n = gl.cdiv(Dout, BN)
        it = 0  # work items (M-tile, column block) of this program so far, in order
        j = 0   # live M-tiles of this program so far
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            e = gl.load(TILES + 2 * t)
            row0 = gl.load(TILES + 2 * t + 1)
            if row0 < M:
                for h in gl.static_range(2 if PAIR else 1):
                    if PAIR:  # each consumer's half of the tile, once it is done with its last one
                        ta = h
                        phase = j & 1
                    else:  # the next M-tile's rows into the other buffer
                        ta = j % 2
                        phase = (j // 2) & 1
                    mbarrier.wait(a_empty.index(ta), phase ^ 1)  # a fresh barrier passes phase 1
                    mbarrier.expect(a_full.index(ta), a_bytes)
                    tma.async_load(a_desc, [row0 + h * BM, 0], a_full.index(ta), a_bufs.index(ta))
                    if SPLIT:  # Ein's second box of columns
                        tma.async_load(a_desc2, [row0 + h * BM, BE], a_full.index(ta), a_bufs2.index(ta))
                for n in range(num_n):
                    s = it % NS
                    mbarrier.wait(b_empty.index(s), ((it // NS) & 1) ^ 1)
                    mbarrier.expect(b_full.index(s), w_bytes)
                    # expert e's Ein rows of W start at row e * W_STEP (W_STEP = Ein, or more for a pass's slice)
                    w_tile(w_desc, e * W_STEP, n * BN, b_full.index(s), b_bufs.index(s), W_RC)
                    if SPLIT:
                        w_tile(w_desc2, e * W_STEP + BE, n * BN, b_full.index(s), b_bufs2.index(s), W_RC)
                    it += 1
                j += 1

    @gluon.jit
    def consumer(a_desc, w_desc, TILES, a_bufs, a_bufs2, b_bufs, b_bufs2, a_full, a_empty, b_full, b_empty, order,
                 OFFS, ORDER, TOK, GATE, OUT, stride_o, C, stride_c, M, Dout, n_tiles, which: gl.constexpr,
                 SCALE: gl.constexpr, ATOMIC: gl.constexpr, RANK1: gl.constexpr, SPLIT: gl.constexpr,
                 PAIR: gl.constexpr, W_RC: gl.constexpr):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BN: gl.constexpr = w_desc.block_type.shape[1] if W_RC else w_desc.block_type.shape[0]
        NS: gl.constexpr = b_bufs.type.shape[0]
        mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BN, 16])
        # the epilogue's layout: 8 consecutive columns per thread (16-byte vector atomics)
        layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (BN // 8), BN // 8],
                                                warps_per_cta=[4, 1], order=[1, 0])
        row_l: gl.constexpr = gl.SliceLayout(1, layout)
        num_n = gl.cdiv(Dout, BN)
        it = 0
        j = 0
        turn = 0  # this consumer's work items so far: its products alternate with the other's
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            e = gl.load(TILES + 2 * t)
            row0 = gl.load(TILES + 2 * t + 1)
            if row0 < M:
                if PAIR:  # this consumer's half of a 2 * BM-row tile, in its own buffer; every column block
                    ta = which
                    row0 += which * BM
                    phase = j & 1
                else:  # the tile in one of two buffers; every other work item
                    ta = j % 2
                    phase = (j // 2) & 1
                end = gl.load(OFFS + e + 1)
                rows = row0 + gl.arange(0, BM, layout=row_l)
                rmask = rows < end
                g, dst = row_targets(rows, rmask, ORDER, GATE, TOK, stride_o, SCALE or RANK1, ATOMIC)
                g = gl.convert_layout(g, gl.SliceLayout(1, mma_l))  # the gates in the product's rows
                mbarrier.wait(a_full.index(ta), phase)
                for n in range(num_n):
                    if PAIR or it % 2 == which:
                        s = it % NS
                        mbarrier.wait(b_full.index(s), (it // NS) & 1)
                        mbarrier.wait(order.index(which), (turn & 1) ^ (1 - which))  # consumer 0 goes first
                        if row0 < end:  # (a PAIR tile's second half may lie past its expert: no product)
                            acc = gl.zeros((BM, BN), dtype=gl.float32, layout=mma_l)
                            acc = warpgroup_mma(a_bufs.index(ta), b_operand(b_bufs.index(s), W_RC), acc,
                                                is_async=True)
                            if SPLIT:
                                acc = warpgroup_mma(a_bufs2.index(ta), b_operand(b_bufs2.index(s), W_RC), acc,
                                                    is_async=True)
                            mbarrier.arrive(order.index(1 - which), count=1)  # the other may issue its chain now
                            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                            mbarrier.arrive(b_empty.index(s), count=1)
                            store_block(acc, n, e, rmask, dst, g, C, stride_c, OUT, Dout, layout, SCALE, ATOMIC,
                                        RANK1)
                        else:
                            mbarrier.arrive(order.index(1 - which), count=1)
                            mbarrier.arrive(b_empty.index(s), count=1)
                        turn += 1
                    it += 1  # (PAIR: both consumers take every item; its W slot's count is 2)
                mbarrier.arrive(a_empty.index(ta), count=1)  # both consumers arrive (PAIR: its owner): count 2 (1)
                j += 1

    @gluon.jit
    def down_ws_kernel(a_desc, a_desc2, w_desc, w_desc2, TILES, OFFS, ORDER, TOK, GATE, OUT, stride_o, C, stride_c, M,
                       Dout, n_tiles, W_STEP, SCALE: gl.constexpr, ATOMIC: gl.constexpr, RANK1: gl.constexpr,
                       STAGES: gl.constexpr, CREGS: gl.constexpr, LREGS: gl.constexpr, num_warps: gl.constexpr,
                       SPLIT: gl.constexpr = False, PAIR: gl.constexpr = False, W_RC: gl.constexpr = True):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BE: gl.constexpr = a_desc.block_type.shape[1]
        BE2: gl.constexpr = a_desc2.block_type.shape[1]
        dtype: gl.constexpr = a_desc.dtype
        # W's slots in its boxes' shape: [BE, BN] (row-major W) or [BN, BE] (W_out's column view)
        a_bufs = gl.allocate_shared_memory(dtype, [2, BM, BE], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES, w_desc.block_type.shape[0], w_desc.block_type.shape[1]],
                                           w_desc.layout)
        if SPLIT:  # Ein as two boxes of columns (base's 192 = 128 + 64): two products per item
            a_bufs2 = gl.allocate_shared_memory(dtype, [2, BM, BE2], a_desc2.layout)
            b_bufs2 = gl.allocate_shared_memory(dtype, [STAGES, w_desc2.block_type.shape[0],
                                                        w_desc2.block_type.shape[1]], w_desc2.layout)
        else:
            a_bufs2 = a_bufs
            b_bufs2 = b_bufs
        a_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        a_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        b_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        b_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(a_full.index(i), count=1)
            if PAIR:  # buffer i is consumer i's
                mbarrier.init(a_empty.index(i), count=1)
            else:
                mbarrier.init(a_empty.index(i), count=2)
            mbarrier.init(order.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(b_full.index(i), count=1)
            if PAIR:  # both consumers use every W tile
                mbarrier.init(b_empty.index(i), count=2)
            else:
                mbarrier.init(b_empty.index(i), count=1)
        # the tuples inline, as kernels/mlp_gluon.py's: a flag bound to a name first becomes a tensor (SPLIT must
        # stay a compile-time constant)
        gl.warp_specialize([
            (consumer, (a_desc, w_desc, TILES, a_bufs, a_bufs2, b_bufs, b_bufs2, a_full, a_empty, b_full, b_empty,
                        order, OFFS, ORDER, TOK, GATE, OUT, stride_o, C, stride_c, M, Dout, n_tiles, 0, SCALE, ATOMIC,
                        RANK1, SPLIT, PAIR, W_RC)),
            (consumer, (a_desc, w_desc, TILES, a_bufs, a_bufs2, b_bufs, b_bufs2, a_full, a_empty, b_full, b_empty,
                        order, OFFS, ORDER, TOK, GATE, OUT, stride_o, C, stride_c, M, Dout, n_tiles, 1, SCALE, ATOMIC,
                        RANK1, SPLIT, PAIR, W_RC)),
            (loader, (a_desc, a_desc2, w_desc, w_desc2, a_bufs, a_bufs2, b_bufs, b_bufs2, a_full, a_empty, b_full,
                      b_empty, TILES, M, Dout, n_tiles, W_STEP, SPLIT, PAIR, W_RC)),
        ], [4, 1], [CREGS, LREGS])

    def descriptors(a, w, BM, BN, boxes):
        """(A's, A's second box's, W's, W's second box's) TMA descriptors for Ein's `boxes` (`ein_boxes`), W's
        layout flag RC and its expert step (`weight_descriptors`); the second ones are the first where Ein is one
        box."""
        ad = box_descriptors(a, [[BM, b] for b in boxes if b])
        wd, rc, step = weight_descriptors(w, [b for b in boxes if b], BN)
        return (ad[0], ad[-1], wd[0], wd[-1]), rc, step

    # the parts kernels/mlp_gluon.py's kernel shares
    return down_ws_kernel, descriptors, types.SimpleNamespace(row_targets=row_targets, store_block=store_block,
                                                              w_tile=w_tile, b_operand=b_operand)


def box_descriptors(t: torch.Tensor, boxes) -> tuple:
    """Gluon TMA descriptors of the 2-D bf16/fp16 tensor `t` in each box shape of `boxes`, with the default
    (swizzled) shared-memory layout for the box: the operand descriptors of every WS kernel here."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    g = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[t.dtype]
    return tuple(TensorDescriptor.from_tensor(t, list(b), gl.NVMMASharedLayout.get_default_for(list(b), g))
                 for b in boxes)


def weight_descriptors(w: torch.Tensor, rows, cols: int):
    """(TMA descriptors of all experts' weights w [N, R, C] as one 2-D matrix, one per tile height in `rows`, the
    layout flag RC, and the step between experts' first rows): [r, cols] boxes of [N * R, C] (RC), or [cols, r]
    boxes of the [C, N * R] column view (`common.strided_expert_matrix`, `expert_boxes`: a height of 0 gets a 16 x 16
    box; the step is R but for a slice of each expert's rows). Every WS kernel's weights."""
    w2d, rc, step = strided_expert_matrix(w)
    return box_descriptors(w2d, expert_boxes(rc, rows, cols)), rc, step


def smem_bytes(BM: int, BN: int, Ein: int, stages: int, element_size: int = 2) -> int:
    """Shared memory of one program: two A buffers, the W ring, and at most 16 kB for the epilogue's layout
    conversion and the barriers (Triton 3.9, sm_90: 16.1 kB at BN >= 64, 8.1 kB at BN = 32)."""
    return (2 * BM * Ein + stages * Ein * BN) * element_size + 17 * 1024


def ein_boxes(Ein: int):
    """(BE, BE2): Ein as one power-of-two box of BE columns plus, where Ein is not a power of two, a second of BE2
    (base's 192 = 128 + 64; 0 = none); None where two such boxes do not make Ein exactly (a box may not reach into
    the next expert's weight rows) or the first is wider than 256."""
    if Ein < 16:
        return None
    be = 1 << (Ein.bit_length() - 1)
    rest = Ein - be
    if be > 256 or (rest and (rest & (rest - 1) or rest < 16)):
        return None
    return be, rest


def ein_passes(Ein: int) -> int:
    """How many launches cover Ein: one where it is one or two TMA boxes (`ein_boxes`); Ein / PASS_WIDTH where it is
    a longer multiple of PASS_WIDTH (SwiGLU 8B's dx, Ein = 512 = 2 x 256: each launch adds the product of its slice
    of A's columns and W's rows into the output; the buffers of one launch over all 512 would not fit shared memory
    at the 256-row M-tiles of `auto`'s pairs); 0 otherwise (not served)."""
    if ein_boxes(Ein) is not None:
        return 1
    return Ein // PASS_WIDTH if Ein % PASS_WIDTH == 0 else 0


def serves(a: torch.Tensor, w: torch.Tensor, BM: int, BN: int, stages: int, view: str = "fallback",
           adds: bool = True) -> bool:
    """Whether this kernel takes A [M, Ein] and W [N, Ein, Dout] with this tile: sm_90, bf16/fp16, A's rows
    contiguous, W one row-major [N * Ein, Dout] matrix, or with `view` one that is not: "copy", W's row-major copy
    (`w.contiguous()`, made only if it serves), "tma", W_out's column view as it is ([N, Ein, Dout] with unit
    stride along Ein: the [Dout, N * Ein] matrix, read in [BN, Ein] boxes and transposed in shared memory;
    "fallback": no such W), Ein one or two power-of-two boxes of 16 to 256 columns (`ein_boxes`: TMA boxes and
    shared-memory tiles; a second box costs a second product per item) or, where the launch `adds` into its output
    (the atomic combines), a multiple of PASS_WIDTH run in passes (`ein_passes`), 16-byte aligned, BM 64, 128 or 256
    (whole warpgroup MMAs), BN 16..256, a W ring of two or more slots (with one, a consumer's wait for its item's W
    could pass on the other consumer's item: a barrier's phase parity cannot tell them apart), the buffers within
    shared memory, and a Triton whose Gluon builds the kernel (`_build`)."""
    Ein, Dout = w.shape[1:]
    es = a.element_size()
    if not _sm90(a) or a.dtype not in (torch.bfloat16, torch.float16) or w.dtype != a.dtype:
        return False
    if BM not in (64, 128, 256) or not 16 <= BN <= 256 or stages < 2 or a.shape[0] == 0 or Dout == 0:
        return False
    passes = ein_passes(Ein)
    width = Ein // max(passes, 1)  # each launch's slice of Ein
    if not passes or (passes > 1 and not adds) or a.shape[1] != Ein or (Dout * es) % 16:
        return False
    if not tma_aligned(a):  # (so is every pass's slice of its columns: width * es is a multiple of 16)
        return False
    if not (view == "copy" and not w.is_contiguous()):  # (a fresh copy is row-major and aligned)
        matrix = strided_expert_matrix(w[:, :width])
        if matrix is None or not (matrix[1] or view == "tma") or not tma_aligned(matrix[0]):
            return False
    return smem_bytes(BM, BN, width, stages, es) <= SMEM_LIMIT and _build_once() is not None


def _sm90(t: torch.Tensor) -> bool:
    """Whether `t` is on a compute capability 9.0 GPU (wgmma, warp specialisation as built here)."""
    return t.device.type == "cuda" and torch.cuda.get_device_capability(t.device) == (9, 0)


def built_once(state: dict, build):
    """`build()`'s kernels, built on first use and kept in state["build"]; None where they cannot be built (no
    Gluon, an older Triton or another API: the launchers fall back to their Triton kernels)."""
    if state["build"] is None:
        try:
            state["build"] = build()
        except Exception:
            state["build"] = False
    return state["build"] or None


def _build_once():
    return built_once(_STATE, _build)


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(a, w, tiles, offsets, order, token, gate, out, c, M, scale: bool, atomic: bool, rank1: bool,
           BM: int, BN: int, stages: int, pair: bool = False):
    """The kernel over `tiles` ([n, 2] int32 (expert, first row), first row M = empty) with persistent
    programs, one per SM. The caller checked `serves` (W row-major or, with view "tma", W_out's column view).
    `pair`: the tiles are 2 * BM rows high, each consumer takes BM of them over every column block, and the two
    share each W tile (half the W reads per row). An Ein of several passes (`ein_passes`) is one launch per slice
    of A's columns and W's rows, each adding into `out` (the rank-1 term in the first only)."""
    kernel, descriptors, _ = _build_once()
    Ein, Dout = w.shape[1:]
    passes = ein_passes(Ein)
    width = Ein // passes
    boxes = ein_boxes(width)
    n_tiles = tiles.shape[0]
    grid = (max(1, min(n_tiles, _sms(a.device))),)
    for p in range(passes):
        cols = slice(p * width, (p + 1) * width)
        descs, rc, step = descriptors(a[:, cols], w[:, cols], BM, BN, boxes)
        kernel[grid](*descs, tiles, offsets, order, token, gate, out, out.stride(0), c, c.stride(0), M, Dout,
                     n_tiles, step, SCALE=scale, ATOMIC=atomic, RANK1=rank1 and p == 0, STAGES=stages,
                     CREGS=CONSUMER_REGS, LREGS=LOADER_REGS, num_warps=4, maxnreg=MAX_REGS, SPLIT=boxes[1] > 0,
                     PAIR=pair, W_RC=rc)
