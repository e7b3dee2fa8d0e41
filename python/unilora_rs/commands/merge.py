"""``unilora merge BASE ADAPTER OUT``: merge an adapter into a safetensors checkpoint."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import UniLoraWarning
from ..merging import merge


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "merge",
        help="merge an adapter into a .safetensors file or a sharded model folder",
        description=(
            "Writes BASE with every adapted weight W replaced by W + (alpha/r) B A, computed "
            "in float32 and rounded once (round to nearest even). Other tensors, metadata, "
            "the shard index and the folder's other files are copied unchanged, except that "
            "a trained head the base lacks is added and config.json gets the adapter's task "
            "keys (e.g. architectures, id2label) and the --dtype. The output appears only "
            "when complete; the inputs are never modified."
        ),
    )
    p.add_argument("base", help="a .safetensors file, or a model folder (shards + index.json)")
    p.add_argument("adapter", help="the Uni-LoRA adapter folder")
    p.add_argument("out", help="output file (file base) or folder (folder base)")
    p.add_argument(
        "--dtype",
        choices=["bf16", "f16", "f32"],
        default=None,
        help="cast every floating tensor of the output (default: keep each tensor's dtype)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (a folder only if empty or an earlier merge output)",
    )
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.set_defaults(run=run)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UniLoraWarning)  # printed below, as one line each
        result = merge(
            args.base,
            args.adapter,
            args.out,
            dtype=args.dtype,
            show_progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    for message in result.warnings:
        print(f"unilora: warning: {' '.join(message.split())}", file=sys.stderr)
    extra = f", replaced {len(result.replaced)}" if result.replaced else ""
    if result.added:
        extra += f", added {len(result.added)} ({', '.join(result.added)})"
    if result.config_keys:
        extra += f", set {', '.join(result.config_keys)} in config.json"
    cast = f", cast {result.cast}" if result.cast else ""
    print(
        f"merged {result.merged_count} tensors{extra}{cast} into {result.out} "
        f"({len(result.shards)} safetensors file(s), {result.tensors} tensors, "
        f"{_size(result.bytes_written)}, {len(result.other_files)} other file(s)) "
        f"in {result.seconds:.2f} s"
    )
    return 0
