"""Per launch of the `triton` backend's sparse layer: how long it ran inside the (graphed) layer, and the SM clock
right after it, read on the GPU itself (docs/kernels.md section 4, item 3).

Why: the layer runs at the board's power limit with the SM clock below its maximum (v39), so a launch's time in the
layer depends on the clock it gets there; Nsight Compute replays each kernel alone (another clock), NVML's clock
updates every 1/6 to 1 s (longer than a graphed layer), and the device image has no Nsight Systems. So this tool
puts a one-warp probe kernel after every Triton or Gluon launch (Triton's `JITFunction.run`, patched in this
process only). Each probe reads `%globaltimer` (ns) and `%clock64` (its SM's cycles), spins for --spin-ns, reads
both again and stores the four values in its own slot. Then, per launch position:

- **duration**: from the previous probe's end to this probe's start, i.e. the launch and everything launched
  since the previous Triton launch (torch's own kernels, e.g. a fill or a sum, are counted with the Triton
  launch that follows them), plus one launch gap (≈ 1-2 µs in a graph);
- **clock**: cycles over nanoseconds during the probe's spin, i.e. the SM clock right after the launch. The board
  changes its clock on a millisecond scale, so for launches of 0.1 ms and more it is the clock the launch ended at.

The probes serialise the launches (each waits for the one before, as in the layer's stream anyway) and add their
spin and a launch gap each; the report gives the probed layer's total against the unprobed one's. On CPU only the
probe kernel's compile is tested (tests/backends/test_launch_clocks.py, offline for sm_90, as tools/compile_report.py
does) and the report's arithmetic; the GPU test runs the tool at base.

    python tools/launch_clocks.py --shape 8b --activation relu --out clocks.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIELDS = 4  # per probe slot: start ns, end ns, start cycle, end cycle


@triton.jit
def _now():
    """(%globaltimer in ns, %clock64 in this SM's cycles), read together."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;\n\tmov.u64 $1, %clock64;", "=l,=l", [],
                                     dtype=(tl.int64, tl.int64), is_pure=False, pack=1)


@triton.jit
def probe_kernel(out, slot, SPIN_NS: tl.constexpr):
    """Store (t0, t1, c0, c1) at out[slot * 4:]: both clocks at the start, and after spinning SPIN_NS ns."""
    t0, c0 = _now()
    t1, c1 = t0, c0
    while t1 - t0 < SPIN_NS:
        t1, c1 = _now()
    base = out + slot * 4
    tl.store(base, t0)
    tl.store(base + 1, t1)
    tl.store(base + 2, c0)
    tl.store(base + 3, c1)


class Probes:
    """Patches JITFunction.run so that, while `active`, each launch is followed by a probe into the next slot;
    `names` records each slot's launch (the kernel's name). Slot 0 is the probe `start()` launches first."""

    def __init__(self, slots: int, spin_ns: int, device):
        self.buf = torch.zeros(slots * FIELDS, dtype=torch.int64, device=device)
        self.slots, self.spin_ns = slots, spin_ns
        self.names: list[str] = []
        self.active = False
        self._inside = False

    def start(self):
        self.names = []
        self._probe("(start)")

    def _probe(self, name: str):
        if len(self.names) >= self.slots:
            raise SystemExit(f"error: more than {self.slots} launches in one layer call: raise --slots")
        self._inside = True
        try:
            probe_kernel[(1,)](self.buf, len(self.names), SPIN_NS=self.spin_ns, num_warps=1)
        finally:
            self._inside = False
        self.names.append(name)

    @contextlib.contextmanager
    def patched(self):
        from triton.runtime.jit import JITFunction
        original = JITFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            result = original(fn, *args, grid=grid, warmup=warmup, **kwargs)
            if self.active and not self._inside and not warmup:
                self._probe(getattr(fn, "__name__", None) or str(fn))
            return result
        JITFunction.run = run
        try:
            yield self
        finally:
            JITFunction.run = original

    def read(self) -> list[tuple[int, int, int, int]]:
        vals = self.buf.view(-1, FIELDS)[:len(self.names)].tolist()
        return [tuple(v) for v in vals]


def launch_rows(names: list[str], samples: list[list[tuple[int, int, int, int]]]) -> list[dict]:
    """Per launch position (slot 1 on): its name, the median duration in µs (previous probe's end to this probe's
    start) and the median SM clock in MHz during this probe, over the samples (one list of slots per call)."""
    rows = []
    for i in range(1, len(names)):
        durs = [(s[i][0] - s[i - 1][1]) / 1e3 for s in samples]
        mhz = [1e3 * (s[i][3] - s[i][2]) / max(s[i][1] - s[i][0], 1) for s in samples]
        rows.append({"slot": i, "launch": names[i], "us": statistics.median(durs), "us_min": min(durs),
                     "us_max": max(durs), "mhz": statistics.median(mhz), "mhz_min": min(mhz), "mhz_max": max(mhz)})
    return rows


