"""A summary of an adapter folder: what it holds, its sizes, and whether it is intact
(:func:`inspect`, :class:`AdapterInfo`; numpy only).

The checks are the Rust merge's, except that a fingerprint mismatch, a map mismatch and
a non-finite ``theta_d`` are reported instead of raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _core
from ._util import PathArg, as_path
from .adapter import (
    MAP_INDICES_KEY,
    MAP_SCALES_KEY,
    VECTOR_KEY,
    WEIGHTS_NAME,
    AdapterConfig,
    ModuleSpec,
    adapter_directory,
)

__all__ = ["AdapterInfo", "inspect"]


@dataclass(frozen=True)
class AdapterInfo:
    """A summary of an adapter directory (see :func:`inspect`)."""

    path: Path
    seed: int
    d: int
    rank: int
    alpha: float
    modules: list[ModuleSpec]
    lora_parameters: int
    modules_to_save: list[str]
    saved_tensors: dict[str, tuple[str, list[int]]]
    saved_parameters: int
    fingerprint: str
    expected_fingerprint: str
    theta_finite: bool
    theta_norm: float
    size_on_disk: int
    base_model_name_or_path: str | None
    spec_version: int
    format_version: int
    kinds: dict[str, int] = field(default_factory=dict)
    #: ``"sparse"``, ``"fastfood"``, ``"explicit"`` or ``"peft-numpy"``.
    projection: str = "sparse"
    #: The SHA-256 the config records for its map, and the one the map has.
    map_sha256: str | None = None
    actual_map_sha256: str | None = None

    @property
    def fingerprint_ok(self) -> bool:
        """Whether the stored fingerprint matches seed, ``d`` and the module list."""
        return self.fingerprint == self.expected_fingerprint

    @property
    def map_ok(self) -> bool:
        """Whether the map (explicit or regenerated) has the recorded SHA-256 (always
        true for the projections generated from the seed)."""
        return self.map_sha256 == self.actual_map_sha256

    @property
    def scaling(self) -> float:
        """The LoRA scaling ``alpha / r``."""
        return float(self.alpha) / self.rank

    @property
    def compression(self) -> float:
        """``D / d``: LoRA parameters per trainable parameter."""
        return self.lora_parameters / self.d

    @property
    def lora_bytes(self) -> int:
        """Tensor bytes of the equivalent float32 LoRA adapter (factors + saved modules)."""
        return 4 * self.lora_parameters + sum(
            _DTYPE_SIZES.get(dt, 0) * _numel(shape) for dt, shape in self.saved_tensors.values()
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "path": str(self.path),
            "seed": self.seed,
            "d": self.d,
            "rank": self.rank,
            "alpha": self.alpha,
            "scaling": self.scaling,
            "modules": len(self.modules),
            "kinds": self.kinds,
            "lora_parameters": self.lora_parameters,
            "compression": self.compression,
            "modules_to_save": self.modules_to_save,
            "saved_parameters": self.saved_parameters,
            "trainable_parameters": self.d + self.saved_parameters,
            "fingerprint": self.fingerprint,
            "fingerprint_ok": self.fingerprint_ok,
            "theta_finite": self.theta_finite,
            "theta_norm": self.theta_norm,
            "size_on_disk": self.size_on_disk,
            "lora_bytes": self.lora_bytes,
            "base_model_name_or_path": self.base_model_name_or_path,
            "spec_version": self.spec_version,
            "format_version": self.format_version,
            "projection": self.projection,
            "map_sha256": self.map_sha256,
            "map_ok": self.map_ok,
            "module_list": [
                {
                    "name": m.name,
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "kind": m.kind,
                }
                for m in self.modules
            ],
        }


_DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def inspect(adapter: PathArg) -> AdapterInfo:
    """Summarises an adapter: ``d``, seed, rank, projection, modules, parameter counts,
    the fingerprint check (reported, not raised: see :attr:`AdapterInfo.fingerprint_ok`),
    the map check of explicit and regenerated maps (:attr:`AdapterInfo.map_ok`), whether
    ``theta_d`` is finite (reported too), and the size on disk against the equivalent
    float32 LoRA.

    Every other check is the one the Rust merge makes: a malformed config or weights
    file raises :class:`FormatError` (or :class:`MismatchError`, :class:`VectorError`),
    missing files ``FileNotFoundError``.
    """
    import numpy as np

    path = as_path("adapter", adapter)
    checked, theta, arrays = _core.load_adapter(path, verify=False)
    config = AdapterConfig._from_checked(checked)
    directory = adapter_directory(path)
    _meta, tensors, _start = _core.safetensors_header(directory / WEIGHTS_NAME)
    finite = bool(np.isfinite(theta).all())
    saved = {
        name: (dt, list(sh))
        for name, (dt, sh, _) in tensors.items()
        if name not in (VECTOR_KEY, MAP_INDICES_KEY, MAP_SCALES_KEY)
    }
    kinds: dict[str, int] = {}
    for m in config.modules:
        kinds[m.kind] = kinds.get(m.kind, 0) + 1
    return AdapterInfo(
        path=directory,
        seed=config.seed,
        d=config.vector_length,
        rank=config.rank,
        alpha=config.alpha,
        modules=list(config.modules),
        lora_parameters=int(checked["total_size"]),
        modules_to_save=list(config.modules_to_save),
        saved_tensors=saved,
        saved_parameters=sum(_numel(sh) for _, sh in saved.values()),
        fingerprint=config.fingerprint,
        expected_fingerprint=str(checked["expected_fingerprint"]),
        theta_finite=finite,
        theta_norm=float(np.linalg.norm(theta.astype(np.float64))) if finite else float("nan"),
        size_on_disk=_dir_size(directory),
        base_model_name_or_path=config.base_model_name_or_path,
        spec_version=int(checked["spec_version"]),
        format_version=config.format_version,
        kinds=kinds,
        projection=config.projection,
        map_sha256=config.map_sha256,
        actual_map_sha256=None if arrays is None else arrays[2],
    )
