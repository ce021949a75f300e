"""A whole optimizer step as one CUDA graph (`train.cuda_graph`).

What is captured: every micro-batch's forward, loss and backward, the gradient clipping and the AdamW
update, i.e. everything `Trainer._device_step` queues on the GPU, ~1 400 kernels for GPT-base.
Replaying the graph launches them all with one call, so the GPU no longer waits between kernels for
the host (Python, the dispatcher, the autograd engine, inductor's wrappers) to launch the next one
(docs/performance.md, round 4: GPT-base 42.2 -> 41.0 ms dense, 68.3 -> 37.9 ms in a sparse phase; H100, session 36:
46.4 -> 31.2 ms sparse, 43.0 -> 39.6 ms dense in one process, docs/kernels.md v30).
This is the whole-network capture of PyTorch's CUDA-graph notes (and Megatron-LM's full-iteration
CUDA graph), with what a training run needs around it:

- One graph per kind of step (`TrainingMethod.graph_key()`): "dense" for the dense method, the phase
  for SSD; a method that returns None runs that step eagerly. The first `warmup` steps of a kind run
  eagerly on a side stream (torch.compile's compilation, Triton autotuning, cuBLAS workspaces and the
  optimizer's lazily created state happen there, outside the capture); they are real training steps.
- Inputs live in static buffers: each step's micro-batches are copied into them before the replay,
  the loss scale (dp_size / global valid tokens, different every step) is a device scalar, and the
  learning rate is a device tensor per parameter group that `LRSchedule.apply` fills in place (the
  optimizer is capturable; a float lr would be frozen into the graph).
- Gradients are set to None before a capture, so the captured backward writes them (no zeroing pass)
  into memory the graph owns; every replay rewrites them in place. An eager step first sets them to
  None again (they would otherwise accumulate onto the last replay's values).
- The step's outputs (loss sum, extra loss, grad norm, skipped flag) are one static tensor that the
  caller copies to the host behind an event, as for an eager step.
- What a replay cannot see is Python state: everything a step of one kind computes must be decided by
  its key or live in device tensors updated in place (SSD's expert layout is: a switch to sparse
  permutes the parameters and their moments in place into expert-major storage, where the sparse
  graph reads each expert as a view; a sparse phase is always expert-major).

`train.cuda_graph`: false (default), true, auto, or blocks (per-block graphs instead, train/block_graphs.py, which
several DDP processes can use with their all-reduces left eager; `auto` takes it for multi-process DDP SSD runs).
What the whole-step graph cannot serve (`resolve`): FSDP2 (its
per-block all-gathers and reduce-scatters are not wired up for capture), the baselines (they route,
drop layers or add losses per step), and CPU runs. There `true` is an error naming the key and `auto`
runs eagerly with a note, so configs/gpt_base.yaml can say auto and still serve the baseline configs
derived from it.

Several processes with DDP are captured only with `true` (experimental: built on the recipe of
PyTorch's CUDA-graph notes for NCCL >= 2.9.6, not yet run on GPUs here; `auto` keeps them eager). The
recipe: NCCL's asynchronous error handling off before the process group exists
(`prepare_process_group`); DDP constructed on a side stream, which also runs the eager warm-up steps
and the capture (the Trainer's, StepGraph's `stream`: DDP keeps autograd's gradient-accumulation nodes
of the parameters, which belong to the stream it was built on; Megatron-LM's full-iteration graphs share
one stream the same way); at least 11 eager DDP iterations before the first capture (after DDP's bucket
rebuild and its early runtime logging); and a thread-local capture mode, as NCCL's threads keep calling
CUDA meanwhile (`capture_options`). The all-reduces of the last micro-batch's backward are then part of
the graph. This matters for SSD: an eager sparse step is host-bound (docs/kernels.md §4), so without
capture a multi-process sparse phase is slower than dense.

Micro-batch shapes must stay fixed (packed data always has them; a change is an error, not a silent
re-capture). Validation, checkpoints and logging run between replays as before.
"""
from __future__ import annotations

import os
from typing import Callable, Hashable, Optional

import torch

from ..errors import UserError

