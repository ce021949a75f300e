"""Cross-run comparison: the paper's Figure 3, Figure 4a and a Table-4-like summary from run directories.

    ssd-report RUN_DIR [RUN_DIR ...] --out DIR [--baseline dense]

Reads each run's `config.yaml` and `metrics.jsonl` (train and valid records, see train/metrics.py)
and, where present, `report/sweep_k.json` (written by `ssd-eval --sweep-k`: a list of
`{"k", "ppl", "flops_per_token"}`, or an object holding that list under "points"/"sweep"). Writes to
DIR:
- `fig3_ppl_vs_train_flops.png`: validation perplexity vs cumulative training FLOPs, one curve per run
  (paper Figure 3: lower-left is better);
- `fig4a_ppl_vs_inference_flops.png`: validation perplexity vs inference FLOPs per token as the number
  of selected experts k varies (from the sweeps), plus each run's final model as a diamond (paper
  Figure 4a: SMoE at its own K, dense models without sparsity);
- `compare.md` (the table) and `compare.json` (everything, machine-readable).

Definitions used in the table:
- train FLOPs = the last train record's `flops_total` (the loop's analytic count, train/flops.py);
- step time = the sum of `step_time` over the run's steps (forward, backward, optimizer and the
  method's own work such as SSD's clustering; not validation or checkpointing), extrapolated by the
  mean when only every `log_interval`-th step was logged; wall time = the last record's `elapsed`;
- speedups are baseline / run (> 1 = cheaper than the baseline, `--baseline`, default the dense run);
- final ppl = the last validation record; for BERT/T5 it is the masked-token / span perplexity;
- inference FLOPs/token = the final model's forward per input token (dense for Dense, SSD,
  MoE-Dropout and PLD; K/N of the FFN + router for SMoE) from the analytic counter.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ..errors import UserError
from ..plots import pyplot

METHOD_STYLE = {
    "dense": ("#222222", "o"), "ssd": ("#d62728", "s"), "smoe": ("#2ca02c", "^"),
    "moe_dropout": ("#1f77b4", "v"), "pld": ("#ff7f0e", "D"),
}
METHOD_LABEL = {"dense": "Dense", "ssd": "SSD", "smoe": "SMoE", "moe_dropout": "MoE-Dropout", "pld": "PLD"}


@dataclass
class Run:
    path: str
    name: str
    method: str
    arch: str
    label: str = ""
    steps: int = 0
    tokens: int = 0
    train_flops: float = 0.0
    step_time: float = 0.0
    wall_time: float = 0.0
    final_ppl: Optional[float] = None
    final_loss: Optional[float] = None
    inference_flops_per_token: Optional[float] = None
    curve: list = field(default_factory=list)     # [(cumulative train FLOPs, valid ppl, step)]
    sweep: list = field(default_factory=list)     # [{"k", "ppl", "flops_per_token"}]
    phases: dict = field(default_factory=dict)    # phase -> number of logged steps


# --------------------------------------------------------------------------- reading


def _read_jsonl(path: Path) -> list[dict]:
    from ..train.metrics import read_metrics  # skips a torn last line from a crash

    return read_metrics(path)


def _num(v) -> Optional[float]:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(v)  # "inf" / "nan" as written by the logger
    except (TypeError, ValueError):
        return None


def _interp(xs: list, ys: list, x: float) -> Optional[float]:
    """Piecewise-linear y(x) through the points (xs increasing); linear extrapolation from the ends."""
    if not xs:
        return None
    if len(xs) == 1:
        return ys[0] * (x + 1) / (xs[0] + 1)  # cumulative quantity from step 0: proportional
    import bisect

    i = bisect.bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return ys[i]
    i = min(max(i, 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def read_sweep(run_dir: Path) -> list[dict]:
    path = run_dir / "report" / "sweep_k.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path}: not valid JSON (expected a list of {{k, ppl, flops_per_token}})") from None
    if isinstance(data, dict):
        data = data.get("points", data.get("sweep", []))
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of {{k, ppl, flops_per_token}}")
    pts = []
    for p in data:
        if isinstance(p, dict) and _num(p.get("ppl")) is not None and _num(p.get("flops_per_token")) is not None:
            pts.append({"k": p.get("k"), "ppl": _num(p["ppl"]), "flops_per_token": _num(p["flops_per_token"])})
    return sorted(pts, key=lambda p: p["flops_per_token"])


def load_run(run_dir) -> Run:
    run_dir = Path(run_dir)
    mpath, cpath = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not mpath.is_file():
        raise UserError(f"{mpath}: not found (is {run_dir} a run directory?)")
    cfg = {}
    if cpath.is_file():
        try:
            cfg = yaml.safe_load(cpath.read_text()) or {}
        except yaml.YAMLError:
            raise UserError(f"{cpath}: not valid YAML") from None
    recs = _read_jsonl(mpath)
    train = sorted((r for r in recs if r.get("kind", "train") == "train" and "loss" in r and "step" in r),
                   key=lambda r: r["step"])
    valid = sorted((r for r in recs if r.get("kind") == "valid" and "step" in r), key=lambda r: r["step"])
    method = str(cfg.get("method") or (train[-1].get("method") if train else "") or "dense")
    run = Run(path=str(run_dir), name=str(cfg.get("name") or run_dir.name), method=method,
              arch=str((cfg.get("model") or {}).get("arch", "")))
    if train:
        last = train[-1]
        run.steps = int(last["step"]) + 1
        run.tokens = int(last.get("tokens", 0))
        run.train_flops = _num(last.get("flops_total")) or 0.0
        run.wall_time = _num(last.get("elapsed")) or 0.0
        times = [_num(r.get("step_time")) for r in train if _num(r.get("step_time")) is not None]
        if times:
            run.step_time = sum(times) * (run.steps / len(times))
        for r in train:
            ph = str(r.get("phase", ""))
            run.phases[ph] = run.phases.get(ph, 0) + 1
    # Validation at `step` = that many steps done: the FLOPs spent so far are flops_total of step-1.
    xs = [int(r["step"]) for r in train if _num(r.get("flops_total")) is not None]
    ys = [_num(r["flops_total"]) for r in train if _num(r.get("flops_total")) is not None]
    for r in valid:
        ppl = _num(r.get("valid_ppl"))
        if ppl is None and _num(r.get("valid_loss")) is not None:
            ppl = math.exp(min(_num(r["valid_loss"]), 80.0))
        if ppl is None:
            continue
        done = int(r["step"])
        spent = 0.0 if done == 0 else _interp(xs, ys, done - 1)
        if spent is not None:
            run.curve.append((spent, ppl, done))
    if valid:
        run.final_ppl = _num(valid[-1].get("valid_ppl"))
        run.final_loss = _num(valid[-1].get("valid_loss"))
    run.sweep = read_sweep(run_dir)
    run.inference_flops_per_token = final_inference_flops_per_token(run_dir, cfg)
    return run


def _vocab_size(run_dir: Path, cfg: dict) -> Optional[int]:
    v = int((cfg.get("model") or {}).get("vocab_size") or 0)
    if v:
        return v
    try:  # the padded vocabulary is in every checkpoint's trainer state
        from ..train.checkpoint import list_checkpoints, load_trainer_state

        ckpts = list_checkpoints(run_dir / "checkpoints")
        if ckpts:
            return int(load_trainer_state(ckpts[-1][1]).get("vocab_size") or 0) or None
    except Exception:  # noqa: BLE001 - a report must not fail on an unreadable checkpoint
        return None
    return None


def final_inference_flops_per_token(run_dir: Path, cfg: dict) -> Optional[float]:
    """Forward FLOPs per input token of the run's final model (see the module docstring)."""
    try:
        from ..config import config_from_dict
        from ..train.flops import SampleShape, sample_flops

        c = config_from_dict({k: v for k, v in cfg.items()})
    except Exception:  # noqa: BLE001 - an old / foreign config: no inference point
        return None
    vocab = _vocab_size(Path(run_dir), cfg)
    if not vocab:
        return None
    m = c.model
    frac, router = 1.0, 0.0
    if c.method == "smoe" and not c.smoe.all_experts:
        frac, router = c.smoe.top_k / c.smoe.num_experts, 2.0 * m.d_model * c.smoe.num_experts
    elif c.method == "moe_dropout" and c.moe_dropout.eval_k and c.moe_dropout.eval_k < c.moe_dropout.num_experts:
        frac, router = c.moe_dropout.eval_k / c.moe_dropout.num_experts, 2.0 * m.d_model * c.moe_dropout.num_experts
    L = c.data.seq_len
    shape = SampleShape(L, _t5_decoder_len(c) if m.arch == "t5" else 0)
    fc = sample_flops(m, shape, vocab, None, ffn_fraction=frac, router_fwd=router)
    return fc.inference / L


