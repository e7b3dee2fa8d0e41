"""The ONNX export under its earlier module name; it lives in
:mod:`unilora_rs.torch.export.onnx`."""

from __future__ import annotations

from .export.onnx import (
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
