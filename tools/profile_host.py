"""Where the host's time goes in eager steps of the GPT-base training step (`ssd-bench step --variant loop`): an eager
sparse step is host-bound (docs/kernels.md §4), so its step time is the Python, dispatcher and launch work that
queues its kernels, and every graph break in a compiled block adds to it (docs/kernels.md v30: three per sparse layer
had doubled it). This runs the loop's step (compiled blocks, the fused loss, clipping, AdamW) for warm-up steps, then
profiles --steps steps with cProfile and prints torch.compile's graphs and graph breaks (first: they found v30's
cause), its counters, and the functions with the most own time and the most cumulative time per step (under torch.compile
cProfile's own times are not to be trusted: v30 saw frames that dynamo runs charged to their callers).

    python tools/profile_host.py [--phase sparse] [--steps 3] [--top 30] [--out host.txt]
"""
import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd_megatron.bench import step as S  # noqa: E402
from ssd_megatron.train.graph_breaks import reason_line  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=["dense", "sparse"], default="sparse")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default="", help="also write the report here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: tools/profile_host.py times the launch path of CUDA kernels and needs a GPU", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("high")
    dev = torch.device("cuda")
    shape = dict(S.BASE)
    model = S.build_ours(shape, dev, args.phase, args.backend)
    run, loss_fn = S.prepare_ours(model, "loop", True)
    prof = cProfile.Profile()

    def profiled(step, start, device, out_dir, tag):  # replaces time_training's profiling hook
        S._sync(device)
        prof.enable()
        for i in range(args.steps):
            step(start + i)
        S._sync(device)
        prof.disable()
        return {}

    S.profile_steps = profiled
    res = S.time_training(model, run, loss_fn, shape, dev, 5, 5, True, profile_dir="unused", tag="host")
    buf = io.StringIO()
    print(f"# {args.phase} eager step ({torch.cuda.get_device_name()}): {1e3 * res['step_s_median']:.2f} ms on the GPU's "
          f"clock, host {res['host_ms_median']:.2f} ms (median of 5 unprofiled steps)", file=buf)
    from torch._dynamo.utils import counters
    breaks = counters["graph_break"]
    print(f"# torch.compile: {counters['stats'].get('unique_graphs', 0)} graphs, {counters['frames'].get('total', 0)} "
          f"frames; graph breaks (the dense step has none; each costs a resume and guards in every eager step): "
          + (str({reason_line(k): v for k, v in breaks.items()}) if breaks else "none"), file=buf)
    print("# torch.compile counters: " + str({k: dict(v) for k, v in counters.items() if v}), file=buf)
    for key in ("tottime", "cumulative"):
        print(f"# by {key}, {args.steps} steps", file=buf)
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.top)
    text = buf.getvalue()
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
