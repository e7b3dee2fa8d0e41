"""``unilora convert-peft PEFT_ADAPTER OUT``: a PEFT Uni-LoRA adapter as ours."""

from __future__ import annotations

import argparse

from ..extras import require
from ._options import add_overwrite


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "convert-peft",
        help="convert a PEFT Uni-LoRA adapter (peft_type UNILORA) into a unilora_rs adapter",
        description=(
            "Reads a PEFT Uni-LoRA adapter folder (saved with or without save_indices), finds "
            "PEFT's layers and their order from the base model's config.json (the adapter's "
            "base_model_name_or_path when it is a local folder, else --base) and writes a "
            "unilora_rs adapter that carries PEFT's map: stored (projection explicit) when PEFT "
            "saved the indices or with --explicit, else regenerated with numpy on every load "
            "(projection peft-numpy). The map's SHA-256 is recorded and checked on every load. "
            "Needs torch, transformers and peft."
        ),
    )
    p.add_argument("peft_adapter", metavar="PEFT_ADAPTER", help="the PEFT adapter folder")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--base", help="base model folder holding config.json")
    p.add_argument(
        "--explicit",
        action="store_true",
        help="store the map in the adapter even when PEFT did not save the indices",
    )
    add_overwrite(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require("unilora convert-peft")
    from ..peft_interop import convert_peft

    result = convert_peft(
        args.peft_adapter,
        args.out,
        base=args.base,
        explicit=args.explicit,
        overwrite=args.overwrite,
    )
    saved = f" + {len(result.saved_tensors)} saved tensor(s)" if result.saved_tensors else ""
    source = "saved indices" if result.save_indices else "regenerated with numpy"
    print(
        f"converted {result.modules} modules{saved} to {result.out} (projection "
        f"{result.projection}, map {source}, {result.map_sha256}) in {result.seconds:.2f} s"
    )
    return 0