def _t5_decoder_len(c) -> int:
    try:
        from ..data.objectives import span_corruption_lengths

        return int(span_corruption_lengths(c.data.seq_len, c.data.mask_rate, c.data.mean_span_length)[1])
    except Exception:  # noqa: BLE001
        # Expected decoder length of T5 span corruption: one sentinel per span plus the masked tokens.
        n_mask = round(c.data.seq_len * c.data.mask_rate)
        n_spans = max(1, round(n_mask / c.data.mean_span_length))
        return n_mask + n_spans + 1


# --------------------------------------------------------------------------- comparing


def _labels(runs: list[Run]) -> None:
    counts: dict = {}
    for r in runs:
        counts[r.method] = counts.get(r.method, 0) + 1
    for r in runs:
        base = METHOD_LABEL.get(r.method, r.method)
        r.label = base if counts[r.method] == 1 else f"{base} ({r.name})"


def compare(runs: list[Run], baseline: str = "dense") -> dict:
    """Rows of the table, each with ratios against the baseline run (by method name or run name)."""
    _labels(runs)
    base = next((r for r in runs if r.method == baseline), None) or next((r for r in runs if r.name == baseline), None)
    rows = []
    for r in runs:
        row = {"label": r.label, "method": r.method, "name": r.name, "arch": r.arch, "steps": r.steps,
               "tokens": r.tokens, "train_flops": r.train_flops, "step_time_s": r.step_time,
               "wall_time_s": r.wall_time, "final_ppl": r.final_ppl, "final_loss": r.final_loss,
               "inference_flops_per_token": r.inference_flops_per_token, "phases": r.phases}
        if base is not None:
            row["flops_speedup"] = _ratio(base.train_flops, r.train_flops)
            row["time_speedup"] = _ratio(base.step_time, r.step_time)
            row["wall_speedup"] = _ratio(base.wall_time, r.wall_time)
            row["ppl_vs_baseline"] = _ratio(r.final_ppl, base.final_ppl)
            row["inference_flops_vs_baseline"] = _ratio(r.inference_flops_per_token, base.inference_flops_per_token)
        rows.append(row)
    return {"baseline": base.label if base is not None else None, "rows": rows,
            "runs": [asdict(r) for r in runs]}


