"""Which code launches each small kernel of the GPT-base training step: the kernel tables of
`ssd-bench step --profile` name kernels (reduce_kernel, Memset, FillFunctor, copies) but not who asked
for them. This profiles eager steps of our step (compiled blocks, the loop's loss, clipping, AdamW) and
prints, for every kernel that is not a GEMM or attention, the op that launched it and that op's caller
(for a compiled block: its "Call CompiledFxGraph" range), per step. (Python stacks were tried: inside
compiled code the profiler attached none.)

    python tools/profile_ops.py [--steps 2] [--top 40] [--phase sparse]
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd_megatron.bench import step as S  # noqa: E402

_BIG = ("nvjet", "gemm", "sdpa", "cudnn_generated", "flash", "ce_rows", "adamw_blocks", "_wgrad_kernel", "_up_kernel",
        "_down_kernel")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--phase", choices=["dense", "sparse"], default="dense",
                    help="sparse: every FFN in SSD's sparse mode (N 32, K 6, triton backend), as ssd-bench step")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        print("error: tools/profile_ops.py profiles CUDA kernels and needs a GPU (run it through the device tool)",
              file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("high")
    dev = torch.device("cuda")
    shape = dict(S.BASE)
    model = S.build_ours(shape, dev, args.phase, "triton")
    run, loss_fn = S.prepare_ours(model, "loop", True)
    holder = {}

    def capture(step, start, device, out_dir, tag):  # replaces time_training's profiling hook
        S._sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(args.steps):
                step(start + i)
            S._sync(device)
        holder["prof"] = prof
        return {}

    S.profile_steps = capture
    S.time_training(model, run, loss_fn, shape, dev, 3, 5, True, profile_dir="unused", tag="ops")
    rows = collections.defaultdict(lambda: [0, 0.0])
    for e in holder["prof"].events():
        for k in getattr(e, "kernels", ()):
            if any(b in k.name.lower() for b in _BIG):
                continue
            parent = e.cpu_parent.name[:30] if e.cpu_parent is not None else "-"
            key = (k.name[:60], f"{parent} > {e.name[:30]}")
            rows[key][0] += 1
            rows[key][1] += k.duration
    n = args.steps
    total = sum(t for _, t in rows.values())
    print(f"non-GEMM, non-attention kernels: {total / n / 1e3:.3f} ms/step, "
          f"{sum(c for c, _ in rows.values()) / n:.0f} launches/step")
    print(f"{'ms/step':>8} {'calls':>6}  kernel | caller > launching op")
    for (kname, op), (c, t) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{t / n / 1e3:8.3f} {c / n:6.1f}  {kname} | {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
