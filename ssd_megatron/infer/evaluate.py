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
import time
from pathlib import Path
from typing import Optional

import torch
from dataclasses import dataclass

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


@dataclass
class EvalContext:
    """A checkpoint loaded for evaluation: config, model + method in inference form, batches."""

    cfg: object
    model: object
    method: object
    state: dict
    checkpoint: Path
    device: torch.device
    batches: list
    split: str
    autocast: object
    vocab_size: int

    def evaluate(self) -> dict:
        return evaluate(self.model, self.batches, None, self.device, self.autocast,
                        mlm_accuracy=self.cfg.model.arch == "bert")

    def header(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "step": int(self.state["step"]), "split": self.split,
                "batches": len(self.batches), "method": self.cfg.method, "arch": self.cfg.model.arch}


def load_for_eval(target: str, split: str = "valid", batches: Optional[int] = None,
                  device: str = "auto") -> EvalContext:
    """Load a run directory's latest checkpoint (or a given checkpoint directory) on one process."""
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
    return EvalContext(cfg, model, method, state, ckpt, dev, eval_batches, split,
                       autocast_context(dev, cfg.train.precision), vocab)


def evaluate_checkpoint(target: str, split: str = "valid", batches: Optional[int] = None,
                        device: str = "auto") -> dict:
    ctx = load_for_eval(target, split, batches, device)
    res = ctx.evaluate()
    res.update(ctx.header())
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

    ap = argparse.ArgumentParser(prog="ssd-eval", description="Validation loss / perplexity of a checkpoint, "
                                 "densely or as a sparse (MoE) model with any k.")
    ap.add_argument("target", help="run directory (uses its latest checkpoint) or checkpoint directory")
    ap.add_argument("--split", default="valid", choices=["valid", "train"])
    ap.add_argument("--batches", type=int, default=None, help="number of micro-batches (default: train.eval_batches)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp = ap.add_argument_group("sparse inference (paper §5.2-5.3, Table 5)")
    sp.add_argument("--top-k", type=int, default=None, help="evaluate as an MoE with k experts per token (k=N is dense)")
    sp.add_argument("--num-experts", type=int, default=None, help="N for --top-k (default: ssd.num_experts)")
    sp.add_argument("--dynamic-topk", type=float, default=None, metavar="RATIO",
                    help="take top-k candidates, drop the lowest-scoring RATIO of them across the batch (§5.3)")
    sp.add_argument("--sweep-k", action="store_true",
                    help="perplexity vs inference FLOPs for every k (+ dynamic top-k); writes RUN/report/sweep_k.*")
    sp.add_argument("--ks", default=None, help="comma list of k for --sweep-k (default: all k, or a spread for N > 16)")
    sp.add_argument("--drop-ratios", default="0.25,0.5,0.75", help="dynamic top-k ratios for --sweep-k")
    sp.add_argument("--conversion-gap", action="store_true",
                    help="Table 5: dense vs MoE forms with random groups, cold-start and SSD warm-start clustering")
    args = ap.parse_args(argv)
    if args.batches is not None and args.batches < 1:
        raise UserError(f"--batches: {args.batches} is out of range; accepted: an integer >= 1")
    if args.dynamic_topk is not None and not 0.0 <= args.dynamic_topk < 1.0:
        raise UserError(f"--dynamic-topk: {args.dynamic_topk} is out of range; accepted: [0, 1)")
    ctx = load_for_eval(args.target, args.split, args.batches, args.device)
    res = _run_sparse_study(ctx, args) if (args.top_k or args.sweep_k or args.conversion_gap
                                           or args.dynamic_topk is not None) else ctx.evaluate()
    res.update(ctx.header())
    print(json.dumps(res), flush=True)
    return 0


def _parse_floats(text: str, flag: str) -> list:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a comma list of numbers") from None


def _run_sparse_study(ctx: EvalContext, args) -> dict:
    from ..train.flops import SampleShape
    from . import sweep
    from .sparse import sparsify

    cfg = ctx.cfg
    n = args.num_experts or sweep.method_num_experts(cfg)
    d_ff = cfg.model.d_ff
    if d_ff % n:
        raise UserError(f"--num-experts: {n} must divide model.d_ff ({d_ff})")
    flops = sweep.InferenceFlops(cfg, SampleShape.from_batch(ctx.batches[0]), ctx.vocab_size, ctx.model)
    if args.sweep_k:
        ks = [int(k) for k in _parse_floats(args.ks, "--ks")] if args.ks else None
        if ks and not all(1 <= k <= n for k in ks):
            raise UserError(f"--ks: every k must be in [1, {n}], got {args.ks}")
        result = sweep.sweep_k(ctx.model, ctx.method, cfg, ctx.evaluate, flops, ks,
                               _parse_floats(args.drop_ratios, "--drop-ratios"), cfg.ssd.cluster_backend, cfg.train.seed,
                               num_experts=n)
        report_dir = _report_dir(ctx)
        sweep.write_sweep(result, report_dir)
        return {"sweep": result, "report": str(report_dir / "sweep_k.md")}
    if args.conversion_gap:
        return {"conversion_gap": sweep.conversion_gap(ctx.model, ctx.method, cfg, ctx.evaluate, args.top_k,
                                                       cfg.ssd.cluster_backend, cfg.train.seed)}
    k = args.top_k or cfg.ssd.top_k
    if not 1 <= k <= n:
        raise UserError(f"--top-k: {k} is out of range; accepted: 1..{n} (the number of experts)")
    ratio = args.dynamic_topk or 0.0
    if cfg.method in ("smoe", "moe_dropout"):
        sweep._set_k(ctx.model, ctx.method, k, ratio)
        seconds = None
    else:
        t0 = time.perf_counter()
        sparsify(ctx.model, n, k, drop_ratio=ratio, cluster_backend=cfg.ssd.cluster_backend, seed=cfg.train.seed,
                 labels=sweep.monitor_warm_labels(ctx.model, ctx.method, n, cfg))
        seconds = time.perf_counter() - t0
    res = ctx.evaluate()
    res.update({"top_k": k, "num_experts": n, "dynamic_drop_ratio": ratio, "clustering_seconds": seconds,
                "flops_per_token": flops(k * (1 - ratio) / n, n), "dense_flops_per_token": flops(1.0, n)})
    return res


def _report_dir(ctx: EvalContext) -> Path:
    ckpt = ctx.checkpoint
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir / "report"
