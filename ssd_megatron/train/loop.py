"""The training loop: `train(cfg) -> summary dict`.

Order of construction (each step documented where it matters):
  device / precision -> process groups -> seeds -> data (tokenizer, padded vocabulary) -> model ->
  method (on the unwrapped model) -> torch.compile per block (train.compile; train.cuda_graph: blocks adds
  CUDA graphs per block, train/block_graphs.py) -> data-parallel
  wrapping (DDP or FSDP2) -> AdamW + LR schedule -> resume (model, optimizer, RNG, data position,
  method state; metrics.jsonl cut back to the checkpoint) -> steps -> final checkpoint -> report.

Run directory (`runs/<name>/` or train.output_dir): config.yaml, metrics.jsonl, checkpoints/step_XXXXXXX/,
tensorboard/, report/. A SIGTERM/SIGINT (scheduler preemption) finishes the current step, writes a
checkpoint and returns; running the same command again resumes (checkpoint.resume: auto).

One optimizer step (step = 0-based index, the number every method hook receives):
  1. method.before_step(step); phase = method.phase()
  2. this rank's micro-batches of the global batch (global batch = micro x accumulation x DP size;
     which samples is fixed by the data position alone, so any DP size sees the same global batches)
  3. one all_gather of [valid target tokens, phase code, stop flag] over ranks, on the CPU (gloo) host
     group even under NCCL, so it never waits for the GPU: the global token count (the loss
     denominator) and the check that all ranks run the same phase
  4. per micro-batch: loss_sum / global_tokens x dp_size (DDP/FSDP average gradients over ranks,
     so this makes the summed gradient that of the mean over every valid token of the global batch)
     + method.extra_loss() / accumulation steps; backward; gradient reduction on the last only
  5. clip + optimizer step (train/clipping.py; no host sync with fused AdamW), method.after_step(step);
     metrics; validation; checkpoint. On CUDA the step's loss, norm and skip flag are read one step
     later (pinned copy + event), so the host never waits for the GPU between steps; records are
     flushed before every validation, checkpoint and exit, so metrics.jsonl keeps step order.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..config import dump_config, save_config
from ..errors import UserError
from ..parallel.data_parallel import compile_blocks, grad_sync, unwrap, wrap_data_parallel
from ..parallel.distributed import (ParallelDims, all_gather_rows, all_reduce_sum, barrier, destroy_distributed,
                                    init_distributed, resolve_device)
from . import block_graphs
from .checkpoint import CheckpointManager, resolve_resume
from .clipping import clip_and_step
from .data import build_train_data, to_device
from .flops import SampleShape, method_sample_flops, peak_flops
from .graph_breaks import GraphBreakWatch
from .host_gc import HostGC
from .loss import lm_loss
from .lr_schedule import LRSchedule
from .method import build_method
from .metrics import MetricsLogger, safe_ppl, truncate_metrics
from .optimizer import build_optimizer
from .step_graph import StepGraph, capture_options, prepare_process_group
from .step_graph import resolve as resolve_cuda_graph


MAX_CONSECUTIVE_SKIPS = 5
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA (auto) or when asked for; fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def phase_code(phase: str) -> int:
    return zlib.crc32(phase.encode()) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def forward_loss(model, batch: dict, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, n_valid) of one micro-batch, as `lm_loss(model(**inputs), labels)`.

    Models that offer it (`fused_loss`) get the labels and return the loss themselves, with the LM head
    and cross-entropy fused in chunks (no [tokens, vocab] logits, none in fp32): ~10 ms of a 58 ms
    GPT-base step on an H100 (docs/performance.md). `ssd-bench step` times the step through this too.
    """
    inputs = model_inputs(batch)
    if fused and getattr(unwrap(model), "fused_loss", False):
        return model(**inputs, loss_labels=batch["labels"])
    return lm_loss(model(**inputs), batch["labels"])


def train(cfg) -> dict:
    device = resolve_device(cfg.train.device)
    prepare_process_group(cfg, device, int(os.environ.get("WORLD_SIZE", "1")))
    dims = init_distributed(cfg.parallel, device)
    try:
        return Trainer(cfg, device, dims).run()
    finally:
        destroy_distributed(dims)


@dataclass
class _PendingStep:
    """A step whose launch is done; its loss, norm and skip flag may still be on the device."""
    rec: dict
    device_values: torch.Tensor  # [loss sum, extra-loss sum, grad norm, skipped]
    in_tokens: int
    t0: float
    global_tokens: int
    has_extra: bool
    start: Optional[torch.cuda.Event] = None
    end: Optional[torch.cuda.Event] = None
    host: Optional[torch.Tensor] = None