# Methods whose steps of one kind (TrainingMethod.graph_key) do identical device work: dense, and SSD
# (one graph per phase). The baselines route, drop or add losses per step and run eagerly.
GRAPHABLE_METHODS = ("dense", "ssd")
# Eager steps of a kind before its capture (compilation, autotuning, the optimizer's state).
WARMUP_STEPS = 3
# With DDP: PyTorch's recipe asks for at least 11 eager DDP iterations before a capture.
DDP_WARMUP_STEPS = 11
DDP_NOTE = ("train.cuda_graph: true captures the DDP step, all-reduces included (experimental, not yet "
            "verified on GPUs here; train/step_graph.py)")
BLOCKS_DDP_NOTE = ("per-block CUDA graphs with DDP, the all-reduces eager between them (checked with two ranks sharing "
                   "one GPU, not yet run with NCCL on several; train/block_graphs.py)")


# Logged where an SSD run steps eagerly on a GPU: what that costs its sparse phases.
EAGER_SSD_NOTE = ("SSD's sparse steps run eagerly here, where they are host-bound and save no time: GPT-base on one H100 "
                  "took 43.2-46.4 ms per eager sparse step against 40.2-43.0 ms per eager dense step, and 31.2 ms per "
                  "captured sparse step against 39.6 ms dense (docs/kernels.md v30); with DDP, train.cuda_graph: blocks "
                  "(auto's choice there) replays each transformer block as a CUDA graph (train/block_graphs.py)")


def _unsupported(cfg, world_size: int, whole_step: bool = True) -> Optional[str]:
    if cfg.method not in GRAPHABLE_METHODS:
        return f"method {cfg.method!r} changes its step between steps (only {', '.join(GRAPHABLE_METHODS)} can be captured)"
    if world_size > 1 and cfg.parallel.data_parallel != "ddp":
        return f"{world_size} processes with {cfg.parallel.data_parallel} (only DDP's step can be captured)"
    if whole_step and world_size > 1 and cfg.train.cuda_graph is not True:
        return f"{world_size} processes (capturing the DDP step is opt-in while unverified: train.cuda_graph: true)"
    return None


def resolve(cfg, device: torch.device, world_size: int) -> tuple[Optional[str], Optional[str]]:
    """How train.cuda_graph graphs this run's steps: None (eager), "step" (the whole step, this module) or
    "blocks" (each transformer block, train/block_graphs.py), and a note for the log. `true` or `blocks` on a
    run they cannot serve is a one-line error. `auto` takes the whole step where it can; a multi-process DDP
    SSD run gets per-block graphs (its eager sparse steps would be slower than dense ones, docs/kernels.md v31);
    anything else runs eagerly, with a note. On the CPU only `blocks` does something: compiled blocks with its
    gradient handling, no graphs."""
    mode = cfg.train.cuda_graph
    if mode == "blocks":
        problem = _unsupported(cfg, world_size, whole_step=False)
        if problem:
            raise UserError(f"train.cuda_graph: blocks does not fit this run: {problem}; set train.cuda_graph: false")
        return "blocks", (f"train.cuda_graph: blocks: {BLOCKS_DDP_NOTE}" if world_size > 1 else None)
    if device.type != "cuda":
        return None, None
    eager_ssd = EAGER_SSD_NOTE if cfg.method == "ssd" else None
    if mode is False:
        return None, eager_ssd and f"train.cuda_graph: false: {eager_ssd}"
    problem = _unsupported(cfg, world_size)
    if problem is None:
        return "step", (DDP_NOTE if world_size > 1 else None)
    if mode == "auto":
        if cfg.method == "ssd" and world_size > 1 and _unsupported(cfg, world_size, whole_step=False) is None:
            return "blocks", f"train.cuda_graph: auto with {world_size} DDP processes: {BLOCKS_DDP_NOTE}"
        return None, f"train.cuda_graph: auto runs eager steps here: {problem}" + (f"; {eager_ssd}" if eager_ssd else "")
    raise UserError(f"train.cuda_graph: true does not fit this run: {problem}; set train.cuda_graph: auto or false")


def prepare_process_group(cfg, device: torch.device, world_size: int) -> None:
    """Before init_process_group: a captured DDP step needs NCCL's asynchronous error handling off (its
    watchdog would otherwise query the captured collectives' events). A user's own setting wins."""
    if world_size > 1 and resolve(cfg, device, world_size)[0] == "step":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")


