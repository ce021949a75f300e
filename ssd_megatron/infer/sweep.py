"""Perplexity vs inference FLOPs of a trained model (paper Fig. 4a, Fig. 5) and the conversion gap
(Table 5, lower half).

Each study takes an `evaluate()` callable (returns {"loss", "ppl", ...} for the model as it is now)
so it runs the same validation batches the training loop used.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..plots import pyplot
from ..train.flops import SampleShape, sample_flops
from .sparse import densify, set_top_k, sparsify

DEFAULT_DROP_RATIOS = (0.25, 0.5, 0.75)


def default_ks(num_experts: int) -> list:
    if num_experts <= 16:
        return list(range(1, num_experts + 1))
    ks = {1, 2, 3, 4, 6, 8, 12, 16, 24, num_experts}
    return sorted(k for k in ks if k <= num_experts)


class InferenceFlops:
    """Forward FLOPs per input token with a fraction of each FFN active (+ the router's scores)."""

    def __init__(self, cfg, shape: SampleShape, vocab_size: int, model=None):
        self.cfg, self.shape, self.vocab, self.model = cfg, shape, vocab_size, model

    def __call__(self, active_fraction: float, num_experts: int) -> float:
        router = 0.0 if active_fraction >= 1.0 else 2.0 * self.cfg.model.d_model * num_experts
        fc = sample_flops(self.cfg.model, self.shape, self.vocab, self.model,
                          ffn_fraction=active_fraction, router_fwd=router)
        return fc.inference / self.shape.seq_len


def _set_k(model, method, k: int, drop_ratio: float = 0.0) -> None:
    """k experts per token in the method's own sparse structure."""
    if hasattr(method, "set_inference_k"):  # MoE-Dropout: its training experts and frozen router
        method.set_inference_k(k)
        for ffn in model.ffn_layers():
            ffn.dynamic_drop_ratio = drop_ratio
    else:  # SSD / dense (clustered once, then any k) and SMoE (its learned router)
        set_top_k(model, k, drop_ratio)


def monitor_warm_labels(model, method, num_experts: int, cfg) -> Optional[list]:
    """SSD's clustering for inference: warm-started from the run's last monitored clustering (and a
    cold start, the better kept — eq. 3), or None when the run kept no clustering."""
    monitor = getattr(method, "monitor", None)
    if monitor is None or any(lab is None for lab in monitor.labels) or num_experts != monitor.num_experts:
        return None
    from .sparse import cluster_layers

    return cluster_layers(list(model.ffn_layers()), num_experts, "ssd", prev_labels=monitor.labels,
                          cluster_backend=cfg.ssd.cluster_backend, seed=cfg.train.seed)


def _prepare(model, method, cfg, num_experts: int, cluster_backend: str, seed: int) -> Optional[float]:
    """Bring the model into a sparse form whose k can be changed; returns clustering seconds if any."""
    if cfg.method in ("smoe", "moe_dropout"):
        return None
    t0 = time.perf_counter()
    labels = monitor_warm_labels(model, method, num_experts, cfg)
    sparsify(model, num_experts, num_experts, labels=labels, cluster_backend=cluster_backend, seed=seed)
    return time.perf_counter() - t0


def method_num_experts(cfg) -> int:
    return {"smoe": cfg.smoe.num_experts, "moe_dropout": cfg.moe_dropout.num_experts}.get(cfg.method,
                                                                                          cfg.ssd.num_experts)


def sweep_k(model, method, cfg, evaluate: Callable[[], dict], flops: InferenceFlops,
            ks: Optional[Sequence[int]] = None, drop_ratios: Sequence[float] = DEFAULT_DROP_RATIOS,
            cluster_backend: str = "torch", seed: int = 0, num_experts: Optional[int] = None) -> dict:
    """Fixed top-k for every k (Fig. 4a) and dynamic top-k (§5.3, Fig. 5) for each drop ratio.
    `num_experts` overrides N for SSD / dense models (a dense run "MoEfied" with SSD's N)."""
    n = num_experts if num_experts and cfg.method in ("dense", "ssd") else method_num_experts(cfg)
    ks = list(ks or default_ks(n))
    seconds = _prepare(model, method, cfg, n, cluster_backend, seed)
    points, dynamic = [], []
    for k in ks:
        _set_k(model, method, k)
        res = evaluate()
        points.append({"k": k, "loss": res["loss"], "ppl": res["ppl"], "flops_per_token": flops(k / n, n)})
    # Dynamic top-k (§5.3) truncates SSD's centroid-score candidates; the baselines' routers don't apply it.
    for ratio in drop_ratios if cfg.method in ("dense", "ssd") else ():
        for k in ks:
            kept = k * (1.0 - ratio)
            if kept < 1.0:
                continue
            _set_k(model, method, k, ratio)
            res = evaluate()
            dynamic.append({"k": k, "drop_ratio": ratio, "experts_per_token": kept, "loss": res["loss"],
                            "ppl": res["ppl"], "flops_per_token": flops(kept / n, n)})
    _set_k(model, method, n)
    if cfg.method in ("dense", "ssd"):
        densify(model)
    dense = evaluate()
    return {"method": cfg.method, "num_experts": n, "clustering_seconds": seconds, "points": points,
            "dynamic": dynamic, "dense": {"loss": dense["loss"], "ppl": dense["ppl"], "flops_per_token": flops(1.0, n)}}


def conversion_gap(model, method, cfg, evaluate: Callable[[], dict], top_k: Optional[int] = None,
                   cluster_backend: str = "torch", seed: int = 0) -> dict:
    """Table 5 (lower half): perplexity of the dense model and of its MoE forms at top-k with random
    neuron groups, cold-start clustering (MoEfication), and SSD's warm-started clustering."""
    n = cfg.ssd.num_experts
    k = top_k or cfg.ssd.top_k
    densify(model)
    out = {"num_experts": n, "top_k": k, "dense": evaluate()["ppl"]}
    monitor = getattr(method, "monitor", None)
    prev = monitor.labels if monitor is not None and all(lab is not None for lab in monitor.labels) else None
    for grouping in ("random", "cold", "ssd"):
        from .sparse import cluster_layers

        labels = cluster_layers(list(model.ffn_layers()), n, grouping, prev_labels=prev,
                                cluster_backend=cluster_backend, seed=seed)
        sparsify(model, n, k, labels=labels)
        out[grouping] = evaluate()["ppl"]
        densify(model)
    out["warm_start_source"] = "last monitored clustering" if prev is not None else "current expert layout"
    return out


def write_sweep(result: dict, report_dir) -> list:
    """report/sweep_k.json + sweep_k.png (Fig. 4a with the dynamic top-k curves of Fig. 5) + sweep_k.md."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "sweep_k.json").write_text(json.dumps(result, indent=1))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = result["points"]
    ax.plot([p["flops_per_token"] for p in pts], [p["ppl"] for p in pts], "k-o", ms=4, label="fixed top-k")
    for p in pts:
        ax.annotate(str(p["k"]), (p["flops_per_token"], p["ppl"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    for ratio in sorted({d["drop_ratio"] for d in result["dynamic"]}):
        ds = [d for d in result["dynamic"] if d["drop_ratio"] == ratio]
        ax.plot([d["flops_per_token"] for d in ds], [d["ppl"] for d in ds], "--s", ms=3,
                label=f"dynamic top-k, drop {ratio:.0%}")
    ax.axhline(result["dense"]["ppl"], color="r", lw=1, ls=":", label="dense")
    ax.set(xlabel="inference FLOPs per token", ylabel="validation perplexity",
           title=f"{result['method']}: perplexity vs inference FLOPs (Fig. 4a / 5)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report_dir / "sweep_k.png", dpi=120)
    plt.close(fig)
    lines = ["| k | experts/token | drop | ppl | GFLOPs/token |", "|---|---|---|---|---|"]
    for p in pts:
        lines.append(f"| {p['k']} | {p['k']} | 0 | {p['ppl']:.3f} | {p['flops_per_token'] / 1e9:.4f} |")
    for d in result["dynamic"]:
        lines.append(f"| {d['k']} | {d['experts_per_token']:.2f} | {d['drop_ratio']:.2f} | {d['ppl']:.3f} | "
                     f"{d['flops_per_token'] / 1e9:.4f} |")
    lines.append(f"| dense | all | 0 | {result['dense']['ppl']:.3f} | {result['dense']['flops_per_token'] / 1e9:.4f} |")
    (report_dir / "sweep_k.md").write_text("\n".join(lines) + "\n")
    return lines
