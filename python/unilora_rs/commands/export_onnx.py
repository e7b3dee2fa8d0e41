"""``unilora export-onnx``: merge an adapter into its base model and export verified ONNX."""

from __future__ import annotations

import argparse
import sys
import time

from ..extras import require
from ._options import add_no_progress, add_overwrite


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export-onnx",
        help="merge an adapter into a transformers model folder and export it to ONNX",
        description=(
            "Loads the base model (a folder saved with transformers), merges the Uni-LoRA "
            "adapter into it, exports the graph with torch.onnx (dynamic batch and sequence "
            "axes, inputs input_ids and attention_mask, output logits), checks it with "
            "onnxruntime against torch on sample inputs and only then writes OUT. "
            "ADAPTER_OR_MODEL may also be a plain model folder (exported without an adapter). "
            "Weights over 2 GB (the limit of one ONNX file) go to OUT.onnx.data beside "
            "OUT.onnx (ONNX external data), as with --external-data; both files are "
            "staged in a temporary folder beside OUT and renamed into place, the data "
            "first; the graph names the data file relative to itself, so keep (or move) "
            "the two together. The free disk space is checked before writing. Needs "
            "torch, transformers, onnx and onnxruntime."
        ),
    )
    p.add_argument("source", metavar="ADAPTER_OR_MODEL", help="adapter folder (or model folder)")
    p.add_argument("out", metavar="OUT.onnx", help="output file (written atomically)")
    p.add_argument(
        "--base", help="base model folder (default: the adapter's recorded base, if local)"
    )
    p.add_argument(
        "--batch", type=int, default=2, help="batch size of the sample inputs (default 2)"
    )
    p.add_argument(
        "--seq-len", type=int, default=16, help="sequence length of the samples (default 16)"
    )
    p.add_argument(
        "--opset",
        type=int,
        default=18,
        help="ONNX opset written (default 18; up to the newest opset the installed onnx "
        "knows; below 18 only when torch.onnx can convert every operator of the graph)",
    )
    p.add_argument(
        "--atol", type=float, default=1e-4, help="max |onnxruntime - torch| (default 1e-4)"
    )
    p.add_argument(
        "--external-data",
        action="store_true",
        help="write the weights to OUT.onnx.data even when they would fit in OUT.onnx "
        "(automatic over 2 GB)",
    )
    add_overwrite(p, help="replace an existing OUT.onnx (and OUT.onnx.data)")
    add_no_progress(p, help="no progress lines on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require("unilora export-onnx")
    from ..torch.export.onnx import export_adapter_onnx

    start = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - start:7.1f}s] {line}", file=sys.stderr, flush=True)

    report = export_adapter_onnx(
        args.source,
        args.out,
        base=args.base,
        batch=args.batch,
        seq_len=args.seq_len,
        opset=args.opset,
        atol=args.atol,
        external_data=True if args.external_data else None,
        progress=None if args.no_progress else progress,
        overwrite=args.overwrite,
    )
    shapes = ", ".join(f"{b}x{s}" for b, s in report.checked_shapes)
    written = str(report.path)
    if report.data_path is not None:
        why = ", over the 2 GB single-file limit" if report.auto_external else ""
        written += (
            f" + {report.data_path.name} ({report.weight_bytes / 1e9:.2f} GB of weights "
            f"as external data{why})"
        )
    print(
        f"wrote {written} (opset {report.opset}); onnxruntime matches torch within "
        f"{report.max_abs_diff:.2e} on inputs {shapes}"
    )
    return 0
