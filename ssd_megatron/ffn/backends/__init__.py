"""Expert backends: interchangeable implementations of the sparse (MoE) FFN computation.

See docs/interfaces.md for the calling convention and docs/kernels.md for what each backend costs.
`get_backend(name)` returns an instance. Names:

- `reference`  plain torch, CPU and GPU (ground truth).
- `grouped_mm` torch._grouped_mm over sorted token copies; sync-free on CUDA sm90+ bf16.
- `triton`     our fused gather/scatter grouped-GEMM kernels (CUDA; `TRITON_INTERPRET=1` on CPU for tests).
- `megablocks` MegaBlocks' ops + grouped_gemm (optional extra; bf16 CUDA).
- `auto`       resolved per call from the tensors' device and dtype: triton on CUDA sm80+ (A100, H100)
               when triton imports, else grouped_mm on CUDA sm90+ bf16, else reference.

Importing this package never needs CUDA, triton or megablocks: those are imported on first use.
"""
from __future__ import annotations

import os

import torch

from ...errors import UserError
from .grouped_mm import GroupedMMBackend, grouped_mm_available, grouped_mm_fast
from .reference import ReferenceBackend

BACKEND_NAMES = ("auto", "reference", "grouped_mm", "triton", "megablocks")


_MAJOR: dict = {}  # device index -> compute capability major (a dict: torch.compile warns on lru_cache)


def _major(index: int) -> int:
    if index not in _MAJOR:
        _MAJOR[index] = torch.cuda.get_device_capability(index)[0]
    return _MAJOR[index]


def _sm90(index: int) -> bool:
    return _major(index) >= 9


