"""Process-group setup from the torchrun environment, and the small object that carries it around.

`init_distributed(cfg.parallel, device)` reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun, SLURM via
srun + torchrun, or nothing for a single process), initialises c10d (gloo on CPU, nccl on CUDA unless
`parallel.backend` says otherwise) and returns a `ParallelDims`. Code that needs a group receives this
object (or `dims.dp_group`) as an argument; nothing below reads global state, so a layer never asks
"which rank am I" behind the caller's back (torchtitan / Megatron-core style).

Only data parallelism exists today. Tensor- and expert-model parallel sizes > 1 are accepted by the
config (Megatron vocabulary) but refused here with a clear error rather than silently ignored.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass
class ParallelDims:
    """World layout. `dp_group` is None for a single process (collectives then become no-ops)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_size: int = 1
    ep_size: int = 1
    backend: str = ""
    dp_group: Optional[object] = None
    # CPU (gloo) group over the same ranks, for small host-side agreements (token counts, phase,
    # stop flags) that must not wait for the GPU stream: with NCCL a collective on a CUDA tensor read
    # back on the host would sync every step. For gloo it is dp_group itself.
    host_group: Optional[object] = None
    owns_process_group: bool = False
    # Where collective buffers must live (nccl: the local GPU; gloo: CPU).
    comm_device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_device(requested: str) -> torch.device:
    """`train.device`: auto = CUDA when available, else CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device: 'cuda' requested but no CUDA device is available; accepted here: auto, cpu")
        return torch.device("cuda", _env_int("LOCAL_RANK", 0) % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def check_supported(pcfg) -> None:
    if pcfg.tensor_model_parallel_size > 1:
        raise UserError(f"parallel.tensor_model_parallel_size: {pcfg.tensor_model_parallel_size} is not supported "
                        "yet; accepted: 1 (data parallel only)")
    if pcfg.expert_model_parallel_size > 1:
        raise UserError(f"parallel.expert_model_parallel_size: {pcfg.expert_model_parallel_size} is not supported "
                        "yet; accepted: 1 (data parallel only)")
    if pcfg.sequence_parallel:
        raise UserError("parallel.sequence_parallel: true needs tensor parallelism, which is not supported yet; "
                        "accepted: false")


def init_distributed(pcfg, device: torch.device, timeout_s: float = 1800.0) -> ParallelDims:
    """Initialise (or adopt an already initialised) default process group; single process otherwise."""
    check_supported(pcfg)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        be = str(dist.get_backend())
        group = dist.group.WORLD if world > 1 else None
        return ParallelDims(world_size=world, rank=rank, local_rank=local_rank, dp_size=world, dp_rank=rank,
                            backend=be, dp_group=group, host_group=_host_group(be, group),
                            comm_device=device if be == "nccl" else torch.device("cpu"))
    if world <= 1:
        return ParallelDims()
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = pcfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("parallel.backend: 'nccl' needs CUDA devices; accepted on CPU: gloo, auto")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return ParallelDims(world_size=world, rank=rank, local_rank=local_rank, dp_size=world, dp_rank=rank,
                        backend=backend, dp_group=dist.group.WORLD, host_group=_host_group(backend, dist.group.WORLD),
                        owns_process_group=True, comm_device=device if backend == "nccl" else torch.device("cpu"))


def _host_group(backend: str, group):
    """The CPU group for host-side agreements (every rank must call this: new_group is collective)."""
    if group is None:
        return None
    return group if backend == "gloo" else dist.new_group(backend="gloo")


def destroy_distributed(dims: ParallelDims) -> None:
    if dims.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- small collectives


def barrier(dims: ParallelDims) -> None:
    if dims.dp_group is not None:
        dist.barrier(group=dims.dp_group)


def all_reduce_sum(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    if dims.dp_group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=dims.dp_group)
    return t


def all_gather_rows(t: torch.Tensor, dims: ParallelDims, host: bool = False) -> torch.Tensor:
    """[k] on each rank -> [world, k] on every rank (rank order). host=True: a CPU tensor over the host
    (gloo) group, which never waits for the GPU."""
    if dims.dp_group is None:
        return t.unsqueeze(0)
    group = dims.host_group if host and dims.host_group is not None else dims.dp_group
    out = [torch.empty_like(t) for _ in range(dims.dp_size)]
    dist.all_gather(out, t, group=group)
    return torch.stack(out)


def broadcast_object(obj, dims: ParallelDims, src: int = 0):
    if dims.dp_group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=dims.dp_group)
    return box[0]
