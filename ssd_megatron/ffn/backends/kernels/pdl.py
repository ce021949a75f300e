"""Programmatic dependent launch (PDL, Hopper) for the forward's chain of small launches: the router, the routing
plan's count and scatter kernels, and the fused expert forward (SSD_TRITON_PDL=1; off by default).

A kernel launched with PDL may be scheduled once every program of the kernel before it has signalled
(`gdc_launch_dependents`), that is, while that kernel's last programs still run; its programs then wait
(`gdc_wait`) until that kernel has completed and its writes are visible. What is saved is the launch and dispatch
latency at each boundary of the chain (the base inference forward is ≈ 35 µs of small latency-bound launches
before the fused kernel's 164 µs, docs/kernels.md v17).

Each of these kernels calls `_pdl_start` before touching global memory: the wait first, so that nothing is read
before its producer is done, and nothing is written either (a tensor allocated after the previous launch may reuse
memory that launch still reads, which the caching allocator allows because the stream orders it); then the signal,
so that the next launch of the chain can be scheduled. Every program waits, so a kernel never completes before its
producer: waiting is transitive along the chain. Under CUDA graphs the launches become programmatic edges. Built
without a GPU (session 25): untimed, and its GPU tests have not run (docs/kernels.md v19)."""
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


def pdl_enabled() -> bool:
    """SSD_TRITON_PDL: 1 launches the forward's chain with PDL, 0 (the default) without."""
    value = os.environ.get("SSD_TRITON_PDL", "0").strip()
    if value not in ("0", "1"):
        from ....errors import UserError
        raise UserError(f"SSD_TRITON_PDL={value!r}; accepted: 0 (the default) or 1 (programmatic dependent launch "
                        f"of the forward's router, plan and fused kernels, Hopper)")
    return value == "1"


def pdl_args(t: torch.Tensor) -> dict:
    """The launch options of one kernel of the chain on `t`'s device: {PDL: flag} for its constexpr, plus Triton's
    `launch_pdl` option when on (CUDA only: the interpreter has no such launch)."""
    on = pdl_enabled() and t.is_cuda
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """A program's first step under PDL: wait for the previous kernel, then let the next one be scheduled."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
