"""The Triton kernels of the projection under their earlier module name; they live in
:mod:`unilora_rs.torch.ops.triton` (importing this needs Triton)."""

from __future__ import annotations

from .ops.triton import (
    BWD_LANES,
    BWD_WARPS,
    FWD_LANES,
    FWD_ROWS,
    FWD_WARPS,
    MAX_GRID,
    backward_grids,
    backward_launches,
    forward_grid,
    forward_launch,
    params_tensor,
    rebuild_backward,
    rebuild_forward,
)

__all__ = [
    "BWD_LANES",
    "BWD_WARPS",
    "FWD_LANES",
    "FWD_ROWS",
    "FWD_WARPS",
    "MAX_GRID",
    "backward_grids",
    "backward_launches",
    "forward_grid",
    "forward_launch",
    "params_tensor",
    "rebuild_backward",
    "rebuild_forward",
]
