"""Device helpers shared by the expert kernels: activations and their derivatives, where an M-tile of
the expert-sorted rows starts (tiles never straddle two experts), and a program's share of initialising
the output that a later kernel adds into (with `fill_args`, its launch arguments), and all experts' weights as
one 2-D matrix for TMA (`expert_matrix`); on the host, the launches' dot precision (`prec`) and expert
block (`np2`)."""
import torch
import triton
import triton.language as tl

ACT_CODES = {  # name -> (elementwise function code, GLU)
    "relu": (0, False), "gelu": (1, False), "squared_relu": (2, False), "gelu_tanh": (4, False),
    "swiglu": (3, True), "geglu": (1, True), "reglu": (0, True),
}


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 0:
        out = tl.maximum(h, 0.0)
    elif ACT == 1:
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        r = tl.maximum(h, 0.0)
        out = r * r
    elif ACT == 4:  # tanh-approximate GELU; tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        out = 0.5 * h * (2.0 * tl.sigmoid(2.0 * u))
    else:
        out = h * tl.sigmoid(h)
    return out


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    if ACT == 0:
        out = tl.where(h > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        out = cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    elif ACT == 2:
        out = 2.0 * tl.maximum(h, 0.0)
    elif ACT == 4:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        out = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    else:
        s = tl.sigmoid(h)
        out = s * (1.0 + h * (1.0 - s))
    return out


@triton.jit
def _tile_of(OFFS, pid_m, N, BM: tl.constexpr, NP2: tl.constexpr):
    """M-tile `pid_m` -> (expert, first sorted row, end of that expert's rows)."""
    ids = tl.arange(0, NP2)
    valid = ids < N
    start = tl.load(OFFS + ids, mask=valid, other=0)
    end = tl.load(OFFS + ids + 1, mask=valid, other=0)
    ntiles = (end - start + BM - 1) // BM
    cum = tl.cumsum(ntiles, 0)
    e = tl.sum((cum <= pid_m).to(tl.int32), 0)
    sel = ids == e
    first_tile = tl.sum(tl.where(sel, cum - ntiles, 0), 0)
    row0 = tl.sum(tl.where(sel, start, 0), 0) + (pid_m - first_tile) * BM
    row_end = tl.sum(tl.where(sel, end, 0), 0)
    return e, row0, row_end


@triton.jit
def _grid_tile(OFFS, TILES, num_n, N, BM: tl.constexpr, NP2: tl.constexpr, SCHED: tl.constexpr):
    """This program's place in a grid of (expert-aligned M-tile, column block) pairs: (expert, column
    block, first row, rows, row mask, whether the tile holds any row). M-tiles in expert order, or with
    SCHED in the order of the schedule TILES ([tiles, 2] int32: expert, first row; `tile_order.token_window_tiles`)."""
    pid = tl.program_id(0)
    if SCHED:
        t = pid // num_n
        e = tl.load(TILES + 2 * t)
        row0 = tl.load(TILES + 2 * t + 1)
        row_end = tl.load(OFFS + e + 1)
    else:
        e, row0, row_end = _tile_of(OFFS, pid // num_n, N, BM, NP2)
    rows = row0 + tl.arange(0, BM)
    return e, pid % num_n, row0, rows, rows < row_end, row0 < row_end


@triton.jit
def _expert_tile(WD, r0, c0, RC: tl.constexpr):
    """The [r, c] tile at row r0 (of all experts' N * R rows) and column c0 of expert weights w [N, R, C], by TMA:
    WD describes them as one [N * R, C] matrix (RC) in [r, c] boxes, or as one [C, N * R] matrix (e.g. W_out's
    column view) in [c, r] boxes (`descriptors.expert_descriptors`). Past the matrix, TMA's zeros."""
    if RC:
        t = WD.load([r0, c0])
    else:
        t = WD.load([c0, r0]).T
    return t


@triton.jit
def _load_a(ap, k0, ks, K, EVEN_K: tl.constexpr):
    """A [BM, BK] operand tile at k0 of a K-long reduction (rows gathered by the caller's pointers), masked only
    where K is ragged."""
    if EVEN_K:
        a = tl.load(ap)
    else:
        a = tl.load(ap, mask=((k0 + ks) < K)[None, :], other=0.0)
    return a


@triton.jit
def _load_w(wp, k0, ks, K, cmask, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """A [BK, BN] weight tile at k0 of a K-long reduction, masked only where K or the columns are ragged."""
    if EVEN_K:
        if EVEN_N:
            b = tl.load(wp)
        else:
            b = tl.load(wp, mask=cmask[None, :], other=0.0)
    else:
        b = tl.load(wp, mask=((k0 + ks) < K)[:, None] & cmask[None, :], other=0.0)
    return b


@triton.jit
def _fill_share(FILL, ROW, numel, width, chunk, pid, HAS_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Share `pid` (usually the program's id) of initialising a row-major [numel / width, width] output that a later
    launch adds into with atomics: elements [pid * chunk, (pid + 1) * chunk) get ROW[column] (the output bias) or 0.
    Done inside a kernel that runs anyway, instead of a fill launch of its own (docs/kernels.md v11)."""
    start = pid.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, numel)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        if HAS_ROW:
            v = tl.load(ROW + idx % width, mask=m, other=0.0).to(FILL.dtype.element_ty)
        else:
            v = tl.zeros((BLOCK,), dtype=FILL.dtype.element_ty)
        tl.store(FILL + idx, v, mask=m)


FILL_BLOCK = 1024  # elements per store step of an output initialisation inside another kernel


def fill_args(fill, programs: int, dummy):
    """(kernel arguments, constexprs) of `_fill_share` for a launch of `programs` programs that
    also initialises fill = (out, row or None), or of none (`dummy`: any tensor, unused)."""
    if fill is None:
        return (dummy, dummy, 0, 1, 0), dict(HAS_FILL=False, HAS_FILL_ROW=False, FILL_BLOCK=FILL_BLOCK)
    out, row = fill
    chunk = triton.cdiv(triton.cdiv(out.numel(), programs), FILL_BLOCK) * FILL_BLOCK
    return ((out, out if row is None else row, out.numel(), out.shape[1], chunk),
            dict(HAS_FILL=True, HAS_FILL_ROW=row is not None, FILL_BLOCK=FILL_BLOCK))


def expert_matrix(w):
    """All experts' weights w [N, R, C] as one 2-D matrix for TMA, and RC (`_expert_tile`'s layout flag): the
    [N * R, C] view where C is contiguous (RC), the [C, N * R] view where R is (e.g. W_out's column view), or
    None for any other layout."""
    m = strided_expert_matrix(w)
    return None if m is None or m[2] != w.shape[1] else m[:2]


def strided_expert_matrix(w):
    """(matrix, RC, step): `expert_matrix` where each expert's R rows may be a slice of a longer run of `step` rows
    (e.g. half of each expert's rows of W_in, kernels/down_gluon.py's passes): expert e's are rows (RC: C contiguous)
    or columns (R contiguous) e * step .. e * step + R of one 2-D matrix; None for any other layout."""
    N, R, C = w.shape
    s0, s1, s2 = w.stride()
    if s2 == 1 and s1 > 0 and s0 % s1 == 0 and s0 // s1 >= R:
        step = s0 // s1
        return w.as_strided(((N - 1) * step + R, C), (s1, 1)), True, step
    if s1 == 1 and s0 >= R:
        return w.as_strided((C, (N - 1) * s0 + R), (s2, 1)), False, s0
    return None


def tma_aligned(t) -> bool:
    """Whether the 2-D `t` has contiguous rows, 16-byte aligned (a TMA descriptor's global layout)."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def expert_boxes(rc: bool, rows, cols: int) -> list:
    """TMA box shapes over `expert_matrix`'s view, one per tile height r in `rows`: [r, cols] (RC) or [cols, r];
    a height of 0 (an unused second tile) gets a 16 x 16 box."""
    return [[16, 16] if not r else [r, cols] if rc else [cols, r] for r in rows]


def prec(t: torch.Tensor) -> str:
    """The dot products' precision for operands like `t`: exact in fp32, else tf32 (bf16/fp16 need none)."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def np2(n: int) -> int:
    """A power of two >= n and >= 16 (a constexpr block over n experts)."""
    return max(16, triton.next_power_of_2(n))
