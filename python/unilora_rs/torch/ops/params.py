"""The constants of one projection, computed by the Rust core (docs/SPEC.md).

Every kernel family (the torch implementations in :mod:`unilora_rs.torch.ops.sparse` and
:mod:`unilora_rs.torch.ops.fastfood`, the Triton kernels of
:mod:`unilora_rs.torch.ops.triton`) reads them from here; nothing in
Python re-derives round keys, widths or scales. :func:`make_projection` is the one
place that turns an adapter's ``projection`` into the parameters the kernels take:
:class:`ProjectionParams` (sparse, spec v1), :class:`FastfoodParams` (spec v2) or
:class:`ExplicitParams` (a map bound by its SHA-256).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import torch

from ... import _core
from ...adapter import PROJECTIONS, ProjectionMap
from ...errors import InvalidArgumentError

__all__ = [
    "GENERATED_PROJECTIONS",
    "MAX_TOTAL",
    "ExplicitParams",
    "FastfoodParams",
    "Params",
    "ProjectionParams",
    "make_projection",
]

#: The torch kernels hold row numbers in int64: D is limited to 2^62.
MAX_TOTAL = 1 << 62

#: Projections generated from the seed (a new adapter can use them).
GENERATED_PROJECTIONS = ("sparse", "fastfood")


def _check_total(total: int) -> None:
    if total > MAX_TOTAL:
        raise InvalidArgumentError(f"D = {total} is too large for the torch kernels (max 2^62)")


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
    kind: ClassVar[str] = "sparse"
    map: ClassVar[ProjectionMap | None] = None
    map_sha256: ClassVar[str | None] = None

    @staticmethod
    @lru_cache(maxsize=64)
    def create(seed: int, total: int, d: int) -> ProjectionParams:
        """The parameters of ``(seed, total, d)``; the core validates the sizes."""
        fields = _core.projection_params(seed, total, d)
        _check_total(total)
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


@dataclass(frozen=True, eq=False)
class FastfoodParams:
    """The Fastfood projection of ``(seed, total, d)`` (docs/SPEC.md section 4): block
    length ``n = 2^bits``, the number of blocks, every block's 11 key words (uint32
    ``[blocks, 11]``: four round keys of ``Π``, the sign key, six Gaussian keys) and its
    scale ``c_b`` (float32 ``[blocks]``), from :func:`unilora_rs._core.fastfood_params`."""

    seed: int
    total: int
    d: int
    n: int
    bits: int
    blocks: int
    keys: npt.NDArray[np.uint32]
    scales: npt.NDArray[np.float32]
    kind: ClassVar[str] = "fastfood"
    map: ClassVar[ProjectionMap | None] = None
    map_sha256: ClassVar[str | None] = None

    @staticmethod
    @lru_cache(maxsize=8)
    def create(seed: int, total: int, d: int) -> FastfoodParams:
        """The parameters of ``(seed, total, d)``; the core validates the sizes."""
        fields = _core.fastfood_params(seed, total, d)
        _check_total(total)
        return FastfoodParams(**fields)


@dataclass(eq=False)
class ExplicitParams:
    """An explicit map (``"explicit"`` or ``"peft-numpy"``) with its tensors kept per
    device: ``theta_D = theta_d[indices] * scales``."""

    seed: int
    total: int
    d: int
    map: ProjectionMap
    _on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    @property
    def kind(self) -> str:
        """``"explicit"`` or ``"peft-numpy"``."""
        return self.map.kind

    @property
    def map_sha256(self) -> str:
        """The SHA-256 of the map."""
        return self.map.sha256

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices int64, scales float32)`` on ``device`` (made once per device)."""
        if device not in self._on:
            idx = torch.from_numpy(self.map.indices.astype(np.int64)).to(device)
            self._on[device] = (idx, torch.from_numpy(self.map.scales).to(device))
        return self._on[device]


#: Any of the projections the kernels take.
Params = ProjectionParams | FastfoodParams | ExplicitParams


def make_projection(
    kind: str, seed: int, total: int, d: int, projection_map: ProjectionMap | None = None
) -> Params:
    """The kernel parameters of an adapter's projection: ``"sparse"`` and
    ``"fastfood"`` from the seed, ``"explicit"`` and ``"peft-numpy"`` from their map."""
    if kind not in PROJECTIONS:
        raise InvalidArgumentError(
            f"projection {kind!r} is not one of {', '.join(map(repr, PROJECTIONS))}"
        )
    if kind in GENERATED_PROJECTIONS:
        if projection_map is not None:
            raise InvalidArgumentError(
                f"projection {kind!r} is generated from the seed and takes no map"
            )
        params = ProjectionParams if kind == "sparse" else FastfoodParams
        return params.create(seed, total, d)
    if projection_map is None or projection_map.kind != kind:
        raise InvalidArgumentError(
            f"projection {kind!r} is a map: an adapter with it is loaded with "
            "UniLoRAModel.from_pretrained, which reads (explicit) or regenerates (peft-numpy) "
            "the map; new adapters use 'sparse' or 'fastfood'"
        )
    if projection_map.indices.shape != (total,):
        raise InvalidArgumentError(
            f"the {kind} map has {projection_map.indices.shape[0]} rows, the adapted modules "
            f"have D = {total} LoRA parameters"
        )
    _check_total(total)
    return ExplicitParams(seed, total, d, projection_map)
