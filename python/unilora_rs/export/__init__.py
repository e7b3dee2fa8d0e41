"""Exports of a Uni-LoRA adapter to other formats, one module each (numpy only, no
torch): :mod:`~unilora_rs.export.lora` (the exact PEFT LoRA adapter),
:mod:`~unilora_rs.export.peft` (PEFT's Uni-LoRA format) and
:mod:`~unilora_rs.export.gguf` (a llama.cpp LoRA GGUF file).

The ONNX export of a merged model needs torch and lives in :mod:`unilora_rs.torch`.
"""

from __future__ import annotations

from .gguf import GGUF_ARCHITECTURES, GGUF_OUTTYPES, GgufExportResult, export_gguf
from .lora import SAVED_MODULES_CHOICES, export_lora
from .peft import export_peft

__all__ = [
    "GGUF_ARCHITECTURES",
    "GGUF_OUTTYPES",
    "SAVED_MODULES_CHOICES",
    "GgufExportResult",
    "export_gguf",
    "export_lora",
    "export_peft",
]
