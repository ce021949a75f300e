"""Data-parallel wrapping, applied after the model and its training method are built (torchtitan style).

- `ddp`: torch DDP, replicated parameters, gradients all-reduced (averaged) in buckets during backward.
- `fsdp`: FSDP2 `fully_shard` on every transformer block, then on the root (embeddings, head, final
  norm). Parameters become DTensors sharded on dim 0; FSDP2 keeps per-parameter optimizer state, which
  is why SSD prefers it to flat-buffer ZeRO (DESIGN §5).

Both average gradients over ranks, so the loop scales each rank's loss by the data-parallel size (see
train/loop.py: the loss is a sum over the global batch's valid tokens divided by their count).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import UserError
from .distributed import ParallelDims


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: members of any ModuleList whose items own an FFN (encoder and decoder stacks)."""
    from ..ffn import SwitchableFFN

    blocks = []
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList):
            for item in mod:
                if any(isinstance(m, SwitchableFFN) for m in item.modules()):
                    blocks.append(item)
    return blocks


def compile_blocks(model: nn.Module, mode: str | None = None) -> int:
    """torch.compile each transformer block's forward, in place, before data-parallel wrapping.

    Per block (torchtitan's choice) rather than the whole model: blocks of one stack share one
    compiled graph, DDP's gradient hooks fire block by block (overlapping the all-reduce with the
    rest of the backward) and FSDP2's all-gather hooks stay outside the compiled code. The bound
    `forward` is replaced rather than wrapping the module, so parameter names (checkpoint keys) and
    the module objects methods hold do not change. Returns the number of blocks compiled.
    `mode` is torch.compile's (None = its default).
    """
    blocks = transformer_blocks(model)
    for blk in blocks:
        blk.forward = torch.compile(blk.forward, mode=mode)
    return len(blocks)


def wrap_data_parallel(model: nn.Module, dims: ParallelDims, pcfg, device: torch.device,
                       find_unused_parameters: bool = False, stream=None) -> nn.Module:
    """Return the module the loop calls forward on (the model itself for a single process). `stream`:
    construct DDP on this CUDA stream (a step that will be captured in a CUDA graph needs it:
    train/step_graph.py)."""
    if not dims.is_distributed:
        return model
    if pcfg.data_parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        with _on_stream(stream, device):
            return DDP(model, device_ids=ids, process_group=dims.dp_group,
                       find_unused_parameters=find_unused_parameters)
    return _fully_shard(model, dims, device)


@contextlib.contextmanager
def _on_stream(stream, device: torch.device):
    if stream is None:
        yield
        return
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


def _fully_shard(model: nn.Module, dims: ParallelDims, device: torch.device) -> nn.Module:
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # pragma: no cover - torch < 2.6
        raise UserError(f"parallel.data_parallel: 'fsdp' needs FSDP2 (torch >= 2.6): {e}; accepted here: ddp") from None
    blocks = transformer_blocks(model)
    if not blocks:
        raise UserError("parallel.data_parallel: 'fsdp' found no transformer blocks to shard in this model; "
                        "accepted here: ddp")
    try:
        mesh = init_device_mesh(device.type, (dims.dp_size,), mesh_dim_names=("dp",))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        raise UserError(f"parallel.data_parallel: 'fsdp' could not shard this model ({str(e).splitlines()[0]}); "
                        "accepted here: ddp") from None
    return model


def grad_sync(wrapped: nn.Module, enabled: bool):
    """Context for one micro-batch's backward: skip the gradient reduction unless `enabled` (last one)."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync") and callable(wrapped.no_sync):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (FSDP2 shards in place: nothing to strip)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(unwrap(model), "set_requires_gradient_sync")