def capture_options(world_size: int) -> dict:
    """StepGraph's warm-up steps and capture mode for a run of `world_size` processes (DDP's recipe above)."""
    if world_size > 1:
        return {"warmup": DDP_WARMUP_STEPS, "capture_error_mode": "thread_local"}
    return {"warmup": WARMUP_STEPS, "capture_error_mode": "global"}


def _signature(micro: list[dict]) -> list[tuple]:
    return [tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in mb.items())) for mb in micro]


class StepGraph:
    """Runs `step_fn(micro_batches_on_device, scale) -> values` as one CUDA graph per step kind.

    Each call names its kind with `key` (the method's `graph_key()`: "dense", or SSD's phase; None = an
    eager step). The first `warmup` steps of a kind run eagerly on a side stream, the next is captured
    and every later step of that kind replays its graph. Graphs of different kinds coexist (each with its
    own memory pool and gradient buffers), so SSD alternates between a dense and a sparse graph without
    re-capturing; a re-clustering needs none either, as it rewrites `expert_perm` in place.

    `step_fn` must queue device work only (no host reads of device values) and leave the gradients in
    place; `zero_grad()` sets them to None (before every eager step, since after a replay they are the
    last graph's buffers, and once before each capture)."""

    def __init__(self, step_fn: Callable[[list[dict], torch.Tensor], torch.Tensor], zero_grad: Callable[[], None],
                 optimizer: torch.optim.Optimizer, device: torch.device, warmup: int = WARMUP_STEPS,
                 capture_error_mode: str = "global", stream: Optional[torch.cuda.Stream] = None):
        if device.type != "cuda":
            raise ValueError("StepGraph needs a CUDA device")
        self.step_fn, self.zero_grad, self.optimizer, self.device = step_fn, zero_grad, optimizer, device
        self.warmup = warmup
        # "thread_local" with DDP: NCCL's own threads keep making CUDA calls while this one captures
        self.capture_error_mode = capture_error_mode
        self.eager_steps: dict = {}  # key -> eager steps taken so far
        self.graphs: dict = {}  # key -> (CUDAGraph, its static output)
        self.static_micro: list[dict] = []
        self.signature = None
        self.scale = torch.zeros((), dtype=torch.float32, device=device)
        # eager warm-up steps run on a side stream; `stream` (DDP's construction stream) also captures
        self.side = stream if stream is not None else torch.cuda.Stream(device)
        self.capture_stream = stream

    def _stage(self, micro: list[dict]) -> None:
        sig = _signature(micro)
        if self.signature is None:
            self.signature = sig
            self.static_micro = [{k: torch.empty_like(v, device=self.device) for k, v in mb.items()} for mb in micro]
        elif sig != self.signature:
            raise UserError(f"train.cuda_graph: the micro-batches changed shape ({sig} after {self.signature}); a "
                            "captured step needs fixed shapes, set train.cuda_graph: false for this data")
        for buf, mb in zip(self.static_micro, micro):
            for k, v in mb.items():
                buf[k].copy_(v, non_blocking=True)

    def _lr_as_tensors(self) -> None:
        for g in self.optimizer.param_groups:
            if not torch.is_tensor(g["lr"]):
                g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=self.device)

    def __call__(self, micro: list[dict], scale: float, key: Optional[Hashable] = "step") -> torch.Tensor:
        self._stage(micro)
        self.scale.fill_(scale)
        if key in self.graphs:
            graph, values = self.graphs[key]
            graph.replay()
            return values
        self.zero_grad()
        if key is None or self.eager_steps.get(key, 0) < self.warmup:
            if key is not None:
                self.eager_steps[key] = self.eager_steps.get(key, 0) + 1
            current = torch.cuda.current_stream(self.device)
            self.side.wait_stream(current)
            with torch.cuda.stream(self.side):
                values = self.step_fn(self.static_micro, self.scale)
                self.zero_grad()
            current.wait_stream(self.side)
            return values
        self._lr_as_tensors()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the eager steps' cached blocks are not usable by the graph's own pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.capture_stream, capture_error_mode=self.capture_error_mode):
            values = self.step_fn(self.static_micro, self.scale)
        self.graphs[key] = (graph, values)
        graph.replay()  # capturing queued nothing: this runs the step
        return values
