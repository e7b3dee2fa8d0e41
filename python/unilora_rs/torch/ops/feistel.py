"""The integer generator of docs/SPEC.md as int64 torch operations (any device).

``mix32`` and the keyed Feistel network over ``k = wl + wr`` bits, its inverse, and
cycle-walking into ``[0, D)`` give the row permutation ``perm``; ``idx(i) = perm(i) mod d``
is the column of row ``i``. Values in ``[0, 2^32)`` are held in int64 and every product
is reduced mod ``2^32`` without int64 overflow, so the bits are those of the Rust core.
The Fastfood map (:mod:`unilora_rs.torch.ops.fastfood`) uses the same network for the
permutation of each block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .params import ProjectionParams

__all__ = [
    "column_index",
    "decrypt",
    "encrypt",
    "inverse_permute",
    "mix32",
    "permute",
]

_U32 = 0xFFFFFFFF
_MIX_C1 = 0x21F0AAAD
_MIX_C2 = 0xD35A2D97


def _mul_u32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for ``x`` in ``[0, 2^32)`` held in int64, without int64 overflow."""
    lo = x * (c & 0xFFFF)  # < 2^48
    hi = (x * (c >> 16)) & 0xFFFF  # only the low 16 bits survive the shift by 16
    return (lo + (hi << 16)) & _U32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The spec's 32-bit mixing function, element-wise on int64 values in ``[0, 2^32)``."""
    x = x ^ (x >> 16)
    x = _mul_u32(x, _MIX_C1)
    x = x ^ (x >> 15)
    x = _mul_u32(x, _MIX_C2)
    return x ^ (x >> 15)


def encrypt(x: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """One pass of the Feistel network (no cycle-walking)."""
    a, b = p.wl, p.wr
    left = x >> b
    right = x & ((1 << b) - 1)
    for key in p.keys:
        f = mix32(right ^ key) & ((1 << a) - 1)
        left, right = right, left ^ f
        a, b = b, a
    return (left << b) | right


def decrypt(y: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """The inverse of :func:`encrypt`."""
    a, b = p.wl, p.wr
    left = y >> b
    right = y & ((1 << b) - 1)
    for key in reversed(p.keys):
        a, b = b, a
        prev_r = left
        left = right ^ (mix32(prev_r ^ key) & ((1 << a) - 1))
        right = prev_r
    return (left << b) | right


def _walk(
    x: torch.Tensor,
    p: ProjectionParams,
    step: Callable[[torch.Tensor, ProjectionParams], torch.Tensor],
) -> torch.Tensor:
    """Cycle-walking: re-applies ``step`` to the entries still outside ``[0, D)``."""
    out = step(x, p)
    pending = torch.nonzero(out >= p.total).squeeze(1)
    while pending.numel():
        vals = step(out[pending], p)
        out[pending] = vals
        pending = pending[vals >= p.total]
    return out


def permute(i: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """``perm(i)`` for an int64 tensor of rows in ``[0, D)``."""
    return _walk(i, p, encrypt)


def inverse_permute(y: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """``perm^-1(y)`` for an int64 tensor of images in ``[0, D)``."""
    return _walk(y, p, decrypt)


def column_index(i: torch.Tensor, p: ProjectionParams) -> torch.Tensor:
    """``idx(i) = perm(i) mod d`` (int64)."""
    return permute(i, p) % p.d
