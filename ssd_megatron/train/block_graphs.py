"""CUDA graphs per transformer block (`train.cuda_graph: blocks`, and `auto` for multi-process DDP SSD runs; which
runs it serves is decided in train/step_graph.py's `resolve`).

Each block's forward and backward are compiled (torch.compile mode "reduce-overhead") and replayed as CUDA
graphs by torch's cudagraph trees, while everything between the blocks stays eager: the embeddings, the fused
LM-head loss, DDP's gradient hooks and all-reduces, the clipping and the AdamW update. That is what a run the
whole-step graph (`train.cuda_graph: true`, train/step_graph.py) does not serve can still capture: several
processes with DDP, whose collectives then stay outside any graph. It matters for SSD because an eager sparse
step is host-bound: GPT-base SSD in this loop on one H100 ran its eager sparse steps at 0.87× a dense step's speed
(39.0 against 33.8 ms) and at 1.35× with per-block graphs (25.1 ms, within 1% of the whole-step graph;
docs/kernels.md v31).

A block's backward graph writes its weight gradients into the graphs' memory pool, which later replays
reuse. The autograd engine hands such a gradient to a parameter whose `.grad` is None without copying it.
With one micro-batch per step that is what eager runs do too: the optimizer reads the gradients before the
next step's replays, and they are set to None after it. With several, the gradient summed so far would be
overwritten by the next micro-batch's replay, so torch's recipe (its cudagraph-trees error message for this
case) is followed:

- every trainable parameter gets a zeroed `.grad` outside any graph before the step, and gradients are
  zeroed in place between steps, never set to None, so each replay's gradient is added into memory the
  graphs do not own (an in-place add per micro-batch, the price of accumulation);
- a kept gradient is a zero gradient where the step gave none, which AdamW would still decay (weight decay,
  moments), so the first step of each kind (`TrainingMethod.graph_key`: dense, SSD's phases) checks that
  every trainable parameter received one and names those that did not.

`torch.compiler.cudagraph_mark_step_begin()` opens every step, so the previous step's graph outputs may be
reused. SSD's phase switch recompiles the blocks (its mode is part of their guards): one set of graphs per phase.
The switch permutes parameters, gradients and moments in place (ffn/expert_layout.py), so the graphs'
parameter addresses stay valid. The monitor measures sparsity in an eager forward (ssd/monitor.py).
On the CPU there are no CUDA graphs: the blocks are compiled and the gradient handling is the same, which
is what CI checks.
"""
from __future__ import annotations

from typing import Hashable, Optional

import torch
from torch import nn

from ..errors import UserError

COMPILE_MODE = "reduce-overhead"


class BlockGraphs:
    """What a run with per-block CUDA graphs does around each optimizer step. `accum`: micro-batches per step;
    with one, gradients are set to None between steps as in eager runs (the step's one backward hands each
    parameter its gradient, read by the optimizer before any later replay), with more they are kept."""

    def __init__(self, model: nn.Module, accum: int):
        self.keep_grads = accum > 1
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.checked: set = set()
        self._key: Optional[Hashable] = None
        self._hits: Optional[set] = None
        self._handles: list = []

    def begin_step(self, key: Optional[Hashable]) -> None:
        """Before a step's first forward: a new generation of graph outputs; with kept gradients, zeroed
        `.grad` for every trainable parameter allocated outside any graph, and on the first step of a kind a
        record of which parameters receive a gradient."""
        torch.compiler.cudagraph_mark_step_begin()
        if not self.keep_grads:
            return
        with torch.no_grad():
            for _, p in self.named:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self._key = key
        if key not in self.checked:
            self._hits = set()
            self._handles = [p.register_post_accumulate_grad_hook(lambda _p, i=i: self._hits.add(i))
                             for i, (_, p) in enumerate(self.named)]

    def end_backward(self) -> None:
        """After the step's last backward, before the optimizer: the first step of a kind names parameters that
        got no gradient (with kept gradients AdamW would decay them on zeros)."""
        if self._hits is None:
            return
        for h in self._handles:
            h.remove()
        missed = [n for i, (n, _) in enumerate(self.named) if i not in self._hits]
        self._hits, self._handles = None, []
        self.checked.add(self._key)
        if missed:
            shown = ", ".join(missed[:4]) + (f" and {len(missed) - 4} more" if len(missed) > 4 else "")
            raise UserError(f"train.cuda_graph: blocks with several micro-batches keeps every gradient allocated, "
                            f"but a {self._key!r} step gave none to {shown} (AdamW would decay them on zeros); "
                            "use one micro-batch per step (train.micro_batch_size) or train.cuda_graph: false")

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=not self.keep_grads)
