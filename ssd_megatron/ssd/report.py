"""The paper's pictures for one SSD run, drawn from its metrics.jsonl.

Fig. 1a: activation sparsity vs step;  Fig. 1b: ARI of consecutive monitors vs step;
Fig. 1c: ARI between every pair of monitored clusterings;  Fig. 6: validation perplexity vs step with
the sparse phases shaded; and what SSD is for, time: step time vs step with the sparse phases shaded,
and the median step time and FLOPs of each phase. `ssd_sections(records, report_dir)` writes the PNGs
and returns the markdown lines the run report appends.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from ..plots import pyplot
from ..train.report import sparse_intervals


# Steps left out of a phase's step-time median after each switch: the first steps of a kind compile,
# autotune and, with train.cuda_graph, capture (train/step_graph.py's WARMUP_STEPS + the capture).
SETTLE_STEPS = 4


def phase_step_stats(records: list, settle: int = SETTLE_STEPS) -> dict:
    """{phase: {"step_ms": median step time, "flops": median FLOPs per step, "steps": steps counted}} over
    the train records, leaving out the first `settle` steps after the start and after every switch."""
    times, flops = {}, {}
    since, last = 0, None
    for r in records:
        if "step_time" not in r or "phase" not in r:
            continue
        since = 0 if r["phase"] != last else since + 1
        last = r["phase"]
        if since >= settle:
            times.setdefault(last, []).append(r["step_time"])
            if r.get("flops"):
                flops.setdefault(last, []).append(r["flops"])
    return {p: {"step_ms": 1e3 * statistics.median(t), "steps": len(t),
                "flops": statistics.median(flops[p]) if p in flops else None} for p, t in times.items()}


def time_lines(stats: dict) -> list:
    """The report's line comparing the phases' step times (and FLOPs), or nothing without both phases."""
    d, s = stats.get("dense"), stats.get("sparse")
    if not d or not s:
        return []
    line = (f"- step time, median: dense {d['step_ms']:.1f} ms ({d['steps']} steps), sparse {s['step_ms']:.1f} ms "
            f"({s['steps']} steps): sparse steps take **{s['step_ms'] / d['step_ms']:.2f}×** the dense steps' time")
    if d["flops"] and s["flops"]:
        line += f" for {s['flops'] / d['flops']:.2f}× their FLOPs"
    lines = [line]
    if s["step_ms"] >= d["step_ms"]:
        lines.append("  (no time saved in the sparse phase: on a GPU that usually means eager, host-bound steps; "
                     "see the README's 'Status and limits' and `train.cuda_graph`)")
    return lines


def pairwise_matrix(monitors: list) -> np.ndarray:
    """Symmetric ARI matrix from each monitor's `ari_vs_history` row (ARI vs every earlier monitor)."""
    m = len(monitors)
    mat = np.eye(m)
    for i, r in enumerate(monitors):
        row = (r.get("ari_vs_history") or [])[-i:] if i else []
        offset = i - len(row)  # the monitor keeps a bounded history: row covers the latest len(row)
        for j, v in enumerate(row):
            mat[i, offset + j] = mat[offset + j, i] = v
    return mat


def _valid_ppl(r: dict):
    for key in ("valid_ppl", "val_ppl"):
        if key in r:
            return r[key]
    return None


