"""``unilora export-onnx``: merge an adapter into its base model and export verified ONNX."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export-onnx",
        help="merge an adapter into a transformers model folder and export it to ONNX",
        description=(
            "Loads the base model (a folder saved with transformers), merges the Uni-LoRA "
            "adapter into it, exports the graph with torch.onnx (dynamic batch and sequence "
            "axes, inputs input_ids and attention_mask, output logits), checks it with "
            "onnxruntime against torch on sample inputs and only then writes OUT. "
            "SOURCE may also be a plain model folder (exported without an adapter). "
            "Needs torch, transformers, onnx and onnxruntime."
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
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument(
        "--atol", type=float, default=1e-4, help="max |onnxruntime - torch| (default 1e-4)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..torch.onnx_export import export_adapter_onnx

    report = export_adapter_onnx(
        args.source,
        args.out,
        base=args.base,
        batch=args.batch,
        seq_len=args.seq_len,
        opset=args.opset,
        atol=args.atol,
    )
    shapes = ", ".join(f"{b}x{s}" for b, s in report.checked_shapes)
    print(
        f"wrote {report.path} (opset {report.opset}); onnxruntime matches torch within "
        f"{report.max_abs_diff:.2e} on inputs {shapes}"
    )
    return 0
