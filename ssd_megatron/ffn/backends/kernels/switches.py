"""The 0/1 environment switches of the `triton` backend's kernels (each part of the launch keys of the kernels it
specialises), and `check_switches`, which parses every one that is set where the backend is built."""
from __future__ import annotations

import os

import torch

from .tile_configs import env_configs
from .tile_order import tile_groups


def reduces_allowed() -> bool:
    """Whether the WS wgrad's balanced items may add by TMA reduces (SSD_WGRAD_TMA_OUT=0: fp32 atomics instead, for
    A/Bs and tests); part of its launch key, as it picks the kernel's specialisation."""
    return os.environ.get("SSD_WGRAD_TMA_OUT", "1") != "0"


def _switch(name: str, default: str, on: str, off: str) -> bool:
    """A 0/1 kernel switch's value (`default` when unset); any other value is a one-line UserError naming the variable
    and what 1 (`on`) and 0 (`off`) mean."""
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        from ....errors import UserError
        mark = {v: ", the default" if v == default else "" for v in ("0", "1")}
        raise UserError(f"{name}={value!r}: accepted: 1 ({on}{mark['1']}), 0 ({off}{mark['0']})")
    return value == "1"


def half_sums() -> bool:
    """SSD_WGRAD_HALF_SUMS=1 (the default): the WS wgrad's TMA reduces add into a bf16/fp16 dW itself
    (kernels/wgrad_gluon.py's half sums; H100, base ReLU layer fwd+bwd with the WS wgrad in both arms, three
    rounds: 0.7096 / 0.7189 / 0.7182 -> 0.6784 / 0.6790 / 0.6789 ms, docs/kernels.md v26); 0: into an fp32
    buffer, cast after. Part of its launch keys."""
    return _switch("SSD_WGRAD_HALF_SUMS", "1", "in dW's bf16/fp16", "fp32 sums")


def router_sums() -> bool:
    """SSD_WGRAD_ROUTER_SUMS=1 (the default): a "pairs" router term is summed in the Gluon dW1 kernel where it serves
    (`wgrad_launch.wgrad`'s fold; kernels/wgrad_gluon.py's FOLD 3); 0: torch's GEMM, added per expert, as elsewhere."""
    return _switch("SSD_WGRAD_ROUTER_SUMS", "1", "in the Gluon kernel", "torch's GEMM")


def up_bwd_tma_stores() -> bool:
    """SSD_TRITON_UP_BWD_TMA_STORES=1 (the default): the WS up_bwd stores dh and gate * a by TMA from h's
    shared-memory slots (kernels/up_bwd_gluon.py `_put`; H100, docs/kernels.md v28, base ReLU up_backward alone
    123.8 / 123.4 us against 143.9 / 142.6 with 0); 0: 4-byte stores from the accumulator's layout. Part of its
    launch keys."""
    return _switch("SSD_TRITON_UP_BWD_TMA_STORES", "1", "TMA stores", "pointer stores")


def check_switches() -> None:
    """Parse every SSD_* switch of these kernels that is set, so that a malformed value fails where the backend is
    built, not inside a compiled step (each raises a one-line UserError naming the variable)."""
    from . import routing_plan, score_grad
    if os.environ.get("SSD_TRITON_CONFIG"):
        env_configs()
    for var in ("SSD_TRITON_TILE_ORDER", "SSD_TRITON_WS_DOWN_ORDER"):
        if os.environ.get(var):
            tile_groups(var=var)
    half_sums()
    router_sums()
    up_bwd_tma_stores()
    score_grad.enabled(0)
    routing_plan.fill_place(0)


def sums_dtype(dw: torch.Tensor) -> torch.dtype:
    """The dtype the WS wgrad's balanced items add their partial sums in by TMA reduces: dW's own with half sums
    and a bf16/fp16 dW, else fp32 (dW itself when fp32, else a buffer)."""
    return dw.dtype if dw.dtype in (torch.bfloat16, torch.float16) and half_sums() else torch.float32
