"""Every kernel of the `triton` expert backend, and one config of each kernel variant, compiles for
sm_90 (H100/H200), and every default launch for sm_80 (A100), on this machine without a GPU:
tools/compile_report.py runs the real launchers on CPU tensors with a stand-in driver, so CI catches what
the interpreter cannot (layouts, register allocation, Hopper's wgmma/TMA lowering, A100's mma.sync and
which atomics it has). The device image's own Triton version is used for the numbers
in benchmarks/results; here it is whatever CI installed, so only compilation and the Hopper instructions
are checked, never register or spill counts. The warp-specialised Gluon down kernel (down variant 5)
is compiled where the installed Triton's Gluon builds it (>= 3.9), and its launcher's fallback to STAGED
is checked without compiling.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

try:
    from .backend_cases import Recorder, gluon_stand_in
except ImportError:  # run as a script: the compile subprocess, which does not need them
    Recorder = gluon_stand_in = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "compile_report.py")


def _compile_env(env_extra=None) -> dict:
    """The environment of a subprocess that compiles offline; skips where that cannot or need not run."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernels are compiled and run by test_backends_gpu.py")
    ptxas = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton build has no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return env


def _report(*args, env_extra=None):
    env = _compile_env(env_extra)
    shapes = () if "--shapes" in args else ("--shapes", "tiny")
    out = subprocess.run([sys.executable, TOOL, *shapes, "--tokens", "512", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    header = [i for i, ln in enumerate(out.stdout.splitlines()) if ln.startswith("shape")][0]
    return [ln.split() for ln in out.stdout.splitlines()[header + 1:] if ln.strip()]


LAUNCHES = ["up", "down", "up_bwd", "wgrad_dw2", "wgrad_dw1", "down_dx", "wgrad_dw1_fold", "wgrad_dw1_foldrows",
            "wgrad_dw2_f32", "wgrad_dw1_f32", "down_dx_fold", "down_dx_buffer", "fwd_pair", "fwd_pair_fold", "bwd_pair",
            "bwd_pair_fold", "fwd_fused"]  # (bench_kernels' `fill` is a torch op)


def _check(rows, expect_launches, mma="64x"):
    """rows: shape act launch config... kernel regs stack smem warps ctas LDGSTS UTMALDG atom cas mma.
    mma: Hopper's wgmma (HGMMA 64xNx16), or A100's mma.sync (HMMA 16816)."""
    assert rows, "no launch was compiled"
    assert {r[2] for r in rows} == set(expect_launches)
    gemms = {}  # (launch, config) -> whether one of its kernels multiplies (a two-pass up_bwd's second does not)
    for r in rows:
        key = (r[2], " ".join(r[3:-11]))
        gemms[key] = gemms.get(key, False) or r[-1].startswith(mma)
        assert int(r[-2]) == 0, f"a compare-and-swap loop (an atomic add the GPU lacks) in {r}"
        if r[-11] == "_down_tma_kernel":
            assert int(r[-4]) > 0 and int(r[-5]) == 0, f"the TMA variant does not load through TMA: {r}"
    assert all(gemms.values()), f"no {mma} matrix instructions in {[k for k, v in gemms.items() if not v]}"
    return {r[-11] for r in rows}


def _gluon(kernel: str, module: str, otherwise: frozenset = frozenset()) -> set:
    """{kernel} where the installed Triton's Gluon builds kernels/`module`.py (`auto`'s base forward, also in
    training for the first eager launch of a shape, its base weight gradients and ReLU's up_bwd), else
    `otherwise`."""
    built = importlib.import_module(f"ssd_megatron.ffn.backends.kernels.{module}")._build_once() is not None
    return {kernel} if built else set(otherwise)


def test_relu_launches_and_variants_compile_for_sm90():
    kernels = _check(_report("--activations", "relu", "--variants", "one"), LAUNCHES)
    assert kernels == ({"_up_kernel", "_down_kernel", "_down_tma_kernel", "_wgrad_kernel", "_mlp_kernel"}
                       | _gluon("wgrad_ws_kernel", "wgrad_gluon") | _gluon("mlp_ws_kernel", "mlp_gluon")
                       | _gluon("up_bwd_ws_kernel", "up_bwd_gluon"))


def test_wide_programs_compile_for_sm90():
    """Session 19's wider programs where E = 192 is not a power of two (base shape): whole-E up and up_bwd
    (128 + 64 columns), the two-pass up_bwd, whole-P wgrad (two accumulators) and STAGED down over a
    192-deep (128 + 64) reduction; `auto`'s dx there: the WS down kernel over two boxes of Ein (128 + 64) where
    this Triton's Gluon builds it, else the TMA kernel."""
    rows = _report("--shapes", "base", "--launches", "up,up_bwd,down_dx,wgrad_dw1", "--configs",
                   "up_bwd=64,256,64,8,3|128,256,64,8,3,1;wgrad=256,128,64,8,3;down=64,64,64,4,2,4")
    kernels = _check(rows, ["up", "up_bwd", "down_dx", "wgrad_dw1"])
    expected = {"_up_kernel", "_down_kernel", "_wgrad_kernel"}
    assert kernels == (expected | _gluon("wgrad_ws_kernel", "wgrad_gluon")
                       | _gluon("down_ws_kernel", "down_gluon", frozenset({"_down_tma_kernel"})))
    two_tile = [r for r in rows if r[-1] == "64x128x16,64x64x16" or r[-1] == "64x32x16,64x64x16"]
    assert {r[2] for r in two_tile} >= {"up", "wgrad_dw1"}, rows  # two accumulators, 128 + 64 wide


def test_glu_gather_gemm_compiles_for_sm90():
    kernels = _check(_report("--activations", "swiglu", "--launches", "up,up_bwd,fwd_fused", "--variants", "one"),
                     ["up", "up_bwd", "fwd_fused"])
    assert kernels == {"_up_kernel", "_mlp_kernel"}


def test_token_window_tile_order_compiles_for_sm90():
    """The M-tiles of up, up_bwd, both down launches and the fused forward from a schedule (SSD_TRITON_TILE_ORDER=token; `auto`
    takes grouped windows for the fused forward at the 8B shape)."""
    kernels = _check(_report("--activations", "relu", "--launches", "up,down,up_bwd,down_dx,fwd_fused",
                             env_extra={"SSD_TRITON_TILE_ORDER": "token"}),
                     ["up", "down", "up_bwd", "down_dx", "fwd_fused"])
    assert kernels == {"_up_kernel", "_down_tma_kernel"} | _gluon("mlp_ws_kernel", "mlp_gluon", {"_mlp_kernel"})


@pytest.mark.parametrize("act", ["relu", "swiglu"])
def test_default_launches_compile_for_sm80(act):
    """A100 (what `auto` now runs the triton backend on): mma.sync, pointer loads instead of TMA, and the
    default combine's atomics native (bf16 adds before Hopper would be compare-and-swap loops, hence fp32
    ones: `default_combine`)."""
    kernels = _check(_report("--arch", "80", "--activations", act), LAUNCHES, mma="16816")
    assert kernels == {"_up_kernel", "_down_kernel", "_wgrad_kernel", "_mlp_kernel"}


# The warp-specialised Gluon down kernel (down variants 5 and 6, WS and WS_PAIR: kernels/down_gluon.py; `auto`'s
# for 8B's dx under Triton >= 3.9). Gluon has no interpreter, so on CPU: its offline compile for sm_90 through the real
# launcher, and the launcher's choice (the kernel where it serves, STAGED elsewhere). test_backends_gpu.py (`down_ws`) checks its results.
DOWN_WS = (64, 64, 64, 4, 3, 5)
# name -> (Ein, dtype, combine, gate scale, rank-1 term[, pairs[, W_out's column view]]): dx (bf16 adds, with the
# router's rank-1 term), the forward's down (scaled; fp32 adds, the (t, k) rows stored), 8B's Ein = 256 in fp16,
# base's Ein = 192 as two boxes (with the router's term, as base trains); in pairs (WS_PAIR, `auto`'s for 8B's dx) at
# 8B's Ein and at two boxes; the forward's down reading W_out's column view by TMA (view "tma": 8B SwiGLU's in pairs,
# base SwiGLU's two boxes); SwiGLU 8B's dx (Ein = 512) in two passes of 256 columns (`ein_passes`), in pairs, with the
# router's term (in the first pass only)
WS_LAUNCHES = {"dx": (64, "bfloat16", "atomic16", False, False),
               "dx-192-fold": (192, "bfloat16", "atomic16", False, True),
               "dx-fold": (64, "bfloat16", "atomic16", False, True),
               "fwd-atomic32": (64, "bfloat16", "atomic32", True, False),
               "fwd-buffer": (64, "bfloat16", "buffer", True, False),
               "dx-256-fp16": (256, "float16", "atomic16", False, False),
               "dx-256-fold-pairs": (256, "bfloat16", "atomic16", False, True, True),
               "dx-192-pairs": (192, "bfloat16", "atomic16", False, False, True),
               "fwd-256-view-pairs": (256, "bfloat16", "atomic16", True, False, True, True),
               "fwd-192-view": (192, "bfloat16", "atomic16", True, False, False, True),
               "dx-512-passes-fold-pairs": (512, "bfloat16", "atomic16", False, True, True)}


def _down_case(Ein, dtype, T=100, D=128, N=8, K=2):
    """(A [T*K, Ein], W [N, Ein, D], plan, gate [T*K], rank-1 coefficient and c) on CPU, skewed loads and
    experts 6 and 7 empty."""
    from ssd_megatron.ffn.backends.routing import make_plan
    g = torch.Generator().manual_seed(0)
    idx = (torch.rand(T, N, generator=g)[:, :6] + torch.linspace(2, 0, 6)).topk(K, dim=1).indices
    a = torch.randn(T * K, Ein, generator=g).to(dtype)
    w = torch.randn(N, Ein, D, generator=g).to(dtype)
    return a, w, make_plan(idx, N), torch.rand(T * K, generator=g), (torch.randn(T * K), torch.randn(N, D))


def _column_view(w):
    """w [N, Ein, D] as W_out's column view holds it: the same values with unit stride along Ein."""
    return torch.empty(w.shape[2], w.shape[0] * w.shape[1], dtype=w.dtype).t().view(w.shape).copy_(w)


def _ws_compile_main():  # in a subprocess: compile-only launches for sm_90 (tools/compile_report.py's driver)
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import compile_report as cr

    from ssd_megatron.ffn.backends.kernels import down_launch, tile_configs as tc
    cr.offline(90)

    def launch(Ein, dtype, combine, scale, rank1, pairs=False, view=False):
        a, w, plan, gate, r1 = _down_case(Ein, getattr(torch, dtype))
        w = _column_view(w) if view else w

        def call():
            tc.force_config(down=DOWN_WS[:5] + (tc.WS_PAIR if pairs else tc.WS,))
            down_launch.down_scatter(a, w, plan, gate if scale else None, combine, rank1=r1 if rank1 else None,
                                     view="tma" if view else "fallback")
        return call
    print("WS " + json.dumps(cr.compile_each({name: launch(*c) for name, c in WS_LAUNCHES.items()})))


def compiled_in_subprocess(script: str, tag: str, timeout: int = 600) -> dict:
    """The JSON that `script` (a test module run as a program: its compile-only launches) prints after `tag`."""
    out = subprocess.run([sys.executable, script], env=_compile_env(), capture_output=True, text=True,
                         timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(tag + " ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1][len(tag) + 1:])


@pytest.fixture(scope="module")
def ws_compiled():
    """{WS_LAUNCHES name: [[kernel name, compile_report's resources], ...] or the compile error}."""
    _compile_env()
    from ssd_megatron.ffn.backends.kernels import down_gluon
    if down_gluon._build_once() is None:
        pytest.skip(f"this triton ({__import__('triton').__version__}) has no Gluon the WS down kernel builds with "
                    f"(needs >= {'.'.join(map(str, down_gluon.MIN_TRITON))})")
    return compiled_in_subprocess(os.path.abspath(__file__), "WS")


@pytest.mark.parametrize("name", list(WS_LAUNCHES))
def test_ws_down_compiles_for_sm90(ws_compiled, name):
    """Each of the kernel's specialisations (the combines, gate scale, rank-1 term, Ein = 64, 192 (two boxes), 256
    and 512 (two passes), bf16 and fp16, W row-major and W_out's column view) compiles for sm_90 as a
    warp-specialised kernel: TMA loads, wgmma, and native vector atomics where it adds (no compare-and-swap loop);
    the launcher took it, not STAGED, once per pass."""
    from ssd_megatron.ffn.backends.kernels import down_gluon
    res = ws_compiled[name]
    assert not isinstance(res, str), res
    assert [kname for kname, _ in res] == ["down_ws_kernel"] * down_gluon.ein_passes(WS_LAUNCHES[name][0]), res
    view = WS_LAUNCHES[name][6:] == (True,)  # (wgmma reads the column view's W tiles K-major: no transpose flag)
    for _, r in res:
        assert r["warps"] > 4 and r["utmaldg"] > 0 and r["ldgsts"] == 0 and r["mma"].startswith("64x"), r
        assert r["trans_b"] == ("0" if view else "1"), r
        assert r["cas"] == 0 and (r["atom"] > 0) == (WS_LAUNCHES[name][2] != "buffer"), r
        assert r["smem_kb"] * 1024 <= 227 * 1024 and r["stack"] == 0, r


def test_ws_down_variant_is_accepted(monkeypatch):
    pytest.importorskip("triton")
    from ssd_megatron.errors import UserError
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc
    monkeypatch.setenv("SSD_TRITON_CONFIG", "down=64,64,64,4,3,5")
    assert tc.pick_tile("down:atomic16", (256, 4096, "torch.bfloat16"), None) == (64, 64, 64, 4, 3, tc.WS)
    assert tc.parse_configs("down:buffer=128,64,64,4,2,5") == {"down:buffer": (128, 64, 64, 4, 2, tc.WS)}
    assert tc.parse_configs("down=128,64,64,4,2,6") == {"down": (128, 64, 64, 4, 2, tc.WS_PAIR)}
    for other in ("up", "up_bwd_glu"):  # the variants are down's, mlp's, up_bwd's and wgrad's only
        for v in (5, 6):
            with pytest.raises(UserError, match="5 \\(WS\\)"):
                tc.parse_configs(f"{other}=64,64,64,4,3,{v}")


def _ws_operands(why):
    """(A, W, plan, gate, (BM, BN, STAGES)) of a launch the WS kernel does not serve for reason `why`, or of
    one it serves ("served": 8B's Ein = 256 at 64 x 64 with three W stages; "served-passes": SwiGLU 8B's dx,
    Ein = 512 in two passes)."""
    ein = {"served": 256, "smem": 256, "ein": 200, "served-passes": 512, "passes-buffer": 512}.get(why, 64)
    a, w, plan, gate, _ = _down_case(ein, torch.bfloat16)
    if why == "fp32":
        a, w = a.float(), w.float()
    if why == "column-view":  # W_out's [N, E, D] view (unit stride along E), with the default view "fallback"
        w = _column_view(w)
    return a, w, plan, gate, {"smem": (128, 64, 3), "stages": (64, 64, 1), "bm": (32, 64, 3)}.get(why, (64, 64, 3))


WS_NOT_SERVED = ["cpu", "older-triton", "ein", "fp32", "column-view", "smem", "stages", "bm", "passes-buffer"]


@pytest.mark.parametrize("why", WS_NOT_SERVED + ["served", "served-passes"])
def test_ws_down_falls_back_to_staged(monkeypatch, why):
    """Down variant 5 launches the Gluon kernel over the expert-ordered M-tile table where it serves (once per
    pass of Ein), and STAGED (the Triton kernel with STAGED=True) otherwise: not sm_90 (here: CPU), a Triton
    without the Gluon it is written for, Ein not one or two power-of-two boxes (200 = 128 + 72), fp32, W_out's
    column view with the default view, too much shared memory (128 x 64 with three W stages of 256 rows), a ring of
    one W slot, BM < 64, Ein in passes (512) where the launch stores rather than adds (the (t, k) buffer)."""
    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends.kernels import down_launch, tile_configs as tc
    from ssd_megatron.ffn.backends.kernels import down_gluon
    calls = []
    monkeypatch.setattr(down_launch, "_down_kernel", Recorder(calls, "triton"))
    monkeypatch.setattr(down_launch, "_down_tma_kernel", Recorder(calls, "tma"))
    monkeypatch.setattr(down_gluon, "launch", Recorder(calls, "ws"))
    gluon_stand_in(monkeypatch, down_gluon, why)
    a, w, plan, gate, (BM, BN, stages) = _ws_operands(why)
    tc.force_config(down=(BM, BN, 64, 4, stages, tc.WS))
    try:
        down_launch.down_scatter(a, w, plan, gate, "buffer" if why == "passes-buffer" else "atomic16")
    finally:
        tc.force_config()
    assert len(calls) == 1, calls
    name, args, kwargs = calls[0]
    if why.startswith("served") and down_gluon._build_once() is not None:
        assert name == "ws", (name, kwargs)
        M, N = plan.num_rows, plan.num_experts
        e = torch.repeat_interleave(torch.arange(N), (plan.offsets.diff() + BM - 1) // BM)
        starts = torch.cat([torch.arange(plan.offsets[i], plan.offsets[i + 1], BM) for i in range(N)])
        want = torch.full((-(-M // BM) + N, 2), M, dtype=torch.int32)  # the upper bound cdiv(M, BM) + N
        want[:, 0] = N - 1
        want[: len(e), 0], want[: len(e), 1] = e, starts
        assert torch.equal(args[2], want), (args[2], want)  # the expert-ordered tiles, empty ones (row M) last
        assert args[10:] == (True, True, False, BM, BN, stages)  # scale, atomic, rank-1, the tile
    else:  # (served, but this Triton has no Gluon that builds it: STAGED too)
        assert name == "triton" and kwargs["STAGED"] and not kwargs["ROWLOOP"], (name, kwargs)


@pytest.mark.parametrize("view", [False, True])
def test_ws_down_passes_slice_a_and_w(monkeypatch, view):
    """An Ein of two passes (SwiGLU 8B's dx, 512 = 2 x 256; also W_out's column view with view "tma") launches the
    kernel once per 256-column slice: A's columns and each expert's W rows of that slice, by TMA descriptors over
    the slice (W as one 2-D matrix whose experts start `step` = 512 rows apart), each pass adding into the same
    output, the rank-1 term in the first pass only."""
    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends.kernels import down_gluon
    built = down_gluon._build_once()
    if built is None:
        pytest.skip("this triton has no Gluon the WS down kernel builds with")
    runs = []

    class Kernel:  # stands in for the compiled kernel: records each launch's arguments
        def __getitem__(self, grid):
            return lambda *args, **kwargs: runs.append((args, kwargs))

    monkeypatch.setitem(down_gluon._STATE, "build", (Kernel(),) + built[1:])
    monkeypatch.setattr(down_gluon, "_sms", lambda device: 132)
    a, w, plan, gate, (coef, c) = _down_case(512, torch.bfloat16)
    w = _column_view(w) if view else w
    tiles = torch.zeros(4, 2, dtype=torch.int32)
    down_gluon.launch(a, w, tiles, plan.offsets, plan.order, plan.token, coef, a.new_zeros(100, 128), c, a.shape[0],
                      False, True, True, 128, 64, 2, pair=True)
    assert [kw["RANK1"] for _, kw in runs] == [True, False] and all(kw["W_RC"] != view for _, kw in runs)
    N, D = w.shape[0], w.shape[2]
    for p, (args, kw) in enumerate(runs):
        a_desc, a_desc2, w_desc, w_desc2 = args[:4]
        assert a_desc is a_desc2 and w_desc is w_desc2 and not kw["SPLIT"]  # one 256-column box per pass
        assert torch.equal(a_desc.base, a[:, 256 * p:256 * (p + 1)]) and a_desc.block_shape == [128, 256]
        assert args[16] == 512  # W_STEP: expert e's rows start at e * 512 of the pass's matrix
        m = w_desc.base
        for e in range(N):  # each expert's slice of rows, where the kernel's boxes read it
            got = m[:, e * 512:e * 512 + 256].t() if view else m[e * 512:e * 512 + 256]
            assert torch.equal(got, w[e, 256 * p:256 * (p + 1)])
        assert w_desc.block_shape == ([64, 256] if view else [256, 64]) and m.shape[view] == (N - 1) * 512 + 256
        assert m.shape[1 - view] == D


@pytest.mark.parametrize("why", ["served", "served-expert", "served-boxes", "served-copy", "served-tma", "not-served",
                                 "buffer", "narrow", "passes", "forced", "env"])
def test_auto_takes_ws_down_for_wide_atomic_combines(monkeypatch, why):
    """`auto` launches the Gluon down kernel at AUTO_WS for an atomic combine into rows >= 2048 wide (8B's
    dx) where it serves, over token windows of AUTO_GROUP experts (on Hopper, as `_hopper` takes the CPU;
    docs/kernels.md v37), in expert order when SSD_TRITON_WS_DOWN_ORDER says so; at AUTO_WS_BOXES, in expert
    order, for narrower rows whose Ein is two TMA boxes (base ReLU's dx: 192 = 128 + 64, rows 768 wide); and the
    usual default everywhere else: where it does not serve (e.g. Triton < 3.9), for the (t, k) buffer, for
    narrower rows of one box, for an Ein in passes (SwiGLU 8B's dx: not yet timed), or when a forced or environment
    config names down. With W_out's column view (the
    unfused forward's down) and view "copy", the kernel gets a row-major copy of it, with "tma" the view itself;
    `auto` asks `serves` about the view it will pass."""
    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends.kernels import auto_ws, down_launch, tile_configs as tc, tile_order
    from ssd_megatron.ffn.backends.kernels import down_gluon
    calls, served = [], []
    monkeypatch.setattr(down_launch, "_down_kernel", Recorder(calls, "triton"))
    monkeypatch.setattr(down_launch, "_down_tma_kernel", Recorder(calls, "tma"))
    monkeypatch.setattr(down_gluon, "launch", Recorder(calls, "ws"))
    monkeypatch.setattr(down_gluon, "serves", lambda *args, **kw: served.append(args[2:]) or why != "not-served")
    monkeypatch.delenv("SSD_TRITON_TUNE", raising=False)
    monkeypatch.delenv("SSD_TRITON_TILE_ORDER", raising=False)
    monkeypatch.delenv("SSD_TRITON_WS_DOWN_ORDER", raising=False)
    if why == "served-expert":
        monkeypatch.setenv("SSD_TRITON_WS_DOWN_ORDER", "expert")
    if why == "env":
        monkeypatch.setenv("SSD_TRITON_CONFIG", "down=64,128,64,4,3,1")
    else:
        monkeypatch.delenv("SSD_TRITON_CONFIG", raising=False)
    # (T = 400: experts of up to four 128-row tiles, so that token windows and expert order differ)
    a, w, plan, gate, _ = _down_case({"served-boxes": 192, "passes": 512}.get(why, 64), torch.bfloat16, T=400,
                                     D={"narrow": 64, "served-boxes": 768}.get(why, 2048))
    view = {"served-copy": "copy", "served-tma": "tma"}.get(why, "fallback")
    if view != "fallback":
        w = _column_view(w)
    if why == "forced":
        tc.force_config(down=(64, 128, 64, 4, 3, tc.ROWLOOP))
    try:
        down_launch.down_scatter(a, w, plan, None, "buffer" if why == "buffer" else "atomic16", view=view)
    finally:
        tc.force_config()
    assert len(calls) == 1, calls
    name, args, kwargs = calls[0]
    if why.startswith("served"):
        cfg = auto_ws.AUTO_WS_BOXES if why == "served-boxes" else auto_ws.AUTO_WS
        assert name == "ws" and set(served) == {cfg[:2] + cfg[4:5] + (view,)} and args[-3:] == cfg[:2] + cfg[4:5]
        pair = cfg[5] == tc.WS_PAIR  # (8B's dx in pairs: M-tiles of 256 rows; base's in 128)
        assert kwargs == {"pair": pair} and pair == (why != "served-boxes"), kwargs
        if view == "tma":
            assert args[1] is w
        else:
            assert args[1].is_contiguous() and torch.equal(args[1], w) and (view == "copy") != w.is_contiguous()
        M, N, height = plan.num_rows, plan.num_experts, 256 if pair else 128
        windows = why in ("served", "served-copy", "served-tma")
        want = (tile_order.token_window_tiles(plan.offsets, M, N, height, tile_order.AUTO_GROUP) if windows
                else tile_order.expert_tiles(plan.offsets, M, N, height))
        assert not torch.equal(want, tile_order.expert_tiles(plan.offsets, M, N, height)) or not windows
        assert torch.equal(args[2], want), (args[2], want)
    else:  # the default tile (a Triton kernel, TMA or not), never the STAGED fallback
        assert name in ("triton", "tma") and not kwargs.get("STAGED"), (name, kwargs)


MASKED_GEMM = """
import json, sys
sys.path.insert(0, {tools!r})
import torch
import compile_report as cr
from ssd_megatron.ffn import relu_mask_gemm_gluon as g
cr.offline(90)
g._sms = lambda device: 132
M, K, N = 256, 128, 256
a, b, h = torch.randn(M, K).bfloat16(), torch.randn(K, N).bfloat16(), torch.randn(M, N).bfloat16()
g._build()(a, b, h, torch.empty_like(h), torch.empty(2, N))
print("MG " + json.dumps([[name, cr.report(kernel, nw)] for name, kernel, nw in cr.LAUNCHES]))
"""


def test_gluon_masked_gemm_compiles_for_sm90():
    """The dense ReLU FFN's Gluon masked GEMM (ffn/relu_mask_gemm_gluon.py, the default on H100/H200)
    compiles with the installed Triton: Triton 3.9 removed the TMA copy names 3.6 has (its old names raise
    at compile time), which its launch would otherwise hit only on a GPU."""
    env = _compile_env()
    out = subprocess.run([sys.executable, "-c", MASKED_GEMM.format(tools=os.path.join(ROOT, "tools"))], env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("MG ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    (name, r), = json.loads(lines[-1][3:])
    assert name == "relu_mask_gemm_pingpong_kernel" and r["warps"] == 12, (name, r)
    assert r["utmaldg"] > 0 and r["ldgsts"] == 0 and r["mma"].startswith("64x"), r


if __name__ == "__main__":
    _ws_compile_main()
