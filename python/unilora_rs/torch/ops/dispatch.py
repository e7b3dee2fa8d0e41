"""``rebuild``: ``theta_D = P theta_d`` for any projection, the one place that dispatches
on the projection kind (sparse, Fastfood, explicit map) after checking ``theta_d``.

Every path is differentiable; the generated projections run as ``torch.library``
custom operators, so ``torch.compile`` sees one opaque node without graph breaks and
DDP / gradient checkpointing treat it like any other differentiable op.
"""

from __future__ import annotations

import torch

from ...errors import InvalidArgumentError
from .backends import resolve_backend
from .custom_op import seed_to_i64
from .fastfood import rebuild_fastfood
from .params import ExplicitParams, FastfoodParams, Params
from .sparse import rebuild_sparse

__all__ = ["rebuild"]


def rebuild(
    theta: torch.Tensor,
    p: Params,
    *,
    index: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``theta_D`` (float32, length ``D``) from ``theta_d``; differentiable.

    The one place that dispatches on the projection: the sparse map of spec v1 (with
    ``index``, the int32 map from :func:`build_index_map`, the cached mode is used;
    without it, indices are computed from the seed on the fly), the Fastfood map
    (:mod:`unilora_rs.torch.ops.fastfood`), or an explicit map (``theta_d[indices] * scales``).
    """
    resolve_backend(theta.device, backend)  # validates the name early
    if theta.dim() != 1 or theta.numel() != p.d:
        raise InvalidArgumentError(
            f"theta_d must be 1-D of length d = {p.d}, got {tuple(theta.shape)}"
        )
    if theta.dtype != torch.float32:
        raise InvalidArgumentError(
            f"theta_d must be float32, got {theta.dtype} (under FSDP2 a MixedPrecisionPolicy "
            "casts it: put theta_d in its own unit with param_dtype=torch.float32, see "
            "docs/TRAINING.md)"
        )
    if isinstance(p, FastfoodParams):
        return rebuild_fastfood(theta, seed_to_i64(p.seed), p.total, backend)
    if isinstance(p, ExplicitParams):
        indices, scales = p.tensors(theta.device)
        return theta[indices] * scales
    return rebuild_sparse(theta, p, index, backend)
