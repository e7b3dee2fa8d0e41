"""Exports of a trained model that need torch: :mod:`.onnx` (an ONNX graph checked with
onnxruntime before it is written)."""

from __future__ import annotations

from .onnx import (
    SINGLE_FILE_LIMIT,
    ExportReport,
    export_adapter_onnx,
    export_onnx,
    load_base_model,
)

__all__ = [
    "SINGLE_FILE_LIMIT",
    "ExportReport",
    "export_adapter_onnx",
    "export_onnx",
    "load_base_model",
]
