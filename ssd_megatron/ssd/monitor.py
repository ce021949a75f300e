"""The activation-pattern monitor (paper §3, §4.3): cluster every FFN, compare with the last clustering.

Every `ssd.monitor_interval` steps of a dense phase the monitor clusters the neurons of every layer
(warm start from the previous clustering and a cold start, keeping the lower WCSS, eq. 3), measures
the ARI between this and the previous clustering of the same layer, and the activation sparsity on a
fixed validation batch. The mean ARI drives the phase schedule.

The clustering is computed once, on rank 0, and broadcast: k-means on different ranks could differ in
the last bit (different BLAS threads), and every rank must adopt exactly the same experts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .ari import adjusted_rand_index
from .clustering import cluster_layers
from .sparsity import SparsityProbe


@dataclass
class MonitorReport:
    step: int
    ari: list  # per layer; None entries before a previous clustering exists
    mean_ari: Optional[float]
    sparsity: list  # per layer, or [] when no reference batch was given
    wcss: list
    warm_won: list
    seconds: float
    # Mean over layers of ARI(this clustering, each earlier monitored clustering): a row of Fig. 1c.
    ari_vs_history: list = field(default_factory=list)

    def metrics(self) -> dict:
        out = {"monitor_seconds": round(self.seconds, 4), "wcss_mean": float(np.mean(self.wcss))}
        if self.mean_ari is not None:
            out["ari"] = self.mean_ari
            out["ari_per_layer"] = self.ari
        if self.sparsity:
            out["sparsity"] = float(np.mean(self.sparsity))
            out["sparsity_per_layer"] = self.sparsity
        if self.ari_vs_history:
            out["ari_vs_history"] = self.ari_vs_history
        out["warm_start_won"] = sum(bool(w) for w in self.warm_won)
        return out


class ActivationMonitor:
    """Holds the clustering history of every FFN layer (labels indexed by neuron id)."""

    def __init__(self, ffns, num_experts: int, *, cluster_backend: str = "torch", seed: int = 0,
                 sparsity_threshold: Optional[float] = None, group=None, keep_history: int = 256):
        self.ffns = list(ffns)
        self.num_experts = num_experts
        self.cluster_backend = cluster_backend
        self.seed = seed
        self.sparsity_threshold = sparsity_threshold
        self.group = group
        self.keep_history = keep_history
        self.labels: list = [None] * len(self.ffns)  # latest clustering per layer (CPU int64)
        self.history: list = []  # [(step, [labels per layer as int16 numpy])]

    # ------------------------------------------------------------------ measurement

    @torch.no_grad()
    def measure_sparsity(self, model, batch: Optional[dict]) -> list:
        if batch is None:
            return []
        was_training = model.training
        model.eval()
        try:
            probe = SparsityProbe(self.ffns, threshold=self.sparsity_threshold)
            mask = batch.get("attention_mask")
            if mask is not None:
                probe.set_mask(mask)
            # Eager even where the blocks are compiled: the probe's hooks would otherwise be traced into a graph
            # variant of their own (and under train.cuda_graph: blocks, into CUDA graphs) used once per monitor step.
            with probe, torch.compiler.set_stance("force_eager"):
                model(**batch)
            return probe.per_layer()
        finally:
            model.train(was_training)

    def _cluster_all(self, step: int, rows: list):
        # All layers' cold and warm starts as one batched problem (one launch stream on a GPU).
        return cluster_layers(rows, self.num_experts, self.labels, backend=self.cluster_backend,
                              seed=self.seed + step * 1009)

    def _broadcast_labels(self, labels: list) -> list:
        if self.group is None or not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return labels
        device = self.ffns[0].expert_perm.device
        if dist.get_backend(self.group) != "nccl":
            device = torch.device("cpu")
        stacked = torch.stack([lab.to(device) for lab in labels]) if labels[0] is not None else None
        if stacked is None:
            stacked = torch.empty(len(self.ffns), self.ffns[0].d_ff, dtype=torch.long, device=device)
        src = dist.get_global_rank(self.group, 0) if hasattr(dist, "get_global_rank") else 0
        dist.broadcast(stacked, src=src, group=self.group)
        return [row.cpu() for row in stacked.unbind(0)]

    def run(self, step: int, model, reference_batch: Optional[dict] = None) -> MonitorReport:
        t0 = time.perf_counter()
        is_src = self.group is None or not dist.is_initialized() or dist.get_rank(self.group) == 0
        rows = [ffn.neuron_rows().float() for ffn in self.ffns]  # every rank: a gather under FSDP2
        if is_src:
            results = self._cluster_all(step, rows)
            new_labels = [r.labels.detach().cpu().long() for r in results]
            wcss = [float(r.wcss) for r in results]
            warm = [getattr(r, "start", "cold") == "warm" for r in results]
        else:
            new_labels, wcss, warm = [None] * len(self.ffns), [0.0] * len(self.ffns), [False] * len(self.ffns)
        new_labels = self._broadcast_labels(new_labels)
        ari = [None if prev is None else adjusted_rand_index(prev.numpy(), cur.numpy())
               for prev, cur in zip(self.labels, new_labels)]
        mean_ari = None if any(a is None for a in ari) else float(np.mean(ari))
        vs_hist = [float(np.mean([adjusted_rand_index(old, cur.numpy()) for old, cur in zip(past, new_labels)]))
                   for _, past in self.history]
        self.labels = new_labels
        self.history.append((step, [lab.numpy().astype(np.int16) for lab in new_labels]))
        self.history = self.history[-self.keep_history:]
        sparsity = self.measure_sparsity(model, reference_batch)
        return MonitorReport(step=step, ari=ari, mean_ari=mean_ari, sparsity=sparsity, wcss=wcss,
                             warm_won=warm, seconds=time.perf_counter() - t0, ari_vs_history=vs_hist)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict:
        return {
            "labels": [None if lab is None else lab.numpy().astype(np.int16) for lab in self.labels],
            "history": [(s, list(labs)) for s, labs in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        self.labels = [None if lab is None else torch.from_numpy(np.asarray(lab).astype(np.int64))
                       for lab in state["labels"]]
        self.history = [(int(s), [np.asarray(x, dtype=np.int16) for x in labs]) for s, labs in state["history"]]
