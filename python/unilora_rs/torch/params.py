"""A projection's constants under their earlier module name; they live in
:mod:`unilora_rs.torch.ops.params`."""

from __future__ import annotations

from .ops.params import (
    GENERATED_PROJECTIONS,
    MAX_TOTAL,
    ExplicitParams,
    FastfoodParams,
    Params,
    ProjectionParams,
    make_projection,
)

__all__ = [
    "GENERATED_PROJECTIONS",
    "MAX_TOTAL",
    "ExplicitParams",
    "FastfoodParams",
    "Params",
    "ProjectionParams",
    "make_projection",
]
