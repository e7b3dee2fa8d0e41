"""The reports of the Rust core's merges and exports, as Python objects.

Each class is the core's own report struct (a frozen ``#[pyclass]`` in
``unilora_rs._core``, its fields read-only attributes), so every field list is written
once, in Rust. The functions that return them live in :mod:`unilora_rs.merging` and
:mod:`unilora_rs.export`.
"""

from __future__ import annotations

from ._core import ExportResult, MergedTensor, MergeEachResult, MergeResult, PeftExportResult

__all__ = [
    "ExportResult",
    "MergeEachResult",
    "MergeResult",
    "MergedTensor",
    "PeftExportResult",
]
