"""What the rebuild operators (``torch.library`` custom operators) share: the seed in
the operator schema's signed int64, and the registration of a rebuild's gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["register_rebuild_autograd", "seed_from_i64", "seed_to_i64"]

_U64 = (1 << 64) - 1


def seed_to_i64(seed: int) -> int:
    """A u64 seed as the signed int64 an operator argument holds."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def seed_from_i64(seed: int) -> int:
    """The u64 seed back from :func:`seed_to_i64`'s value."""
    return seed & _U64


def register_rebuild_autograd(op: Any, backward: Callable[..., torch.Tensor]) -> None:
    """Gives a rebuild operator ``op(theta, seed, total, backend)`` its gradient:
    ``backward(grad, seed, total, d, backend)`` for ``theta``, nothing for the rest."""

    def setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: object) -> None:
        theta, seed, total, backend = inputs
        ctx.seed, ctx.total, ctx.d, ctx.backend = seed, total, theta.numel(), backend  # type: ignore[attr-defined]

    def grad(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> tuple:
        out = backward(g, ctx.seed, ctx.total, ctx.d, ctx.backend)  # type: ignore[attr-defined]
        return out, None, None, None

    op.register_autograd(grad, setup_context=setup)
