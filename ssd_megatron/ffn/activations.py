"""FFN activation functions by name. GLU variants take the concatenated [gate, up] pre-activation."""
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


def apply_activation(h: torch.Tensor, name: str) -> torch.Tensor:
    """Apply activation `name` to the first projection's output `h` (last dim).

    For GLU activations `h` holds the gate half then the up half along the last dim; the result has
    half the width: act(gate) * up.
    """
    fn = _gate_fn(name)
    if is_glu(name):
        gate, up = h.chunk(2, dim=-1)
        return fn(gate) * up
    return fn(h)
