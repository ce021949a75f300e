"""Step times of finished training runs, per phase, from their metrics.jsonl: how a multi-process run's steps
compare eager against captured (`train.cuda_graph: true`), where `ssd-bench step` times one process only.

    torchrun --nproc_per_node=2 -m ssd_megatron train configs/gpt_base_ssd.yaml train.output_dir=runs/eager ...
    torchrun --nproc_per_node=2 -m ssd_megatron train configs/gpt_base_ssd.yaml train.output_dir=runs/graph \\
        train.cuda_graph=true ...
    python tools/step_times.py eager=runs/eager graph=runs/graph --skip 12 --out steps.json

Each phase segment (a run of consecutive steps in one phase) drops its first --skip steps: torch.compile, the
eager warm-up steps before a capture, and the capture itself run there. The median of the rest is the phase's
step time. Prints a table; --out writes JSON (gpu, date, torch, per run and phase the median step time in ms,
tokens/s, and the steps it was taken over).
"""
import argparse
import datetime
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd_megatron.bench.step import triton_version  # noqa: E402
from ssd_megatron.train.metrics import read_metrics  # noqa: E402


def steady_steps(records: list[dict], skip: int) -> dict[str, list[dict]]:
    """{phase: the train records left after dropping the first `skip` steps of every segment of that phase}."""
    out: dict[str, list[dict]] = {}
    segment, last = 0, None
    for r in sorted(records, key=lambda r: r["step"]):
        segment = segment + 1 if r["phase"] == last else 1
        last = r["phase"]
        if segment > skip:
            out.setdefault(r["phase"], []).append(r)
    return out


def summarise(run_dir: str, skip: int) -> dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    train = [r for r in read_metrics(path) if r.get("kind") == "train" and "step_time" in r]
    if not train:
        raise SystemExit(f"error: {path}: no train records with a step_time (not a finished training run?)")
    phases = steady_steps(train, skip)
    return {phase: {"ms_per_step": 1e3 * statistics.median(r["step_time"] for r in rs),
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                    "steps": [rs[0]["step"], rs[-1]["step"]], "n": len(rs)}
            for phase, rs in phases.items()}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    ap.add_argument("--skip", type=int, default=12, help="steps dropped at the start of every phase segment")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, sep, run_dir = item.partition("=")
        if not sep or not label or not run_dir:
            raise SystemExit(f"error: {item!r}: expected LABEL=RUN_DIR")
        runs[label] = summarise(run_dir, args.skip)
    print(f"{'run':<16} {'phase':<8} {'ms/step':>9} {'tokens/s':>11}  steps")
    for label, phases in runs.items():
        for phase, s in phases.items():
            print(f"{label:<16} {phase:<8} {s['ms_per_step']:9.2f} {s['tokens_per_s']:11.0f}  "
                  f"{s['steps'][0]}-{s['steps'][1]} ({s['n']})")
    if args.out:
        res = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "gpus": torch.cuda.device_count(), "date": datetime.date.today().isoformat(),
               "torch": torch.__version__, "triton": triton_version(), "skip": args.skip, "runs": runs}
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
