"""The Fastfood projection in torch under its earlier module name; it lives in
:mod:`unilora_rs.torch.ops.fastfood`."""

from __future__ import annotations

from .ops.fastfood import (
    CHUNK_ROWS,
    GAUSS_MEAN,
    fastfood_backward,
    fastfood_forward,
    fwht,
    rebuild_fastfood,
)

__all__ = [
    "CHUNK_ROWS",
    "GAUSS_MEAN",
    "fastfood_backward",
    "fastfood_forward",
    "fwht",
    "rebuild_fastfood",
]