def ssd_sections(records: list, report_dir) -> list:
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    monitors = [r for r in records if "wcss_mean" in r]
    if not monitors and not any(r.get("phase") == "sparse" for r in records):
        return []
    plt = pyplot()
    lines = ["", "## SSD", ""]
    spans = sparse_intervals(records)
    total = max((r["step"] for r in records if "step" in r), default=0) + 1
    n_sparse = sum(b - a for a, b in spans)
    lines.append(f"- sparse phases: {len(spans)} ({', '.join(f'{a}-{b}' for a, b in spans) or 'none'}); "
                 f"{n_sparse} of {total} steps sparse ({100.0 * n_sparse / max(total, 1):.1f}%)")
    switches = [r for r in records if "switch" in r]
    if switches:
        cost = sum(r.get("switch_seconds", 0.0) for r in switches)
        lines.append(f"- switches: {len(switches)}, total switch time {cost:.2f} s")
    lines += time_lines(phase_step_stats(records))

    def shade(ax):
        for a, b in spans:
            ax.axvspan(a, b, color="0.85", zorder=0)

    with_sparsity = [r for r in monitors if "sparsity_per_layer" in r]
    if with_sparsity:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [r["step"] for r in with_sparsity]
        per_layer = np.array([r["sparsity_per_layer"] for r in with_sparsity])
        for j in range(per_layer.shape[1]):
            ax.plot(steps, per_layer[:, j], lw=0.8, alpha=0.5)
        ax.plot(steps, per_layer.mean(1), "k-o", ms=3, label="mean")
        shade(ax)
        ax.set(xlabel="step", ylabel="activation sparsity", title="Activation sparsity (Fig. 1a)", ylim=(0, 1))
        ax.legend()
        fig.tight_layout()
        fig.savefig(report_dir / "sparsity.png", dpi=120)
        plt.close(fig)
        lines.append(f"- final activation sparsity: {per_layer[-1].mean():.3f} ![sparsity](sparsity.png)")

    with_ari = [r for r in monitors if "ari" in r]
    if with_ari:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [r["step"] for r in with_ari]
        per_layer = np.array([r["ari_per_layer"] for r in with_ari], dtype=float)
        for j in range(per_layer.shape[1]):
            ax.plot(steps, per_layer[:, j], lw=0.8, alpha=0.5)
        ax.plot(steps, [r["ari"] for r in with_ari], "k-o", ms=3, label="mean")
        threshold = next((r["threshold"] for r in records if "threshold" in r), None)
        if threshold is not None:
            ax.axhline(threshold, color="r", ls="--", lw=1, label="τ")
        shade(ax)
        ax.set(xlabel="step", ylabel="ARI", title="ARI of consecutive monitors (Fig. 1b)", ylim=(-0.05, 1.05))
        ax.legend()
        fig.tight_layout()
        fig.savefig(report_dir / "ari.png", dpi=120)
        plt.close(fig)
        lines.append(f"- last consecutive ARI: {with_ari[-1]['ari']:.3f} ![ari](ari.png)")

    if len(monitors) > 1:
        mat = pairwise_matrix(monitors)
        fig, ax = plt.subplots(figsize=(5, 4.2))
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", origin="lower")
        ticks = list(range(len(monitors)))
        step_labels = [str(r["step"]) for r in monitors]
        stride = max(1, len(ticks) // 8)
        ax.set_xticks(ticks[::stride], step_labels[::stride], rotation=45)
        ax.set_yticks(ticks[::stride], step_labels[::stride])
        ax.set(xlabel="monitor step", ylabel="monitor step", title="ARI between clusterings (Fig. 1c)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(report_dir / "ari_pairwise.png", dpi=120)
        plt.close(fig)
        lines.append("- pairwise ARI of all monitored clusterings ![ari_pairwise](ari_pairwise.png)")

    evals = [r for r in records if _valid_ppl(r) is not None]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in evals], [_valid_ppl(r) for r in evals], "b-o", ms=3, label="SSD")
        shade(ax)
        ax.set(xlabel="step", ylabel="validation perplexity", title="Validation perplexity, sparse phases shaded (Fig. 6)")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(report_dir / "ppl_phases.png", dpi=120)
        plt.close(fig)
        lines.append("- validation perplexity with sparse phases shaded ![ppl_phases](ppl_phases.png)")

    timed = [r for r in records if "step_time" in r and "step" in r]
    if timed and spans:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in timed], [1e3 * r["step_time"] for r in timed], "b-", lw=0.8)
        shade(ax)
        ax.set(xlabel="step", ylabel="step time (ms)", title="Step time, sparse phases shaded")
        ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(report_dir / "step_time.png", dpi=120)
        plt.close(fig)
        lines.append("- step time with sparse phases shaded ![step_time](step_time.png)")
    return lines