def _ratio(a, b) -> Optional[float]:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


# --------------------------------------------------------------------------- output


def _fmt_flops(x: Optional[float]) -> str:
    if x is None:
        return "—"
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _fmt_time(s: Optional[float]) -> str:
    if not s:
        return "—"
    if s >= 3600:
        return f"{s / 3600:.2f}h"
    if s >= 60:
        return f"{s / 60:.1f}min"
    return f"{s:.1f}s"


def _x(r: Optional[float]) -> str:
    return "" if r is None else f" ({r:.2f}×)"


def markdown(result: dict) -> str:
    base = result["baseline"]
    lines = ["# Method comparison", ""]
    if base:
        lines.append(f"Speedups are {base} / method (> 1 = cheaper); ppl ratio is method / {base} (< 1 = better).")
        lines.append("")
    lines += ["| method | steps | train FLOPs | step time | wall time | final ppl | inference FLOPs/token |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        ppl = "—" if row["final_ppl"] is None else f"{row['final_ppl']:.2f}"
        if row.get("ppl_vs_baseline") is not None:
            ppl += f" ({row['ppl_vs_baseline']:.3f})"
        lines.append(
            f"| {row['label']} | {row['steps']} | {_fmt_flops(row['train_flops'])}{_x(row.get('flops_speedup'))} | "
            f"{_fmt_time(row['step_time_s'])}{_x(row.get('time_speedup'))} | "
            f"{_fmt_time(row['wall_time_s'])}{_x(row.get('wall_speedup'))} | {ppl} | "
            f"{_fmt_flops(row['inference_flops_per_token'])}{_x(_inv(row.get('inference_flops_vs_baseline')))} |")
    lines += ["", "Step time: summed optimizer-step time (no validation / checkpointing); wall time: whole run.",
              "Inference FLOPs/token: the final model's forward per input token (diamonds in Figure 4a)."]
    sweeps = [r for r in result["runs"] if r["sweep"]]
    if sweeps:
        lines += ["", "## Sparse inference (k sweep)", "", "| run | k | ppl | FLOPs/token |", "|---|---:|---:|---:|"]
        for r in sweeps:
            for p in r["sweep"]:
                lines.append(f"| {r['label']} | {p['k']} | {p['ppl']:.2f} | {_fmt_flops(p['flops_per_token'])} |")
    lines += ["", "![Figure 3](fig3_ppl_vs_train_flops.png)", "",
              "![Figure 4a](fig4a_ppl_vs_inference_flops.png)", ""]
    return "\n".join(lines)


def _inv(r: Optional[float]) -> Optional[float]:
    return None if not r else 1.0 / r


def _style(method: str, i: int):
    if method in METHOD_STYLE:
        return METHOD_STYLE[method]
    return (f"C{i % 10}", "x")


def plot_fig3(runs: list[Run], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, r in enumerate(runs):
        pts = [(f, p) for f, p, _ in r.curve if f > 0 and p is not None and math.isfinite(p)]
        if not pts:
            continue
        color, marker = _style(r.method, i)
        ax.plot([f for f, _ in pts], [p for _, p in pts], color=color, marker=marker, markersize=3,
                linewidth=1.3, label=r.label)
        ax.scatter([pts[-1][0]], [pts[-1][1]], color=color, marker=marker, s=50, zorder=3, edgecolors="white")
    _finish_ppl_figure(plt, fig, ax, "cumulative training FLOPs", "Perplexity vs training cost (paper Fig. 3)", path)


def plot_fig4a(runs: list[Run], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, r in enumerate(runs):
        color, marker = _style(r.method, i)
        if r.sweep:
            xs = [p["flops_per_token"] for p in r.sweep]
            ys = [p["ppl"] for p in r.sweep]
            ax.plot(xs, ys, color=color, marker=marker, markersize=4, linewidth=1.2, label=f"{r.label} (k sweep)")
            for p in r.sweep:
                if p["k"] is not None:
                    ax.annotate(str(p["k"]), (p["flops_per_token"], p["ppl"]), textcoords="offset points",
                                xytext=(3, 3), fontsize=7, color=color)
        if r.inference_flops_per_token and r.final_ppl and math.isfinite(r.final_ppl):
            ax.scatter([r.inference_flops_per_token], [r.final_ppl], color=color, marker="D", s=60,
                       edgecolors="black", zorder=3, label=f"{r.label} (final model)")
    _finish_ppl_figure(plt, fig, ax, "inference FLOPs per token", "Perplexity vs inference cost (paper Fig. 4a)",
                       path, legend_fontsize=8)


def _finish_ppl_figure(plt, fig, ax, xlabel: str, title: str, path: Path, legend_fontsize=None) -> None:
    """Perplexity (log scale) against a cost axis: labels, grid, legend, save, close."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_comparison(run_dirs: list, out_dir, baseline: str = "dense") -> dict:
    if not run_dirs:
        raise UserError("no run directories given; usage: ssd-report RUN_DIR [RUN_DIR ...] --out DIR")
    runs = [load_run(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = compare(runs, baseline)
    plot_fig3(runs, out / "fig3_ppl_vs_train_flops.png")
    plot_fig4a(runs, out / "fig4a_ppl_vs_inference_flops.png")
    (out / "compare.md").write_text(markdown(result), encoding="utf-8")
    (out / "compare.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    result["out"] = str(out)
    return result


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="ssd-report", description="Compare runs: the paper's Figure 3, "
                                "Figure 4a and a Table-4-like summary.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    p.add_argument("--baseline", default="dense", help="method or run name the ratios are against (default dense)")
    args = p.parse_args(argv)
    result = write_comparison(args.runs, args.out, args.baseline)
    print(markdown(result).split("\n![")[0].rstrip())
    print(f"\nwrote {result['out']}/compare.md, compare.json, fig3_ppl_vs_train_flops.png, "
          f"fig4a_ppl_vs_inference_flops.png")
    return 0
