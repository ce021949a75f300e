"""Run metrics: `metrics.jsonl` (the record of truth), tensorboard, wandb, and the console.

One JSON object per line, flushed as written so a crash loses nothing already logged. Record kinds:
- train (`"kind": "train"`): step (0-based index of the optimizer step, the number the method hooks
  receive), loss, ppl, lr, grad_norm, tokens (cumulative input tokens), target_tokens, tokens_per_s,
  step_time, phase, flops (this step), flops_total (cumulative), mfu (GPU only), elapsed (wall
  seconds since the run started, across resumes), plus whatever the method's after_step returned;
- valid (`"kind": "valid"`): step = number of optimizer steps done (the model that step `step` would
  train), valid_loss, valid_ppl, valid_tokens, (valid_acc for BERT);
- the method's own records pass through unchanged.
Only rank 0 writes. On resume, `truncate_metrics` drops what the resumed run will log again.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional


def read_metrics(path) -> list[dict]:
    """All complete records (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def truncate_metrics(path, resume_step: int) -> None:
    """Keep what happened before `resume_step` optimizer steps were done (atomic rewrite).

    Train records of steps >= resume_step are re-logged by the resumed run; a validation at
    exactly resume_step ran before that checkpoint was written, so it stays.
    """
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for r in read_metrics(path):
        s = r.get("step")
        if isinstance(s, (int, float)):
            if s > resume_step or (s == resume_step and r.get("kind") != "valid"):
                continue
        keep.append(r)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        return _json_safe(v.item())
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def safe_ppl(loss: float) -> float:
    return math.exp(loss) if loss < 80 else float("inf")


class MetricsLogger:
    """Fans a record out to every sink. A no-op object on ranks other than 0."""

    def __init__(self, run_dir: Path, cfg, enabled: bool, start_step: int = 0, config_dict: Optional[dict] = None):
        self.enabled = enabled
        self.cfg = cfg
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self._file = open(self.path, "a", encoding="utf-8")
        lcfg = cfg.logging
        if lcfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step)
            except ImportError:
                print("warning: logging.tensorboard is on but tensorboard is not installed; skipping it",
                      file=sys.stderr)
        if lcfg.wandb != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(project=lcfg.wandb_project, name=cfg.name or None, dir=str(run_dir),
                                         mode=lcfg.wandb, config=config_dict, resume="allow",
                                         id=_wandb_id(run_dir))
            except ImportError:
                print(f"warning: logging.wandb={lcfg.wandb} but wandb is not installed; skipping it",
                      file=sys.stderr)
        if lcfg.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc=cfg.name or "train",
                             dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    # ---- sinks

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        rec = _json_safe(record)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        step = rec.get("step")
        scalars = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        prefix = "valid/" if rec.get("kind") == "valid" else "train/"
        if self._tb is not None and step is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k if "/" in k else prefix + k, v, step)
        if self._wandb is not None and step is not None:
            self._wandb.log({(k if "/" in k else prefix + k): v for k, v in scalars.items()}, step=int(step))

    def train_step(self, record: dict) -> None:
        self.write(record)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.3f}", ppl=f"{record['ppl']:.1f}",
                                  tok_s=f"{record['tokens_per_s']:.0f}", phase=record.get("phase", ""),
                                  refresh=False)
            self._bar.update(record["step"] + 1 - self._bar.n)
        elif (record["step"] + 1) % self.cfg.train.log_interval == 0:
            self.print(f"step {record['step'] + 1}/{self.cfg.train.max_steps} | loss {record['loss']:.4f} | "
                       f"ppl {record['ppl']:.2f} | lr {record['lr']:.3g} | grad {record['grad_norm']:.3f} | "
                       f"{record['tokens_per_s']:.0f} tok/s | {record.get('phase', '')}"
                       + (f" | mfu {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""))

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
