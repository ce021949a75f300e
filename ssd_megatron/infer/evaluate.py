"""Validation loss / perplexity: inside the training loop, and `ssd-eval` on a saved checkpoint.

The loss is the mean cross-entropy over every valid target token of a fixed set of validation
batches (the first `N x micro_batch_size` validation samples, in order, so successive evaluations and
runs compare like with like). Ranks split the batches and sum (loss, tokens) with one all-reduce.
For BERT also the masked-token accuracy.

`ssd-eval RUN_OR_CHECKPOINT [--split valid] [--batches N]` loads the latest (or the given)
checkpoint, rebuilds the model and its method in inference form (`method.eval_mode()`: dense for SSD,
all layers for PLD) and prints one JSON object as its last line (loss, ppl, tokens, ...).
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError


@torch.no_grad()
def evaluate(model, batches: list, dims=None, device: Optional[torch.device] = None, autocast=None,
             mlm_accuracy: bool = False) -> dict:
    from ..parallel.distributed import all_reduce_sum
    from ..train.data import to_device
    from ..train.loss import lm_loss, masked_accuracy

    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    try:
        for batch in batches:
            batch = to_device(batch, device)
            with autocast():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"})
            loss_sum, n = lm_loss(logits, batch["labels"])
            sums[0] += float(loss_sum)
            sums[1] += int(n)
            if mlm_accuracy:
                c, t = masked_accuracy(logits, batch["labels"])
                sums[2] += c
                sums[3] += t
    finally:
        model.train(was_training)
    if dims is not None:
        comm = dims.comm_device
        sums = all_reduce_sum(sums.to(comm), dims).cpu()
    tokens = int(sums[1])
    loss = float(sums[0]) / max(1, tokens)
    out = {"loss": loss, "ppl": math.exp(loss) if loss < 80 else float("inf"), "tokens": tokens}
    if mlm_accuracy:
        out["accuracy"] = float(sums[2]) / max(1, int(sums[3]))
    return out


def evaluate_checkpoint(target: str, split: str = "valid", batches: Optional[int] = None,
                        device: str = "auto") -> dict:
    """Evaluate a run directory's latest checkpoint (or a given checkpoint directory) on one process."""
    from ..config import config_from_dict
    from ..models import build_model
    from ..parallel.distributed import resolve_device
    from ..train.checkpoint import load_model_weights, load_trainer_state
    from ..train.data import build_train_data
    from ..train.loop import autocast_context
    from ..train.method import build_method

    ckpt = _resolve_checkpoint(Path(target))
    state = load_trainer_state(ckpt)
    cfg_dict = dict(state["config"])
    cfg_dict["train"] = dict(cfg_dict.get("train", {}), device=device)
    try:
        cfg = config_from_dict(cfg_dict)
    except UserError as e:
        raise UserError(f"checkpoint file {ckpt / 'trainer.pt'}: its config no longer validates: {e}") from None
    dev = resolve_device(cfg.train.device)
    data = build_train_data(cfg, None, need_train=split == "train")
    vocab = int(state.get("vocab_size", data.vocab_size))
    model = build_model(cfg.model, vocab).to(dev)
    method = build_method(cfg, model)
    load_model_weights(ckpt, model, cfg.model.arch)
    if state.get("method") is not None:
        method.load_state_dict(state["method"])
    n = batches or cfg.train.eval_batches
    if split == "valid":
        eval_batches = data.valid_batches(n, cfg.train.micro_batch_size, None)
    elif split == "train":
        eval_batches = data.first_train_batches(n, cfg.train.micro_batch_size)
    else:
        raise UserError(f"--split: {split!r} is not accepted; accepted: valid, train")
    method.eval_mode()
    res = evaluate(model, eval_batches, None, dev, autocast_context(dev, cfg.train.precision),
                   mlm_accuracy=cfg.model.arch == "bert")
    res.update({"checkpoint": str(ckpt), "step": int(state["step"]), "split": split, "batches": len(eval_batches),
                "method": cfg.method, "arch": cfg.model.arch})
    return res


def _resolve_checkpoint(p: Path) -> Path:
    from ..train.checkpoint import latest_checkpoint

    if not p.exists():
        raise UserError(f"{p} does not exist (expected a run directory or a checkpoint directory)")
    if (p / "manifest.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise UserError(f"{p} holds no complete checkpoint (looked for checkpoints/step_*/manifest.json)")


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="ssd-eval", description="Validation loss / perplexity of a checkpoint.")
    ap.add_argument("target", help="run directory (uses its latest checkpoint) or checkpoint directory")
    ap.add_argument("--split", default="valid", choices=["valid", "train"])
    ap.add_argument("--batches", type=int, default=None, help="number of micro-batches (default: train.eval_batches)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args(argv)
    if args.batches is not None and args.batches < 1:
        raise UserError(f"--batches: {args.batches} is out of range; accepted: an integer >= 1")
    res = evaluate_checkpoint(args.target, args.split, args.batches, args.device)
    print(json.dumps(res), flush=True)
    return 0
