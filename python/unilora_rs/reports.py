"""The reports of the Rust core's merges and exports, as Python objects.

The core returns each report as a dict; the classes here hold its fields, and
:func:`merge_result` and :meth:`ExportResult._from_core` build them from those dicts.
The functions that return them live in :mod:`unilora_rs.merging` and
:mod:`unilora_rs.export`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ExportResult",
    "MergeEachResult",
    "MergeResult",
    "MergedTensor",
    "PeftExportResult",
    "merge_result",
]


@dataclass(frozen=True)
class MergedTensor:
    """One adapted module and the base tensor it was merged into."""

    module: str
    tensor: str
    file: str


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge` did."""

    out: Path
    merged: list[MergedTensor]
    replaced: list[str]
    cast: int
    copied: int
    tensors: int
    shards: list[str]
    other_files: list[str]
    bytes_written: int
    largest_tensor_bytes: int
    seconds: float
    left_out: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Tensors the base lacks, written from the adapter (its ``task.new_tensors``).
    added: list[str] = field(default_factory=list)
    #: Keys set in the output's ``config.json`` (``task.config``, ``dtype``).
    config_keys: list[str] = field(default_factory=list)
    #: Bytes of tensor data read from the inputs (base and adapters).
    bytes_read: int = 0
    #: Quantized base weights (bitsandbytes 8-bit / 4-bit) written dequantised.
    dequantized: int = 0

    @property
    def merged_count(self) -> int:
        """Number of base tensors that received a LoRA update."""
        return len(self.merged)


@dataclass(frozen=True)
class MergeEachResult:
    """What :func:`merge_each` did: one :class:`MergeResult` per adapter, in order."""

    results: list[MergeResult]
    #: Bytes of tensor data read: the base once, plus the adapters' saved tensors.
    bytes_read: int
    seconds: float


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_lora` wrote."""

    out: Path
    modules: int
    saved_tensors: int
    lora_parameters: int
    weights_bytes: int
    seconds: float
    #: The companion file of the saved modules (``saved_modules="separate"``).
    saved_file: Path | None = None

    @classmethod
    def _from_core(cls, raw: dict[str, Any], seconds: float, **more: Any) -> Any:
        """The result of the core's report ``raw`` (more fields of a subclass in ``more``)."""
        saved_file = raw.get("saved_file")
        return cls(
            out=Path(raw["out"]),
            modules=raw["modules"],
            saved_tensors=raw["saved_tensors"],
            lora_parameters=raw["lora_parameters"],
            weights_bytes=raw["weights_bytes"],
            seconds=seconds,
            saved_file=None if saved_file is None else Path(saved_file),
            **more,
        )


def merge_result(raw: dict[str, Any], seconds: float) -> MergeResult:
    """The :class:`MergeResult` of one report of the core's merge (``raw``)."""
    return MergeResult(
        out=Path(raw["out"]),
        merged=[MergedTensor(**m) for m in raw["merged"]],
        replaced=list(raw["replaced"]),
        cast=raw["cast"],
        copied=raw["copied"],
        tensors=raw["tensors"],
        shards=list(raw["shards"]),
        other_files=list(raw["other_files"]),
        bytes_written=raw["bytes_written"],
        largest_tensor_bytes=raw["largest_tensor_bytes"],
        seconds=seconds,
        left_out=list(raw["left_out"]),
        warnings=list(raw["warnings"]),
        added=list(raw["added"]),
        config_keys=list(raw["config_keys"]),
        bytes_read=raw["bytes_read"],
        dequantized=raw["dequantized"],
    )


@dataclass(frozen=True)
class PeftExportResult(ExportResult):
    """What :func:`export_peft` wrote, and what PEFT's format changes or leaves out."""

    notes: list[str] = field(default_factory=list)
