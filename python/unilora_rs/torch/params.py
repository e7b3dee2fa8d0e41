"""The constants of one projection, computed by the Rust core (docs/SPEC.md section 1).

Both kernel families (:mod:`unilora_rs.torch.kernels` for torch tensors and
:mod:`unilora_rs.torch.triton_kernels` for Triton) read them from here; nothing in
Python re-derives round keys, widths or scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .. import _core
from ..errors import InvalidArgumentError

__all__ = ["MAX_TOTAL", "ProjectionParams"]

#: The torch kernels hold row numbers in int64: D is limited to 2^62.
MAX_TOTAL = 1 << 62


@dataclass(frozen=True)
class ProjectionParams:
    """Round keys, half widths, balance, scales and the division constants of one
    projection (``seed``, ``D = total``, ``d``), from :func:`unilora_rs._core.projection_params`."""

    seed: int
    total: int
    d: int
    keys: tuple[int, int, int, int]
    wl: int
    wr: int
    q: int
    rem: int
    scale_hi: float
    scale_lo: float
    #: The Feistel domain (``k <= 32`` bits) and ``d < 2^32`` both fit in 32 bits.
    narrow: bool
    div_magic: int
    div_shift1: int
    div_shift2: int
    #: ``t`` values per partial sum of the backward pass.
    t_chunk: int

    @staticmethod
    @lru_cache(maxsize=64)
    def create(seed: int, total: int, d: int) -> ProjectionParams:
        """The parameters of ``(seed, total, d)``; the core validates the sizes."""
        fields = _core.projection_params(seed, total, d)
        if total > MAX_TOTAL:
            raise InvalidArgumentError(f"D = {total} is too large for the torch kernels (max 2^62)")
        fields["keys"] = tuple(fields["keys"])
        return ProjectionParams(**fields)

    @property
    def n_t(self) -> int:
        """Images per column, rounded up: ``ceil(D / d)``."""
        return -(-self.total // self.d)

    @property
    def n_chunks(self) -> int:
        """Chunks of ``t_chunk`` t values: ``ceil(n_t / t_chunk)``."""
        return -(-self.n_t // self.t_chunk)
