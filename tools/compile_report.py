"""Compile the `triton` expert backend's kernels for an H100/H200 (sm_90, default) or an A100 (`--arch 80`)
on a machine without a GPU,
and report per launch: registers, spills (stack bytes), shared memory, the CTAs per SM those allow, the
matrix instructions and whether the operand loads are asynchronous copies. What METHOD.md calls
"read what costs no device time": it answers "does this config compile, spill, or fit two CTAs per
SM?" before a device call is spent on timing it.

The real launchers run on CPU tensors of the real shapes (bench.ffn's layer, realistic routing), so
each kernel is specialised exactly as on the GPU (Triton's own argument specialisation: dtypes,
16-byte alignment, unit strides). A stand-in driver reports the target, and every launch
compiles without running. Use the device image's Triton version, which may differ from this
machine's. For the H200 image (triton 3.6.0):

    pip download --no-deps triton==3.6.0 -d /tmp/whl && pip install --no-deps --target /tmp/t36 /tmp/whl/*.whl
    PYTHONPATH=/tmp/t36:. python tools/compile_report.py [--shapes base,8b] [--activations relu,swiglu] [--variants all]

--variants all|one also compiles the candidates of tools/bench_kernels.py's sweep (one: the first of each
variant), --configs the given ones (bench_kernels' syntax); the exit code is 1 if any config fails to compile.
Down variant 5 (e.g. --launches down_dx --configs "down=64,64,64,4,3,5") compiles the warp-specialised Gluon
kernel (kernels/down_gluon.py; Triton >= 3.9) where it serves, STAGED where not: the kernel column says which.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("error: unset TRITON_INTERPRET: this tool compiles the kernels, it does not interpret them")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# per SM: registers, shared memory, resident CTAs and warps (CUDA occupancy tables)
SM = {90: {"regs": 65536, "smem": 228 * 1024, "max_ctas": 32, "max_warps": 64},   # H100/H200
      80: {"regs": 65536, "smem": 164 * 1024, "max_ctas": 32, "max_warps": 64}}   # A100
ARCH = [90]  # the target of this run (--arch)


class _TargetDriver:
    """Enough of Triton's driver interface for the JIT to specialise and compile for the --arch target."""

    def get_current_target(self):
        return GPUTarget("cuda", ARCH[0], 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


LAUNCHES: list = []  # (kernel name, compiled kernel, num_warps) of every launch since the last reset
_ORIG_RUN = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _ORIG_RUN(self, *args, grid=grid, warmup=True, **kwargs)
    # all of a warp-specialised kernel's warps (its partitions' too: the metadata's total)
    LAUNCHES.append((self.fn.__name__, kernel, getattr(kernel.metadata, "num_warps", kwargs.get("num_warps", 4))))
    return kernel


def offline(arch: int) -> None:
    """From here on, kernel launches compile for sm_`arch` without running (LAUNCHES records them), and the
    launchers' own device tests answer for that target: CPU tensors of the real shapes then specialise each
    kernel as on the GPU."""
    from ssd_megatron.ffn.backends.kernels import descriptors
    from ssd_megatron.ffn.backends.kernels import down_gluon

    ARCH[0] = arch
    _driver.set_active(_TargetDriver())
    JITFunction.run = _compile_only
    descriptors.hopper = lambda t: arch >= 90
    down_gluon._sm90 = lambda t: arch == 90
    down_gluon._sms = lambda device: 132  # an H100 SXM's SMs: the persistent grid's size (not compiled in)


def _bin(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def report(kernel, num_warps) -> dict:
    """Resources (cuobjdump) and a few instruction counts (SASS) of one compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        res = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "--dump-sass", fh.name], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    smem = int(kernel.metadata.shared)
    threads = 32 * num_warps
    sm = SM[ARCH[0]]
    ctas = min(sm["max_ctas"], sm["regs"] // (regs * threads) if regs else sm["max_ctas"],
               sm["smem"] // max(smem + 1024, 1), sm["max_warps"] // num_warps)
    mma = sorted(set(re.findall(r"\b(HGMMA\.\w+|HMMA\.\w+)", sass)))
    return {"regs": regs, "stack": stack, "smem_kb": round(smem / 1024, 1), "warps": num_warps, "ctas_per_sm": ctas,
            "mma": ",".join(m.split(".", 1)[1] for m in mma) or "-", "ldgsts": sass.count("LDGSTS"),
            "utmaldg": sass.count("UTMALDG"), "utmaredg": sass.count("UTMAREDG"),  # (TMA loads, TMA reduces)
            "utmastg": sass.count("UTMASTG"),  # (TMA stores)
            "atom": len(re.findall(r"\b(?:REDG|RED|ATOMG|ATOM)\.", sass)),
            "cas": len(re.findall(r"\bATOMG?\.\S*CAS", sass)),  # compare-and-swap: an atomic the GPU lacks
            # wgmma's last immediate (PTX): for 16-bit inputs imm-trans-b, 1 where B is read N-major from shared
            # memory (row-major weights), 0 where K-major (W_out's column view, transposed in place)
            "trans_b": ",".join(sorted(set(re.findall(r"wgmma\.mma_async[^;]*,\s*(\d+);", kernel.asm["ptx"]))))}


def compile_each(launches: dict) -> dict:
    """{name: [[kernel name, `report`], ...] of what `launches[name]()` compiled, or its error} (after `offline`)."""
    out = {}
    for name, launch in launches.items():
        LAUNCHES.clear()
        try:
            launch()
            out[name] = [[kname, report(kernel, nw)] for kname, kernel, nw in LAUNCHES]
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {_last_line(exc)}"[:2000]
    return out


def _last_line(exc) -> str:
    """A compile error's cause: Triton puts the source excerpt first and the reason on the last line."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def main() -> int:
    import bench_kernels as bk
    from ssd_megatron.ffn.backends.kernels import tile_configs as tc

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bk.add_case_args(ap, activations="relu")
    ap.add_argument("--variants", choices=("none", "one", "all"), default="none",
                    help="also the candidates of tools/bench_kernels.py: all, or one per kernel variant")
    ap.add_argument("--arch", type=int, choices=sorted(SM), default=90,
                    help="compute capability: 90 H100/H200, 80 A100")
    ap.add_argument("--configs", default="", help="configs to compile besides the default, per kind, as "
                    "tools/bench_kernels.py's --configs (instead of --variants for those kinds)")
    args = ap.parse_args()
    chosen = bk.parse_configs(args.configs)
    offline(args.arch)

    print(f"triton {triton.__version__}, target sm_{args.arch}; per launch: registers/thread, stack bytes (spills), shared "
          f"memory, CTAs per SM those allow", flush=True)
    print(f"{'shape':5s} {'act':6s} {'launch':10s} {'config':28s} {'kernel':24s} regs stack  smem KB warps CTAs/SM  "
          f"LDGSTS UTMALDG atom  cas  mma")
    failed = 0
    for shape, act in bk.cases(args):
        _, launches = bk.setup(shape, act, args.tokens, device="cpu")
        for label, (kind, _, fn) in bk.selected(launches, args).items():
            extra = chosen[kind] if kind in chosen else _candidates(bk.VARIANTS.get(kind, []), args.variants)
            for cfg in [None] + extra:
                tc.force_config(**({kind: cfg} if cfg else {}))
                LAUNCHES.clear()
                try:
                    fn()
                except Exception as exc:  # a config that does not compile is reported, then the exit code is 1
                    failed += 1
                    print(f"{shape:5s} {act:6s} {label:10s} {str(cfg or 'default'):28s} FAILED: {type(exc).__name__}: "
                          f"{_last_line(exc)[:200]}")
                    continue
                for name, kernel, nw in {id(k): (n, k, w) for n, k, w in LAUNCHES}.values():
                    r = report(kernel, nw)
                    print(f"{shape:5s} {act:6s} {label:10s} {str(cfg or 'default'):28s} {name:24s} {r['regs']:4d} {r['stack']:5d} "
                          f"{r['smem_kb']:8.1f} {r['warps']:5d} {r['ctas_per_sm']:7d}  {r['ldgsts']:6d} "
                          f"{r['utmaldg']:7d} {r['atom']:4d} {r['cas']:4d}  {r['mma']}", flush=True)
        tc.force_config()
    return 1 if failed else 0


def _candidates(configs, which):
    """The sweep's configs to compile: none, all, or the first of each variant (the 6th entry: a variant
    code below 16, or wgrad's row chunk, where any non-zero value is the one variant "split")."""
    if which == "all":
        return list(configs)
    if which == "none":
        return []
    firsts = {}
    for cfg in configs:
        v = cfg[5] if len(cfg) > 5 else 0
        firsts.setdefault(v if v < 16 else "split", cfg)
    return list(firsts.values())


if __name__ == "__main__":
    sys.exit(main())