class Trainer:
    def __init__(self, cfg, device: torch.device, dims: ParallelDims):
        self.cfg, self.device, self.dims = cfg, device, dims
        t = cfg.train
        per_rank = t.global_batch_size // max(1, dims.dp_size)
        if t.global_batch_size % (t.micro_batch_size * dims.dp_size):
            raise UserError(
                f"train.global_batch_size: {t.global_batch_size} must be a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}) x data-parallel size ({dims.dp_size})")
        self.accum = per_rank // t.micro_batch_size
        graphs, self.graph_note = resolve_cuda_graph(cfg, device, dims.world_size)
        self.graphed, self.blocks = graphs == "step", graphs == "blocks"
        self.run_dir = cfg.output_dir
        self.autocast = autocast_context(device, t.precision)
        if dims.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        barrier(dims)

    # ------------------------------------------------------------------ setup

    def _build(self) -> None:
        cfg, dims, device = self.cfg, self.dims, self.device
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside bf16 autocast
        seed_everything(cfg.train.seed)
        self.data = build_train_data(cfg, dims)
        from ..models import build_model

        self.model = build_model(cfg.model, self.data.vocab_size).to(device)
        # The method must see the plain model (it swaps classes, holds FFN lists, registers hooks).
        self.method = build_method(cfg, self.model, group=dims.dp_group)
        if self.blocks:
            compile_blocks(self.model, mode=block_graphs.COMPILE_MODE)
        elif cfg.train.compile:
            compile_blocks(self.model)
        self.block_graphs = block_graphs.BlockGraphs(self.model, self.accum) if self.blocks else None
        # a captured DDP step: DDP is built on the stream that later warms up and captures (step_graph.py)
        ddp_stream = torch.cuda.Stream(device) if self.graphed and dims.is_distributed else None
        self.wrapped = wrap_data_parallel(
            self.model, dims, cfg.parallel, device,
            find_unused_parameters=bool(getattr(self.method, "needs_find_unused_parameters", False)),
            stream=ddp_stream)
        self.optimizer = build_optimizer(self.model, cfg.optim, device, capturable=self.graphed)
        self.method.attach_optimizer(self.optimizer)
        self.step_graph = StepGraph(lambda micro, scale: self._device_step(micro, scale)[0],
                                    lambda: self.optimizer.zero_grad(set_to_none=True), self.optimizer,
                                    device, stream=ddp_stream, **capture_options(dims.world_size)
                                    ) if self.graphed else None
        self.schedule = LRSchedule.from_config(cfg)
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint, dims)
        # Per-rank streams for dropout etc. after the (identical) initialisation.
        torch.manual_seed(cfg.train.seed + 1 + 1000 * dims.dp_rank)
        self.valid_batches = self.data.valid_batches(cfg.train.eval_batches, cfg.train.micro_batch_size, dims)
        ref = getattr(self.method, "set_reference_batch", None)
        if callable(ref):
            first = self.data.valid_batches(1, cfg.train.micro_batch_size, None)[0]
            ref(to_device(model_inputs(first), device))

    def _resume(self) -> None:
        cfg, dims = self.cfg, self.dims
        self.step = 0
        self.consumed = 0
        self.tokens = 0
        self.flops_total = 0.0
        self.elapsed_before = 0.0
        self.resume_note = None
        ckpt = resolve_resume(cfg.checkpoint.resume, self.ckpt.root)
        if ckpt is not None:
            state = self.ckpt.load(ckpt, self.model, self.optimizer, cfg.model.arch)
            try:
                self.method.load_state_dict(state.get("method", {}))
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"checkpoint file {ckpt / 'trainer.pt'}: method state does not fit method "
                                f"{cfg.method!r} ({type(e).__name__}: {e})") from None
            self.step = int(state["step"])
            self.consumed = int(state["consumed_samples"])
            self.tokens = int(state.get("tokens", 0))
            self.flops_total = float(state.get("flops_total", 0.0))
            self.elapsed_before = float(state.get("elapsed", 0.0))
            saved_threads = state.get("num_threads")
            if self.device.type == "cpu" and saved_threads and saved_threads != torch.get_num_threads():
                self.resume_note = (f"note: the checkpoint was written with {saved_threads} CPU threads, this run uses "
                                    f"{torch.get_num_threads()}; CPU results then match the uninterrupted run only "
                                    "to float tolerance, not bit for bit")
        if dims.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        self.resumed_from = ckpt
        self.train_iter = self.data.train_iterator(cfg.train.global_batch_size, cfg.train.micro_batch_size, dims,
                                                   start_sample=self.consumed)

    # ------------------------------------------------------------------ one step

    def _micro_loss(self, batch: dict, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            loss_sum, n_valid = forward_loss(self.wrapped, batch)
            loss = loss_sum * scale
            extra = self.method.extra_loss()
            if extra is not None:
                loss = loss + extra.float() / self.accum
        loss.backward()
        return loss_sum.detach(), (extra.detach().float() if extra is not None else None)

    def _device_step(self, micro: list[dict], scale) -> tuple[torch.Tensor, bool]:
        """The step's device work: forward/backward of every micro-batch, clip, optimizer step. Returns
        ([loss sum, extra-loss sum, grad norm, skipped], whether the method adds a loss); reads nothing
        back, so train.cuda_graph can capture it (`scale` is then a device scalar). Under per-block graphs
        the step is opened and its gradients checked around the micro-batches (train/block_graphs.py)."""
        if self.block_graphs is not None:
            self.block_graphs.begin_step(self.method.graph_key())
        loss_acc = torch.zeros((), dtype=torch.float32, device=self.device)
        extra_acc = None
        for i, mb in enumerate(micro):
            mb = to_device(mb, self.device)
            with grad_sync(self.wrapped, i == len(micro) - 1):
                ls, extra = self._micro_loss(mb, scale)
            loss_acc += ls
            if extra is not None:
                extra_acc = extra if extra_acc is None else extra_acc + extra
        if self.block_graphs is not None:
            self.block_graphs.end_backward()
        # An inf/nan gradient would poison every weight: such an update is dropped (clipping.py).
        outcome = clip_and_step(self.model.parameters(), self.optimizer, self.cfg.train.grad_clip)
        values = torch.stack([loss_acc, extra_acc if extra_acc is not None else torch.zeros_like(loss_acc),
                              outcome.grad_norm.float(), torch.as_tensor(outcome.skipped, device=self.device).float()])
        return values, extra_acc is not None

    def train_step(self, step: int) -> list[dict]:
        """Run one optimizer step; returns the records that became final (on CUDA: the previous step's)."""
        cfg, dims = self.cfg, self.dims
        t0 = time.perf_counter()
        start = None
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        self.method.before_step(step)
        phase = self.method.phase()
        lr = self.schedule.apply(self.optimizer, step)
        micro = next(self.train_iter)
        local_tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro)
        # One collective for three agreements: the loss denominator, the phase, and whether any rank
        # was asked to stop (SIGTERM from a scheduler reaches ranks at different times).
        gathered = all_gather_rows(torch.tensor([local_tokens, phase_code(phase), int(self.stop_signal is not None)],
                                                dtype=torch.int64), dims, host=True)
        self.stop_agreed = bool(gathered[:, 2].any())
        codes = gathered[:, 1].tolist()
        if len(set(codes)) != 1:
            raise RuntimeError(f"step {step}: ranks disagree on the phase (this rank: {phase!r}; codes by rank: "
                               f"{codes}); a method must take its phase decisions identically on every rank")
        global_tokens = int(gathered[:, 0].sum())
        if global_tokens == 0:
            raise UserError(f"step {step}: the global batch has no target tokens (labels all -100); check the data")
        self.wrapped.train()
        scale = dims.dp_size / global_tokens
        if self.step_graph is not None:
            device_values, has_extra = self.step_graph(micro, scale, self.method.graph_key()), False
        else:
            device_values, has_extra = self._device_step(micro, scale)
            if self.block_graphs is not None:
                self.block_graphs.zero_grad(self.optimizer)  # in place where its gradients are kept
            else:
                self.optimizer.zero_grad(set_to_none=True)
        self.consumed = self.train_iter.consumed_samples
        method_metrics = self.method.after_step(step) or {}
        if dims.dp_group is not None:  # gloo: a CPU round trip
            sums = all_reduce_sum(device_values[:2].to(dims.comm_device), dims).to(self.device)
            device_values = torch.cat([sums, device_values[2:]])
        shape = SampleShape.from_batch(micro[0])
        in_tokens = cfg.train.global_batch_size * shape.seq_len
        flops = cfg.train.global_batch_size * method_sample_flops(
            cfg.model, shape, self.data.vocab_size, self.model, self.method).training
        self.tokens += in_tokens
        self.flops_total += flops
        rec = {"kind": "train", "step": step, "lr": lr, "phase": phase, "tokens": self.tokens,
               "target_tokens": global_tokens, "flops": flops, "flops_total": self.flops_total,
               "consumed_samples": self.consumed, **method_metrics}
        pending = _PendingStep(rec, device_values, in_tokens, t0, global_tokens, has_extra, start)
        if self.device.type != "cuda":
            return [self._finalize(pending)]
        # CUDA: nothing waits for the GPU here. The values go to pinned host memory behind an event and
        # are read one step later, when the next step's work is queued, so the GPU never idles while
        # the host logs, loads the next batch and launches the next step (the step time is then the
        # distance between the two steps' end events on the GPU's clock).
        pending.host = device_values.to("cpu", non_blocking=True)
        pending.end = torch.cuda.Event(enable_timing=True)
        pending.end.record()
        previous, self.pending = self.pending, pending
        return [self._finalize(previous)] if previous is not None else []

    def _log_train(self, records: list[dict], logger) -> Optional[dict]:
        """Log final train records (every log_interval-th and the last step); returns the last one."""
        cfg = self.cfg
        for rec in records:
            if not math.isfinite(rec["loss"]):
                logger.print(f"warning: non-finite loss at step {rec['step']}")
            if (rec["step"] + 1) % cfg.train.log_interval == 0 or rec["step"] + 1 == cfg.train.max_steps:
                logger.train_step(rec)
        return records[-1] if records else None

    def flush(self) -> list[dict]:
        """The record of a step whose metrics are still on the GPU (before validation, checkpoints, exit)."""
        previous, self.pending = self.pending, None
        return [self._finalize(previous)] if previous is not None else []

    def _finalize(self, p: "_PendingStep") -> dict:
        dims = self.dims
        if p.end is not None:
            p.end.synchronize()
            start = self.last_step_end if self.last_step_end is not None else p.start
            dt = start.elapsed_time(p.end) / 1e3
            self.last_step_end = p.end if self.pending is not None else None  # flushed: the GPU may idle next
            values = p.host
        else:
            values = p.device_values
            dt = time.perf_counter() - p.t0
        loss_sum, extra_sum, grad_norm, skipped = (float(v) for v in values)
        step = p.rec["step"]
        self.bad_steps = 0 if not skipped else self.bad_steps + 1
        if self.bad_steps >= MAX_CONSECUTIVE_SKIPS:
            raise RuntimeError(f"step {step}: non-finite gradient norm {MAX_CONSECUTIVE_SKIPS} steps in a row; "
                               "lower optim.lr or check the data")
        loss = loss_sum / p.global_tokens
        rec = dict(p.rec)
        rec.update(loss=loss, ppl=safe_ppl(loss), grad_norm=grad_norm, tokens_per_s=p.in_tokens / dt, step_time=dt)
        if skipped:
            rec["skipped"] = True
        if p.has_extra:
            rec["extra_loss"] = extra_sum / (self.accum * dims.dp_size)
        if self.peak is not None:
            rec["mfu"] = rec["flops"] / dt / (self.peak * dims.world_size)
        rec["elapsed"] = self.elapsed_before + (time.perf_counter() - self.t_start)
        return rec

    # ------------------------------------------------------------------ validation

    def validate(self, step: int) -> dict:
        from ..infer.evaluate import evaluate

        self.method.eval_mode()
        try:
            res = evaluate(unwrap(self.wrapped), self.valid_batches, self.dims, self.device, self.autocast,
                           mlm_accuracy=self.cfg.model.arch == "bert")
        finally:
            self.method.train_mode()
        rec = {"kind": "valid", "step": step, "valid_loss": res["loss"], "valid_ppl": res["ppl"],
               "valid_tokens": res["tokens"]}
        if "accuracy" in res:
            rec["valid_acc"] = res["accuracy"]
        return rec

    # ------------------------------------------------------------------ checkpoint

    def save(self, done_steps: int) -> None:
        state = {"consumed_samples": self.consumed, "tokens": self.tokens, "flops_total": self.flops_total,
                 "elapsed": self.elapsed_before + (time.perf_counter() - self.t_start),
                 "lr_schedule": self.schedule.state_dict(), "method": self.method.state_dict(),
                 "method_name": self.cfg.method, "config": self.cfg.to_dict(),
                 "vocab_size": self.data.vocab_size, "num_threads": torch.get_num_threads()}
        self.ckpt.save(done_steps, self.wrapped, self.optimizer, state, dump_config(self.cfg))

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> dict:
        """SIGTERM/SIGINT/SIGUSR1 (scheduler preemption, Ctrl-C): finish the step, checkpoint, exit cleanly."""
        import signal
        import threading

        self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self.stop_signal = signal.Signals(signum).name

        previous = {}
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        import signal

        for sig, h in previous.items():
            signal.signal(sig, h)

    # ------------------------------------------------------------------ run

    def run(self) -> dict:
        cfg, dims = self.cfg, self.dims
        if dims.is_main:
            print(f"# resolved config ({self.run_dir / 'config.yaml'})\n{dump_config(cfg)}", flush=True)
        self._build()
        self._resume()
        self.peak = peak_flops(self.device)
        self.bad_steps = 0
        self.pending, self.last_step_end = None, None
        self.stop_signal = None
        self.stop_agreed = False
        self.t_start = time.perf_counter()
        logger = MetricsLogger(self.run_dir, cfg, enabled=dims.is_main, start_step=self.step,
                               config_dict=cfg.to_dict())
        n_params = sum(p.numel() for p in self.model.parameters())
        logger.print(f"model {cfg.model.arch}: {n_params / 1e6:.2f}M parameters, vocab {self.data.vocab_size}; "
                     f"method {cfg.method}; {dims.world_size} rank(s) on {self.device.type}; "
                     f"global batch {cfg.train.global_batch_size} = {cfg.train.micro_batch_size} x {self.accum} "
                     f"x {dims.dp_size}"
                     + (f"; resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else ""))
        for note in (self.resume_note, self.graph_note):
            if note:
                logger.print(note)
        last_train, last_valid = None, None
        stopped_at = None
        previous_handlers = self._install_signal_handlers()
        host_gc = HostGC(cfg.train.gc_interval)
        breaks = GraphBreakWatch() if cfg.train.compile or self.blocks else None
        host_gc.start()
        try:
            for step in range(self.step, cfg.train.max_steps):
                last_train = self._log_train(self.train_step(step), logger) or last_train
                host_gc.step(step)
                for line in (breaks.new() if breaks else ()):
                    logger.print(f"note: torch.compile broke a compiled block's graph by step {step}: {line}; each "
                                 "break costs host time in every eager step (train/graph_breaks.py)")
                done = step + 1
                if (done % cfg.train.eval_interval == 0 or done % cfg.checkpoint.interval == 0
                        or done == cfg.train.max_steps or self.stop_agreed):
                    last_train = self._log_train(self.flush(), logger) or last_train  # the step's own record
                if done % cfg.train.eval_interval == 0 or done == cfg.train.max_steps:
                    last_valid = self.validate(done)
                    logger.write(last_valid)
                    logger.print(f"validation at step {done}: loss {last_valid['valid_loss']:.4f}, "
                                 f"ppl {last_valid['valid_ppl']:.2f}"
                                 + (f", acc {last_valid['valid_acc']:.3f}" if "valid_acc" in last_valid else ""))
                if done % cfg.checkpoint.interval == 0 or done == cfg.train.max_steps or self.stop_agreed:
                    self.save(done)
                if self.stop_agreed and done < cfg.train.max_steps:
                    stopped_at = done
                    logger.print(f"stopping at step {done} on signal {self.stop_signal or 'from another rank'}; "
                                 f"checkpoint saved, resume with the same command")
                    break
        finally:
            host_gc.stop()
            self._restore_signal_handlers(previous_handlers)
            logger.close()
        wall = self.elapsed_before + (time.perf_counter() - self.t_start)
        summary = {"run_dir": str(self.run_dir), "steps": cfg.train.max_steps, "method": cfg.method,
                   "arch": cfg.model.arch, "tokens": self.tokens, "flops": self.flops_total, "wall_time": wall,
                   "world_size": dims.world_size}
        if stopped_at is not None:
            summary["stopped_at"] = stopped_at
        if last_train is not None:
            summary["loss"] = last_train["loss"]
        if last_valid is None and dims.is_main and self.resumed_from is not None:
            last_valid = None  # the previous run's validation stays in metrics.jsonl
        if last_valid is not None:
            summary["valid_loss"] = last_valid["valid_loss"]
            summary["valid_ppl"] = last_valid["valid_ppl"]
        if dims.is_main and cfg.logging.report:
            try:
                from .report import build_report

                summary["report"] = str(build_report(self.run_dir, wall_time=wall))
            except UserError:
                raise
            except Exception as e:  # a plotting failure must not lose a finished run
                print(f"warning: report failed: {type(e).__name__}: {e}", file=sys.stderr)
        barrier(dims)
        return summary
