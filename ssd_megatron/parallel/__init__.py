"""Process groups and parallel wrapping (data parallel today; tensor/expert parallel refused clearly)."""
from .data_parallel import grad_sync, is_fsdp, unwrap, wrap_data_parallel
from .distributed import ParallelDims, destroy_distributed, init_distributed, resolve_device

__all__ = ["ParallelDims", "destroy_distributed", "grad_sync", "init_distributed", "is_fsdp", "resolve_device",
           "unwrap", "wrap_data_parallel"]