class AutoBackend:
    """Picks the fastest backend that can run the call's tensors (see module docstring)."""

    name = "auto"

    def __init__(self):
        self._reference = ReferenceBackend()
        self._grouped = GroupedMMBackend()
        self._triton = None

    def resolve(self, x: torch.Tensor):
        if x.is_cuda and _major(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= 8:
            # sm_80 (A100): compiled offline and checked under the interpreter, not timed (docs/kernels.md)
            if x.dtype in (torch.bfloat16, torch.float16, torch.float32):
                if self._triton is None:
                    from .triton_backend import TritonBackend, triton_available
                    self._triton = TritonBackend() if triton_available() else False
                if self._triton:
                    return self._triton
            if x.dtype == torch.bfloat16 and grouped_mm_fast(x.device):
                return self._grouped
        return self._reference

    def folds_router(self, x: torch.Tensor) -> bool:
        """Whether the backend this call resolves to can fold SSD's router gradient (docs/interfaces.md)."""
        return router_fold_offered(self.resolve(x), x)

    def takes_master_weights(self, x: torch.Tensor) -> bool:
        """Whether the backend this call resolves to takes fp32 weights with a bf16/fp16 x (docs/interfaces.md)."""
        return master_weights_offered(self.resolve(x), x)

    def folds_output_bias(self, x: torch.Tensor) -> bool:
        """Whether the backend this call resolves to takes the output bias (docs/interfaces.md)."""
        return output_bias_offered(self.resolve(x), x)

    def __call__(self, x, w1, b1, w2, topk_idx, gate, activation, **kwargs):
        return self.resolve(x)(x, w1, b1, w2, topk_idx, gate, activation, **kwargs)


def _offers(backend, capability: str, x: torch.Tensor) -> bool:
    # `is not None`, not the bound method's truth: torch.compile (torch 2.11) cannot take a method's truth value
    # and broke the compiled block's graph there, three times per sparse layer.
    offers = getattr(backend, capability, None)
    return offers is not None and bool(offers(x))


def router_fold_offered(backend, x: torch.Tensor) -> bool:
    """Whether `backend` takes SSD's router gradient into its kernels for a call on `x` (its optional
    `folds_router`, docs/interfaces.md)."""
    return _offers(backend, "folds_router", x)


def master_weights_offered(backend, x: torch.Tensor) -> bool:
    """Whether `backend` takes fp32 (master) weights with a bf16/fp16 `x`, computing in x's dtype and
    returning the weight gradients in fp32 (its optional `takes_master_weights`, docs/interfaces.md)."""
    return _offers(backend, "takes_master_weights", x)


def output_bias_offered(backend, x: torch.Tensor) -> bool:
    """Whether `backend` takes the FFN's output bias (`out_bias=`) for a call on `x`, returning y with it
    added and its gradient (its optional `folds_output_bias`, docs/interfaces.md)."""
    return _offers(backend, "folds_output_bias", x)


def weights_for(backend, x: torch.Tensor, w1, b1, w2):
    """(w1, b1, w2) as `backend` takes them with tokens `x`: fp32 (master) weights as they are where it
    offers that (`master_weights_offered`), else in x's dtype."""
    if w1.dtype == x.dtype or (w1.dtype == torch.float32 and master_weights_offered(backend, x)):
        return w1, b1, w2
    return w1.to(x.dtype), None if b1 is None else b1.to(x.dtype), w2.to(x.dtype)


def expert_ffn(backend, x, w1, b1, w2, topk_idx, gate, activation, out_bias=None, **kwargs):
    """backend(...) + out_bias: the bias handed to the backend where it offers to fold it
    (`output_bias_offered`), else added to its output here."""
    if out_bias is not None and output_bias_offered(backend, x):
        return backend(x, w1, b1, w2, topk_idx, gate, activation, out_bias=out_bias, **kwargs)
    y = backend(x, w1, b1, w2, topk_idx, gate, activation, **kwargs)
    return y if out_bias is None else y + out_bias.to(y.dtype)


def call_router_folded(backend, x, w1, b1, w2, top_idx, activation, centroids, out_bias=None):
    """`expert_ffn` with SSD's router folded in: the straight-through gate's value (exactly 1) as the gate,
    its gradient added by the backend from `centroids` (detached [N, D])."""
    gate = torch.ones(top_idx.shape, dtype=x.dtype, device=x.device)
    return expert_ffn(backend, x, w1, b1, w2, top_idx, gate, activation, out_bias, router_centroids=centroids)


TUNING_PREFIXES = ("SSD_TRITON_", "SSD_PLAN_", "SSD_WGRAD_")  # the tile configs and orders, the routing plan's
# placements (kernels/routing_plan.py), the WS weight gradient's epilogue


def tuning_env() -> dict:
    """The environment variables that change the triton backend's kernels (recorded with benchmark results)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(TUNING_PREFIXES)}


def available_backends(device=None) -> list:
    """Names of the concrete backends that can run on `device` (default: CUDA if present, else CPU)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = ["reference"]
    if grouped_mm_available():
        names.append("grouped_mm")
    if device.type == "cuda":
        from .triton_backend import triton_available
        if triton_available():
            names.append("triton")
        from .megablocks_backend import megablocks_available
        if megablocks_available():
            names.append("megablocks")
    return names


def get_backend(name: str = "auto", device=None):
    if name not in BACKEND_NAMES:
        raise UserError(f"ssd.backend: unknown backend {name!r}; accepted: {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        return AutoBackend()
    if name == "reference":
        return ReferenceBackend()
    if name == "grouped_mm":
        if not grouped_mm_available():
            raise UserError("ssd.backend: grouped_mm needs torch>=2.8 (torch._grouped_mm); use 'reference'")
        return GroupedMMBackend()
    if name == "triton":
        from .triton_backend import TritonBackend, triton_available
        if not triton_available():
            raise UserError("ssd.backend: triton needs the `triton` package (CUDA GPU); pip install triton")
        return TritonBackend()
    from .megablocks_backend import MegaBlocksBackend
    return MegaBlocksBackend()


__all__ = ["BACKEND_NAMES", "AutoBackend", "ReferenceBackend", "GroupedMMBackend", "available_backends",
           "call_router_folded", "expert_ffn", "get_backend", "master_weights_offered", "output_bias_offered",
           "router_fold_offered", "tuning_env", "weights_for"]
