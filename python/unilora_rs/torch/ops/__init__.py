"""Rebuilding ``theta_D = P theta_d`` inside torch: the projections of docs/SPEC.md on any
device, bit for bit equal to :func:`unilora_rs.reconstruct`.

One concept per module: :mod:`.params` (a projection's constants, from the Rust core),
:mod:`.feistel` (the integer generator as int64 torch operations), :mod:`.backends`
(which kernel family a device gets), :mod:`.rust` (the Rust core on CPU tensors),
:mod:`.triton` (the CUDA kernels, imported only when used), :mod:`.custom_op` (what the
rebuild operators share), :mod:`.sparse` and :mod:`.fastfood` (each projection's torch
implementation and operators) and :mod:`.dispatch` (:func:`rebuild`, the one entry).
"""

from __future__ import annotations

from .backends import BACKENDS, resolve_backend, triton_available, triton_interpret
from .custom_op import register_rebuild_autograd
from .dispatch import rebuild
from .feistel import column_index, inverse_permute, permute
from .params import (
    GENERATED_PROJECTIONS,
    MAX_TOTAL,
    ExplicitParams,
    FastfoodParams,
    Params,
    ProjectionParams,
    make_projection,
)
from .sparse import CHUNK_ROWS, INDEX_MODES, build_index_map, rebuild_backward_reference

__all__ = [
    "BACKENDS",
    "CHUNK_ROWS",
    "GENERATED_PROJECTIONS",
    "INDEX_MODES",
    "MAX_TOTAL",
    "ExplicitParams",
    "FastfoodParams",
    "Params",
    "ProjectionParams",
    "build_index_map",
    "column_index",
    "inverse_permute",
    "make_projection",
    "permute",
    "rebuild",
    "rebuild_backward_reference",
    "register_rebuild_autograd",
    "resolve_backend",
    "triton_available",
    "triton_interpret",
]
