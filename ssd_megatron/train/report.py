"""End-of-run report: `run_dir/report/{loss.png, ppl.png, report.md}` from metrics.jsonl.

`build_report(run_dir)` runs at the end of training (rank 0) and on its own (`ssd-report RUN_DIR`).
It needs only the run directory: the records, `config.yaml` and, for the reference unigram
perplexity, the run's data (rebuilt from the config; skipped with a note if unavailable).

The unigram baseline is the perplexity of the validation split's tokens under the training split's
token frequencies (add-one smoothed over the model's vocabulary): what a model that ignores context
would score. It is computed on the raw token streams, so for GPT it is directly comparable with the
validation perplexity; for BERT/T5 (whose targets are masked tokens / spans) it is a reference scale.
It is cached in report/unigram.json.

Methods may add sections: if `ssd_megatron.ssd.report.ssd_sections(records, report_dir)` exists it is
called and its markdown lines are appended.
"""
from __future__ import annotations

import datetime
import json
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError
from ..plots import pyplot
from .metrics import read_metrics


def _fmt_num(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "n/a"
    for scale, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    return str(datetime.timedelta(seconds=round(s)))


def unigram_perplexity(train_tokens: np.ndarray, valid_tokens: np.ndarray, vocab_size: int) -> float:
    counts = np.bincount(train_tokens.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts) - math.log(counts.sum())
    v = valid_tokens.astype(np.int64)
    v = v[v < vocab_size]
    if v.size == 0:
        return float("nan")
    return float(math.exp(-logp[v].mean()))


def compute_unigram_baseline(run_dir: Path, cfg=None) -> Optional[dict]:
    run_dir = Path(run_dir)
    cache = run_dir / "report" / "unigram.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text())
        except ValueError:
            pass
    try:
        if cfg is None:
            from ..config import load_config

            cfg = load_config(run_dir / "config.yaml")
        from .data import raw_token_streams

        train_tokens, valid_tokens, vocab = raw_token_streams(cfg)
    except (UserError, ImportError, OSError) as e:
        print(f"warning: unigram baseline skipped: {e}", file=sys.stderr)
        return None
    res = {"unigram_ppl": unigram_perplexity(train_tokens, valid_tokens, vocab),
           "train_tokens": int(train_tokens.size), "valid_tokens": int(valid_tokens.size)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(res))
    return res


def _plot(train, valid, key_train, key_valid, ylabel, path: Path, logy: bool = False,
          baseline: Optional[float] = None) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r[key_train] for r in train], lw=0.8, alpha=0.8, label="train")
    if valid:
        ax.plot([r["step"] for r in valid], [r[key_valid] for r in valid], "o-", ms=3, label="valid")
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, ls="--", color="gray", lw=0.8, label="unigram (valid)")
    spans = sparse_intervals(train)
    for i, (a, b) in enumerate(spans):
        ax.axvspan(a, b, color="orange", alpha=0.15, label="sparse phase" if i == 0 else None)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sparse_intervals(records: list) -> list:
    """[(start_step, end_step)] of consecutive train steps logged with phase == 'sparse' (shaded in plots)."""
    spans, start, last = [], None, None
    for r in records:
        if "phase" not in r or "loss" not in r:
            continue
        s = r["step"]
        if r["phase"] == "sparse" and start is None:
            start = s
        elif r["phase"] != "sparse" and start is not None:
            spans.append((start, s))
            start = None
        last = s
    if start is not None:
        spans.append((start, last + 1))
    return spans


