"""``unilora export-peft ADAPTER OUT``: the adapter in PEFT's Uni-LoRA format."""

from __future__ import annotations

import argparse

from ..export.peft import export_peft
from ._options import add_adapter, add_overwrite


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export-peft",
        help="write the adapter in PEFT's Uni-LoRA format (saved indices and scales)",
        description=(
            "Writes adapter_config.json (peft_type UNILORA, save_indices true) and "
            "adapter_model.safetensors (theta_d and every layer's indices and scales), which "
            "PeftModel.from_pretrained loads with this adapter's outputs. The Fastfood "
            "projection is dense and cannot be exported this way (use export-lora); "
            "alpha / r other than 1 is folded into B's scales. No torch needed."
        ),
    )
    add_adapter(p, help="the unilora_rs adapter folder")
    p.add_argument("out", help="output folder (written atomically)")
    add_overwrite(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = export_peft(args.adapter, args.out, overwrite=args.overwrite)
    saved = f" + {result.saved_tensors} saved tensor(s)" if result.saved_tensors else ""
    print(
        f"exported {result.modules} modules{saved} ({result.lora_parameters:,} indices, "
        f"{result.weights_bytes / 2**20:.1f} MiB) in PEFT's Uni-LoRA format to {result.out} "
        f"in {result.seconds:.2f} s"
    )
    for note in result.notes:
        print(f"note: {note}")
    return 0
