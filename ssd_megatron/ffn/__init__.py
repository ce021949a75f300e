"""The switchable FFN (dense and sparse paths over one set of weights) and its expert backends."""
from .activations import ACTIVATIONS, GLU_ACTIVATIONS, apply_activation, is_glu
from .switchable_ffn import SwitchableFFN, straight_through_gate

__all__ = ["ACTIVATIONS", "GLU_ACTIVATIONS", "SwitchableFFN", "apply_activation", "is_glu", "straight_through_gate"]