def build_report(run_dir, wall_time: Optional[float] = None, unigram: bool = True) -> Path:
    """Write the report of one run; returns the path of report.md."""
    run_dir = Path(run_dir)
    mpath = run_dir / "metrics.jsonl"
    if not mpath.is_file():
        raise UserError(f"{mpath} not found: {run_dir} is not a run directory (or has not logged a step)")
    records = read_metrics(mpath)
    train = [r for r in records if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float))]
    valid = [r for r in records if r.get("kind") == "valid" and isinstance(r.get("valid_loss"), (int, float))]
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    cfg = None
    if (run_dir / "config.yaml").is_file():
        try:
            from ..config import load_config

            cfg = load_config(run_dir / "config.yaml")
        except UserError as e:
            print(f"warning: {e}", file=sys.stderr)
    base = compute_unigram_baseline(run_dir, cfg) if unigram and cfg is not None else None
    base_ppl = base["unigram_ppl"] if base else None

    _plot(train, valid, "loss", "valid_loss", "loss (nats/token)", out / "loss.png",
          baseline=math.log(base_ppl) if base_ppl else None)
    _plot(train, valid, "ppl", "valid_ppl", "perplexity", out / "ppl.png", logy=True, baseline=base_ppl)

    last = train[-1] if train else {}
    lastv = valid[-1] if valid else {}
    best = min(valid, key=lambda r: r["valid_loss"]) if valid else {}
    if wall_time is None:
        wall_time = last.get("elapsed")
    n_steps = (last.get("step", -1) + 1) if last else 0
    tail = train[-min(len(train), 20):]
    tok_s = float(np.median([r["tokens_per_s"] for r in tail])) if tail else None
    mfus = [r["mfu"] for r in tail if isinstance(r.get("mfu"), (int, float))]
    phases: dict = {}
    for r in train:
        phases[r.get("phase", "?")] = phases.get(r.get("phase", "?"), 0) + 1

    name = cfg.name if cfg is not None else run_dir.name
    lines = [f"# Run report: {name}", ""]
    if cfg is not None:
        m = cfg.model
        lines += [f"- model: {m.arch}, {m.n_layers} layers x d {m.d_model} x {m.n_heads} heads, d_ff {m.d_ff}, "
                  f"{m.activation}; method: **{cfg.method}**",
                  f"- batch: {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens; "
                  f"optimizer AdamW lr {cfg.optim.lr:g} ({cfg.optim.schedule}, warm-up {cfg.optim.warmup_steps})"]
    lines += [
        f"- steps: {n_steps}" + (f" of {cfg.train.max_steps}" if cfg is not None else ""),
        f"- tokens: {_fmt_num(last.get('tokens'))}",
        f"- training FLOPs: {_fmt_num(last.get('flops_total'), 'FLOP')}",
        f"- wall time: {_fmt_time(wall_time)}",
        f"- throughput (median of last {len(tail)} steps): {_fmt_num(tok_s)} tokens/s"
        + (f", MFU {100 * float(np.median(mfus)):.1f}%" if mfus else ""),
        f"- phases (steps): " + ", ".join(f"{k} {v}" for k, v in sorted(phases.items())),
        "",
        "| metric | value |",
        "|---|---|",
        f"| final train loss | {last.get('loss', float('nan')):.4f} |" if last else "| final train loss | n/a |",
    ]
    if lastv:
        lines += [f"| final valid loss | {lastv['valid_loss']:.4f} (step {lastv['step']}) |",
                  f"| final valid ppl | {lastv['valid_ppl']:.2f} |",
                  f"| best valid ppl | {best['valid_ppl']:.2f} (step {best['step']}) |"]
        if "valid_acc" in lastv:
            lines.append(f"| final valid MLM accuracy | {lastv['valid_acc']:.4f} |")
    if base_ppl is not None:
        lines.append(f"| unigram baseline ppl (valid) | {base_ppl:.2f} |")
    lines += ["", "![loss](loss.png)", "", "![perplexity](ppl.png)", ""]

    try:
        from ..ssd.report import ssd_sections
    except ImportError:
        ssd_sections = None
    if ssd_sections is not None:
        try:
            lines += list(ssd_sections(records, out))
        except Exception as e:  # a method's figures must not take the basic report down
            lines += ["", f"(SSD sections failed: {type(e).__name__}: {e})"]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "report.md"


def main(argv=None) -> int:
    """`ssd-report RUN_DIR...`: rebuild each run's report; with --out (or several runs of different
    methods), also the cross-method comparison (paper Fig. 3, Fig. 4a, Table 4) into --out."""
    import argparse

    ap = argparse.ArgumentParser(prog="ssd-report", description="Rebuild run reports and compare runs.")
    ap.add_argument("run_dirs", nargs="+", help="run directories (runs/<name>)")
    ap.add_argument("--out", default=None, help="comparison output directory (default: runs/compare when comparing)")
    ap.add_argument("--baseline", default="dense", help="method the comparison divides by (default: dense)")
    ap.add_argument("--no-unigram", action="store_true", help="skip the unigram-baseline perplexity")
    args = ap.parse_args(argv)
    for d in args.run_dirs:
        print(build_report(d, unigram=not args.no_unigram))
    if args.out or len(args.run_dirs) > 1:
        from ..report.compare import write_comparison

        out = Path(args.out or "runs/compare")
        write_comparison(args.run_dirs, out, baseline=args.baseline)
        print(out / "compare.md")
    return 0
