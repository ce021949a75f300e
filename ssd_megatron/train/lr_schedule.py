"""Learning-rate schedules as pure functions of the step, so a resume needs only the step number.

`step` is the 0-based index of the optimizer step about to run.

- noam (Vaswani et al. 2017, the paper's choice, appendix A):
      lr(s) = lr * d_model^-0.5 * min(n^-0.5, n * warmup^-1.5),   n = s + 1
  `optim.lr` is the scale factor (the paper uses 0.5 for GPT, 1 for BERT/T5), so the peak value is
  lr * d_model^-0.5 * warmup^-0.5 at n = warmup (e.g. 0.5 / sqrt(768 * 2000) = 4.0e-4).
- cosine: linear warm-up to `optim.lr` over `warmup_steps`, then half a cosine down to `optim.min_lr`,
  reached exactly by the last step (max_steps - 1).
- constant: linear warm-up, then `optim.lr`.
The linear warm-up reaches the full value at step warmup-1 (n = s + 1 counts the step being taken), so
step 0 never runs with lr 0.
"""
from __future__ import annotations

import math

import torch


class LRSchedule:
    def __init__(self, kind: str, lr: float, warmup_steps: int, max_steps: int, min_lr: float = 0.0,
                 d_model: int = 1):
        if kind not in ("noam", "cosine", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.kind, self.lr, self.warmup, self.max_steps = kind, lr, warmup_steps, max_steps
        self.min_lr, self.d_model = min_lr, d_model

    @classmethod
    def from_config(cls, cfg) -> "LRSchedule":
        o = cfg.optim
        return cls(o.schedule, o.lr, o.warmup_steps, cfg.train.max_steps, o.min_lr, cfg.model.d_model)

    def __call__(self, step: int) -> float:
        n = step + 1
        if self.kind == "noam":
            w = max(1, self.warmup)
            return self.lr * self.d_model ** -0.5 * min(n ** -0.5, n * w ** -1.5)
        if self.warmup > 0 and n <= self.warmup:
            return self.lr * n / self.warmup
        if self.kind == "constant":
            return self.lr
        start = max(self.warmup - 1, 0)  # the step that runs at the peak
        progress = min(1.0, max(0.0, (step - start) / max(1, self.max_steps - 1 - start)))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer, step: int) -> float:
        lr = self(step)
        for g in optimizer.param_groups:
            if torch.is_tensor(g["lr"]):  # a captured step reads it from the device (step_graph.py)
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"kind": self.kind, "lr": self.lr, "warmup": self.warmup, "max_steps": self.max_steps,
                "min_lr": self.min_lr, "d_model": self.d_model}

    def load_state_dict(self, state: dict) -> None:
        # The config is the source of truth (a resumed run may extend max_steps); nothing to restore.
        pass
