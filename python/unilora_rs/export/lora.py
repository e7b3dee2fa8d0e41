"""The exact LoRA export: a Uni-LoRA adapter as the PEFT LoRA adapter (``lora_A`` /
``lora_B``) it equals, written by the Rust core (numpy only, no torch).

>>> import unilora_rs as ur
>>> ur.export_lora("my-adapter/", "my-lora/")  # doctest: +SKIP
"""

from __future__ import annotations

from .. import _core
from .._util import PathArg, as_path, dtype_name
from ..reports import ExportResult

__all__ = ["SAVED_MODULES_CHOICES", "export_lora"]

SAVED_MODULES_CHOICES = ("error", "keep", "drop", "separate")


def export_lora(
    adapter: PathArg,
    out: PathArg,
    *,
    dtype: str = "f32",
    overwrite: bool = False,
    saved_modules: str = "error",
) -> ExportResult:
    """Writes the exact PEFT LoRA equivalent of a Uni-LoRA adapter into folder ``out``.

    ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight``
    (``r x in``) and ``...lora_B.weight`` (``out x r``) for every module, plus the
    ``modules_to_save`` tensors as ``base_model.model.<name>``; ``adapter_config.json``
    has ``peft_type = "LORA"``, the same ``r``, ``lora_alpha = alpha`` and
    ``target_modules`` listing exactly the adapted modules (``fan_in_fan_out`` is true
    when every module is a GPT-2 style ``conv1d``). PEFT's ``PeftModel.from_pretrained``,
    vLLM and llama.cpp's LoRA converter read this layout. ``dtype="f32"`` (default) is
    exact; ``"bf16"`` or ``"f16"`` round the factors to nearest even.

    ``saved_modules`` says what to do with the adapter's ``modules_to_save`` tensors
    (a trained head, say): ``"error"`` (default) refuses such an adapter, since vLLM's
    LoRA loader and llama.cpp's ``convert_lora_to_gguf.py`` reject saved modules;
    ``"keep"`` writes them into the adapter as ``base_model.model.<name>`` (PEFT loads
    them); ``"drop"`` leaves them out (the LoRA model then lacks the trained modules);
    ``"separate"`` writes them under their own names (the base model's keys) to
    ``saved_modules.safetensors`` in ``out``, where no LoRA loader looks
    (:attr:`ExportResult.saved_file`). Only ``"keep"`` lists them in the config.
    """
    adapter_p, out_p = as_path("adapter", adapter), as_path("out", out)
    dt = dtype_name(dtype, allow_none=False)
    return _core.export_lora(
        adapter_p, out_p, dtype=dt, overwrite=bool(overwrite), saved_modules=saved_modules
    )
