"""``unilora export-lora ADAPTER OUT``: write the exact PEFT LoRA equivalent."""

from __future__ import annotations

import argparse

from ..export.lora import SAVED_MODULES_CHOICES, export_lora
from ._options import add_adapter, add_dtype, add_overwrite, add_saved_modules


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export-lora",
        help="write a standard PEFT LoRA adapter (lora_A / lora_B) equivalent to the adapter",
        description=(
            "Reconstructs every LoRA factor from theta_d and writes adapter_config.json "
            "(peft_type LORA, r, lora_alpha, target_modules) and adapter_model.safetensors "
            "(base_model.model.<module>.lora_A.weight / lora_B.weight), the layout PEFT, "
            "vLLM and llama.cpp's LoRA converter read. float32 is exact."
        ),
    )
    add_adapter(p)
    p.add_argument("out", help="output folder")
    add_dtype(p, default="f32", help="dtype of the LoRA factors (default f32, exact)")
    add_overwrite(p)
    add_saved_modules(
        p,
        choices=SAVED_MODULES_CHOICES,
        help=(
            "what to do with the adapter's modules_to_save tensors: error (default; vLLM "
            "and llama.cpp's converter reject them), keep (in the adapter, for PEFT), drop, "
            "or separate (to OUT/saved_modules.safetensors, under the base model's names)"
        ),
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = export_lora(
        args.adapter,
        args.out,
        dtype=args.dtype,
        overwrite=args.overwrite,
        saved_modules=args.saved_modules,
    )
    saved = f" + {result.saved_tensors} saved tensor(s)" if result.saved_tensors else ""
    if result.saved_file is not None:
        saved += f" (in {result.saved_file.name})"
    print(
        f"exported {result.modules} LoRA modules{saved} ({result.lora_parameters:,} parameters, "
        f"{result.weights_bytes / 2**20:.1f} MiB) to {result.out} in {result.seconds:.2f} s"
    )
    return 0
