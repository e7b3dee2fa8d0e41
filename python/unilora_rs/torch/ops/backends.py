"""The kernel families a rebuild runs on, and which one a device gets.

``"triton"`` (:mod:`unilora_rs.torch.ops.triton`, CUDA; ``TRITON_INTERPRET=1`` runs it on
CPU), ``"rust"`` (:mod:`unilora_rs.torch.ops.rust`, the Rust core on CPU tensors) and
``"torch"`` (int64 torch operations on any device); ``"auto"`` picks per device.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from ...errors import InvalidArgumentError

__all__ = ["BACKENDS", "resolve_backend", "triton_available", "triton_interpret"]

BACKENDS = ("auto", "triton", "rust", "torch")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton can be imported (CUDA kernels; ``TRITON_INTERPRET=1`` runs them on CPU)."""
    try:
        from . import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    """Whether Triton's interpreter is chosen (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device, backend: str) -> str:
    """The kernel family used for tensors on ``device``: ``"triton"``, ``"rust"`` or ``"torch"``.

    ``"auto"`` picks Triton on CUDA (when importable), the Rust core on CPU and the int64
    torch implementation elsewhere. ``"triton"`` on a CPU tensor needs ``TRITON_INTERPRET=1``.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "rust" if device.type == "cpu" else "torch"
    if backend == "triton" and not (
        triton_available() and (device.type == "cuda" or triton_interpret())
    ):
        raise InvalidArgumentError(
            f"backend='triton' needs Triton and a CUDA tensor (got device {device}); "
            "use backend='auto' or 'torch'"
        )
    if backend == "rust" and device.type != "cpu":
        raise InvalidArgumentError(f"backend='rust' runs on CPU tensors only (got device {device})")
    return backend
