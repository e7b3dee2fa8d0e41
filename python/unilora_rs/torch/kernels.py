"""The rebuild of ``theta_D`` in torch under its earlier module name; the kernels live in
:mod:`unilora_rs.torch.ops` (one module per concept)."""

from __future__ import annotations

from .ops import (
    BACKENDS,
    CHUNK_ROWS,
    INDEX_MODES,
    ProjectionParams,
    build_index_map,
    column_index,
    inverse_permute,
    permute,
    rebuild,
    rebuild_backward_reference,
    register_rebuild_autograd,
    resolve_backend,
    triton_available,
    triton_interpret,
)

__all__ = [
    "BACKENDS",
    "CHUNK_ROWS",
    "INDEX_MODES",
    "ProjectionParams",
    "build_index_map",
    "column_index",
    "inverse_permute",
    "permute",
    "rebuild",
    "rebuild_backward_reference",
    "register_rebuild_autograd",
    "resolve_backend",
    "triton_available",
    "triton_interpret",
]
