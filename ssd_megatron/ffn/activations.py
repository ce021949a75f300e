"""FFN activation functions by name. GLU variants take the concatenated [gate, up] pre-activation."""
from typing import Optional

import torch
import torch.nn.functional as F

GLU_ACTIVATIONS = ("swiglu", "geglu", "reglu")
# gelu_tanh: tanh-approximate GELU (HF "gelu_new"/"gelu_pytorch_tanh", GPT-2's activation).
PLAIN_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "squared_relu")
ACTIVATIONS = PLAIN_ACTIVATIONS + GLU_ACTIVATIONS


def is_glu(name: str) -> bool:
    return name in GLU_ACTIVATIONS


def _gate_fn(name: str):
    if name in ("relu", "reglu"):
        return F.relu
    if name in ("gelu", "geglu"):
        return F.gelu
    if name == "gelu_tanh":
        return lambda h: F.gelu(h, approximate="tanh")
    if name == "swiglu":
        return F.silu
    if name == "squared_relu":
        return lambda h: torch.square(F.relu(h))
    raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")


def apply_activation(h: torch.Tensor, name: str, glu_block: Optional[int] = None) -> torch.Tensor:
    """Apply activation `name` to the first projection's output `h` (last dim).

    For GLU activations `h` holds the gate half then the up half along the last dim; the result has
    half the width: act(gate) * up. With `glu_block` = E, `h` is instead blocks of E gate then E up
    columns ([g_0, u_0, g_1, u_1, …]: the expert-major storage of ffn/expert_layout.py).
    """
    fn = _gate_fn(name)
    if is_glu(name):
        if glu_block is None:
            gate, up = h.chunk(2, dim=-1)
            return fn(gate) * up
        blocks = h.unflatten(-1, (-1, 2, glu_block))
        return (fn(blocks[..., 0, :]) * blocks[..., 1, :]).flatten(-2)
    return fn(h)
