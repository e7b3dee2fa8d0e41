"""``unilora export-gguf ADAPTER OUT.gguf --base DIR``: write a llama.cpp LoRA GGUF."""

from __future__ import annotations

import argparse

from ..export.gguf import GGUF_ARCHITECTURES, GGUF_OUTTYPES, GGUF_SAVED_MODULES, export_gguf
from ..extras import require
from ._options import add_adapter, add_no_progress, add_overwrite, add_saved_modules


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export-gguf",
        help="write a llama.cpp LoRA adapter GGUF equivalent to the adapter (no torch)",
        description=(
            "Reconstructs every LoRA factor from theta_d and writes the GGUF file llama.cpp's "
            "convert_lora_to_gguf.py writes for the PEFT LoRA equivalent (tensor names "
            "blk.N.<tensor>.weight.lora_a / .lora_b, the Llama q/k row permutation, metadata "
            "general.type=adapter, adapter.type=lora, adapter.lora.alpha), offline and without "
            "torch. Architectures: " + ", ".join(GGUF_ARCHITECTURES) + ". The output appears "
            "only when complete; the inputs are never modified."
        ),
    )
    add_adapter(p)
    p.add_argument("out", help="output .gguf file")
    p.add_argument(
        "--base",
        default=None,
        help="the base model's folder (its config.json is read; default: the adapter's "
        "base_model_name_or_path when that is a local folder)",
    )
    p.add_argument(
        "--outtype",
        choices=GGUF_OUTTYPES,
        default="f32",
        help="tensor type, as the converter's --outtype (default f32, exact)",
    )
    add_saved_modules(
        p,
        choices=GGUF_SAVED_MODULES,
        help=(
            "what to do with the adapter's modules_to_save tensors: error (default; llama.cpp "
            "has no place for them), drop, or separate (to OUT_STEM.saved_modules.safetensors "
            "beside OUT, under the base model's names)"
        ),
    )
    add_overwrite(p, help="replace an existing output file")
    add_no_progress(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require("unilora export-gguf")
    result = export_gguf(
        args.adapter,
        args.out,
        base=args.base,
        outtype=args.outtype,
        saved_modules=args.saved_modules,
        overwrite=args.overwrite,
        show_progress=not args.no_progress,
    )
    types = ", ".join(f"{n} {t}" for t, n in sorted(result.tensor_types.items()))
    saved = ""
    if result.saved_file is not None:
        saved = f" + {result.saved_tensors} saved tensor(s) in {result.saved_file}"
    print(
        f"exported {result.modules} LoRA modules ({result.architecture}, {types}; "
        f"{result.lora_parameters:,} parameters, {result.bytes_written / 2**20:.1f} MiB) to "
        f"{result.out}{saved} in {result.seconds:.2f} s"
    )
    return 0
