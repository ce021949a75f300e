"""TMA for the launches: whether a device has it (Hopper or newer), and descriptors of their operands (rows of a
2-D tensor, or all experts' weights as one 2-D matrix in either layout)."""
from __future__ import annotations

import torch

from .common import expert_boxes, expert_matrix, tma_aligned


def hopper(t: torch.Tensor) -> bool:
    """Hopper or newer, or the interpreter (tests): TMA (the bulk-copy engine; A100s take the pointer loads)
    and bf16 atomic adds in hardware (on sm_80 Triton lowers them to compare-and-swap loops)."""
    from .. import _sm90  # cached per device

    if t.device.type != "cuda":
        return True
    return _sm90(t.device.index if t.device.index is not None else torch.cuda.current_device())


def operand_tma(cfg, t: torch.Tensor) -> bool:
    """Whether a config's seventh entry asks for its non-gathered operand by TMA (TMA_OPERAND) and `t`'s device
    has TMA."""
    return cfg[6:] == (1,) and hopper(t)


def expert_descriptors(w, row_boxes, cols: int):
    """TMA descriptors of all experts' weights w [N, R, C] as one 2-D matrix, one per box height in `row_boxes`,
    and the layout flag RC of `kernels.common._expert_tile`: [N * R, C] in [r, cols] boxes (RC: C contiguous),
    or [C, N * R] in [cols, r] boxes (R contiguous, e.g. W_out's column view); None for any other layout or a
    misaligned one."""
    matrix = expert_matrix(w)
    if matrix is None:
        return None
    w2d, rc = matrix
    d = tma_descriptors(w2d, expert_boxes(rc, row_boxes, cols))
    return None if d is None else d + (rc,)


def tma_descriptors(t, boxes):
    """TMA descriptors of the 2-D `t` in each box of `boxes`, or None where its rows are not contiguous and
    16-byte aligned."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not tma_aligned(t):
        return None
    return tuple(TensorDescriptor.from_tensor(t, list(b)) for b in boxes)