def report(rows: list[dict]) -> str:
    """The rows as a table, with the total of the durations and their clock-weighted mean."""
    total = sum(r["us"] for r in rows)
    mean_mhz = sum(r["us"] * r["mhz"] for r in rows) / max(total, 1e-9)
    lines = [f"{'slot':>4} {'launch':34s} {'us':>9} {'(min-max)':>17} {'MHz':>6} {'(min-max)':>11}"]
    for r in rows:
        lines.append(f"{r['slot']:4d} {r['launch'][:34]:34s} {r['us']:9.1f} ({r['us_min']:7.1f}-{r['us_max']:7.1f})"
                     f" {r['mhz']:6.0f} ({r['mhz_min']:4.0f}-{r['mhz_max']:4.0f})")
    lines.append(f"{'':4} {'sum of medians':34s} {total:9.1f} {'':17} {mean_mhz:6.0f} (duration-weighted)")
    return "\n".join(lines)


def _step(case, backend, fwd_only: bool, r: int):
    """One call of the sparse layer (fwd, or fwd + autograd.grad) on case's layer and input `r`."""
    layer, x, dy = case.layers[r], case.xs[r], case.dys[r]
    params = layer.params() + [x.requires_grad_()]
    if fwd_only:
        with torch.no_grad():
            return layer.sparse(x, backend)
    return torch.autograd.grad(layer.sparse(x, backend), params, dy, allow_unused=True)


def main(argv=None) -> int:
    from ssd_megatron.bench.ffn import Case, triton_variant
    from ssd_megatron.bench.timing import capture_graph, time_calls
    from ssd_megatron.errors import UserError
    from ssd_megatron.ffn.backends import get_backend

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="base", choices=("base", "8b"))
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--routing", default="realistic", choices=("realistic", "uniform"))
    ap.add_argument("--forward-only", action="store_true", help="the inference forward only")
    ap.add_argument("--eager", action="store_true", help="eager calls instead of replays of one CUDA graph")
    ap.add_argument("--calls", type=int, default=20, help="probed calls (graph replays) to take medians over")
    ap.add_argument("--spin-ns", type=int, default=4000, help="each probe's spin (the clock's sampling window)")
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--rotation", type=int, default=0,
                    help="which of `ssd-bench ffn`'s rotated layers and inputs (its seeds; 0 = the first)")
    ap.add_argument("--options", default="", help="the triton backend's options, as one `ssd-bench ffn "
                    "--triton-variants` entry (e.g. w2_view=tma+fused_forward=false); default: the default backend")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    try:  # (checked before the GPU is: a typo fails here too)
        backend = triton_variant(args.options) if args.options else get_backend("triton")
    except UserError as exc:
        raise SystemExit(f"error: --options {args.options!r}: {exc}") from None
    if not torch.cuda.is_available():
        raise SystemExit("error: launch_clocks reads clocks on a GPU; none is visible here")
    dev = torch.device("cuda")
    if args.rotation < 0:
        raise SystemExit(f"error: --rotation {args.rotation}: expected 0 or more")
    case = Case(args.shape, args.activation, args.tokens, args.rotation + 1, dev, torch.bfloat16)
    case.set_routing(args.routing)
    probes = Probes(args.slots, args.spin_ns, dev)
    call = lambda: _step(case, backend, args.forward_only, args.rotation)  # noqa: E731

    def timed_plain():
        if args.eager:
            return time_calls(lambda i: call(), args.calls, 3)["median"]
        g, _out = capture_graph(call)
        return time_calls(lambda i: g.replay(), args.calls, 3)["median"]

    plain_ms = timed_plain()
    samples = []
    with probes.patched():
        probes.active = True

        def record():
            probes.start()
            return call()
        if args.eager:
            for _ in range(2):  # warm-up (compiles the probe and every launch)
                record()
            once = record
        else:  # (capture_graph's own two warm-up calls compile them)
            g, _out = capture_graph(record)
            once = g.replay
        names = None
        for _ in range(args.calls):
            once()
            torch.cuda.synchronize()
            samples.append(probes.read())
            names = names or list(probes.names)
        probes.active = False
    rows = launch_rows(names, samples)
    probed_ms = statistics.median((s[-1][1] - s[0][1]) / 1e6 for s in samples)
    gpu = torch.cuda.get_device_name(0)
    phase = "fwd" if args.forward_only else "fwd_bwd"
    print(f"{args.shape} {args.activation} {phase} {'eager' if args.eager else 'graphed'} on {gpu}: "
          f"{plain_ms:.3f} ms without probes, {probed_ms:.3f} ms from the first probe's end to the last's with "
          f"{len(rows)} probes of {args.spin_ns} ns")
    print(report(rows))
    if args.out:
        res = {"gpu": gpu, "date": str(datetime.date.today()), "torch": torch.__version__,
               "triton": triton.__version__, "shape": args.shape, "activation": args.activation,
               "phase": phase, "graphed": not args.eager, "tokens": args.tokens, "rotation": args.rotation,
               "spin_ns": args.spin_ns, "options": args.options,
               "calls": args.calls, "plain_ms": plain_ms, "probed_ms": probed_ms, "launches": rows}
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
