"""Expert backends: interchangeable implementations of the sparse (MoE) FFN computation.

See docs/interfaces.md for the calling convention. `get_backend(name)` returns an instance; fast
backends register themselves here when their dependencies import.
"""
from ...errors import UserError
from .reference import ReferenceBackend

BACKEND_NAMES = ("auto", "reference", "grouped_mm", "triton", "megablocks")


def get_backend(name: str = "auto", device=None):
    if name not in BACKEND_NAMES:
        raise UserError(f"ssd.backend: unknown backend {name!r}; accepted: {', '.join(BACKEND_NAMES)}")
    if name in ("auto", "reference"):
        return ReferenceBackend()
    raise UserError(f"ssd.backend: backend {name!r} is not available in this build; use 'reference'")
