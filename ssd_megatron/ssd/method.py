"""SSD as a training method: monitor → schedule → transition, wired into the loop's hooks.

Before each step: time-based transitions first (a sparse phase that has run its T steps, or the final
dense fraction), then — in a dense phase, on a monitor step — cluster, measure ARI and sparsity and
let the schedule decide whether to go sparse. The decision is a pure function of the broadcast
clustering and the schedule state, so every rank takes it identically; the loop asserts that.
"""
from __future__ import annotations

import time
from typing import Optional

from ..ffn.backends import get_backend
from ..ffn.expert_layout import to_expert_major
from ..train.method import TrainingMethod, register_method
from .monitor import ActivationMonitor
from .schedule import PhaseSchedule
from .transition import to_dense, to_sparse


@register_method("ssd")
class SSDMethod(TrainingMethod):
    def __init__(self, cfg, model, group=None):
        super().__init__(cfg, model, group)
        s = cfg.ssd
        self.ffns = list(model.ffn_layers())
        device = next(model.parameters()).device
        backend = get_backend(s.backend, device=device)
        for ffn in self.ffns:
            ffn.configure_experts(s.num_experts, s.top_k)
            ffn.router_grad = s.router_grad
            ffn.set_backend(backend)
        self.schedule = PhaseSchedule(
            total_steps=cfg.train.max_steps, monitor_interval=s.monitor_interval, threshold=s.threshold,
            sparse_ratio=s.sparse_ratio, final_dense_ratio=s.final_dense_ratio, policy=s.switch_policy,
            seed=cfg.train.seed)
        self.monitor = ActivationMonitor(
            self.ffns, s.num_experts, cluster_backend=s.cluster_backend, seed=cfg.train.seed,
            sparsity_threshold=s.sparsity_threshold if _needs_threshold(self.ffns) else None, group=group)
        self.reference_batch: Optional[dict] = None
        self._pending: dict = {}

    def set_reference_batch(self, batch: dict) -> None:
        self.reference_batch = batch

    # ------------------------------------------------------------------ hooks

    def before_step(self, step: int) -> None:
        metrics: dict = {}
        before = self.schedule.current_phase
        self.schedule.step(step)
        if before == "sparse" and self.schedule.current_phase == "dense":
            metrics["switch"] = "sparse->dense"
            metrics["switch_seconds"] = to_dense(self.ffns, self.optimizer)
        if self.schedule.current_phase == "dense" and self.schedule.should_monitor(step):
            t0 = time.perf_counter()
            report = self.monitor.run(step, self.model, self.reference_batch)
            metrics.update(report.metrics(), threshold=self.cfg.ssd.threshold)
            if self.schedule.observe(step, report.mean_ari) == "sparse":
                to_sparse(self.ffns, self.monitor.labels, self.optimizer)
                metrics["switch"] = "dense->sparse"
                metrics["switch_seconds"] = time.perf_counter() - t0
        self._pending = metrics

    def after_step(self, step: int) -> dict:
        out, self._pending = self._pending, {}
        return out

    def phase(self) -> str:
        return self.schedule.current_phase

    def graph_key(self):
        # One CUDA graph per phase: a re-clustering permutes the parameters (and moments) in place, and the
        # sparse graph reads its experts as views of that storage.
        return self.schedule.current_phase

    def ffn_active_fraction(self) -> float:
        if self.phase() == "sparse":
            return self.cfg.ssd.top_k / self.cfg.ssd.num_experts
        return 1.0

    def router_flops_per_token(self) -> float:
        # Scores x·c_n for N experts; the centroids (a mean over W_i rows) cost O(d_ff·d) per layer and
        # step, not per token, and are left out (< 0.1% at the paper's batch sizes).
        if self.phase() == "sparse":
            return 2.0 * self.ffns[0].d_model * self.cfg.ssd.num_experts
        return 0.0

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.monitor.load_state_dict(state["monitor"])
        # The expert layout (expert_perm) and the storage order (expert_major) come back with the model's
        # buffers, the mode with the phase. A sparse phase always runs expert-major (one CUDA graph per
        # phase relies on it); checkpoints older than expert-major storage are moved here.
        phase = self.schedule.current_phase
        n = self.cfg.ssd.num_experts
        for ffn in self.ffns:
            if ffn.num_experts != n:  # an expert-major checkpoint fixes its experts (SwitchableFFN's load)
                raise ValueError(f"its FFNs are stored for {ffn.num_experts} experts (a sparse phase), this run has "
                                 f"ssd.num_experts: {n}; resume with the checkpoint's value or from a dense-phase "
                                 "checkpoint")
            if phase == "sparse":
                to_expert_major(ffn, self.optimizer)
            ffn.set_mode(phase)


def _needs_threshold(ffns) -> bool:
    """ReLU-family activations are measured by exact zeros; others by the configured threshold."""
    return any(ffn.activation not in ("relu", "reglu", "squared_relu") for ffn in ffns)
