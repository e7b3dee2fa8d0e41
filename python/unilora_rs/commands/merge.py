"""``unilora merge``: merge one adapter, each of several adapters, or a weighted sum of
several adapters into a safetensors checkpoint.

* ``unilora merge BASE ADAPTER OUT``: one merged checkpoint;
* ``unilora merge BASE AD1 AD2 ... --out-dir DIR``: one merged checkpoint per adapter
  (``DIR/<adapter folder name>``), reading the base once;
* ``unilora merge BASE AD1 AD2 --weights 0.7 0.3 OUT``: one checkpoint with
  ``W + sum_i w_i dW_i``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import InvalidArgumentError, UniLoraWarning
from ..merging import merge, merge_each, merge_weighted
from ..reports import MergeResult
from ._options import add_dtype, add_no_progress, add_overwrite


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "merge",
        help="merge adapters into a .safetensors file or a sharded model folder",
        usage=(
            "unilora merge BASE ADAPTER OUT [options]\n"
            "       unilora merge BASE AD1 AD2 ... --out-dir DIR [options]\n"
            "       unilora merge BASE AD1 AD2 ... --weights W1 W2 ... OUT [options]"
        ),
        description=(
            "Writes BASE with every adapted weight W replaced by W + (alpha/r) B A, computed "
            "in float32 and rounded once (round to nearest even). Other tensors, metadata, "
            "the shard index and the folder's other files are copied unchanged, except that "
            "a trained head the base lacks is added and config.json gets the adapter's task "
            "keys (e.g. architectures, id2label) and the --dtype. With --out-dir, each "
            "adapter is merged alone into DIR/<adapter folder name>, and the base is read "
            "once for all of them. With --weights, one checkpoint gets W + sum_i w_i dW_i "
            "(heads and task keys must come from one adapter). The output appears only "
            "when complete; the inputs are never modified."
        ),
    )
    p.add_argument("base", help="a .safetensors file, or a model folder (shards + index.json)")
    p.add_argument(
        "paths",
        nargs="+",
        metavar="ADAPTER ... [OUT]",
        help="the Uni-LoRA adapter folder(s), then the output file or folder (not with --out-dir)",
    )
    p.add_argument(
        "--out-dir",
        default=None,
        help="merge each adapter alone into DIR/<adapter folder name>, in one pass over BASE",
    )
    p.add_argument(
        "--weights",
        nargs="+",
        default=None,
        metavar="W",
        help=(
            "one weight per adapter: write one checkpoint with W + sum_i w_i dW_i (OUT may "
            "follow the weights)"
        ),
    )
    add_dtype(
        p,
        default=None,
        help="cast every floating tensor of the output (default: keep each tensor's dtype)",
    )
    add_overwrite(
        p, help="replace an existing output (a folder only if empty or an earlier merge output)"
    )
    add_no_progress(p)
    p.set_defaults(run=run)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _summary(result: MergeResult) -> str:
    extra = f", replaced {len(result.replaced)}" if result.replaced else ""
    if result.added:
        extra += f", added {len(result.added)} ({', '.join(result.added)})"
    if result.config_keys:
        extra += f", set {', '.join(result.config_keys)} in config.json"
    cast = f", cast {result.cast}" if result.cast else ""
    if result.dequantized:
        cast += f", dequantised {result.dequantized}"
    return (
        f"merged {result.merged_count} tensors{extra}{cast} into {result.out} "
        f"({len(result.shards)} safetensors file(s), {result.tensors} tensors, "
        f"{_size(result.bytes_written)}, {len(result.other_files)} other file(s))"
    )


def _split_weights(values: list[str]) -> tuple[list[float], list[str]]:
    """The leading numbers of ``--weights W1 W2 ... [OUT]`` and what follows them."""
    weights: list[float] = []
    for i, v in enumerate(values):
        try:
            weights.append(float(v))
        except ValueError:
            return weights, values[i:]
    return weights, []


def run(args: argparse.Namespace) -> int:
    weights, rest = _split_weights(args.weights) if args.weights is not None else (None, [])
    common = {
        "dtype": args.dtype,
        "show_progress": not args.no_progress,
        "overwrite": args.overwrite,
    }
    paths = list(args.paths) + rest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UniLoraWarning)  # printed below, as one line each
        if args.out_dir is not None:
            if weights is not None:
                raise InvalidArgumentError("--out-dir and --weights exclude each other")
            each = merge_each(args.base, paths, args.out_dir, **common)  # type: ignore[arg-type]
            results, seconds = each.results, each.seconds
            read = f", read {_size(each.bytes_read)} once"
        else:
            if len(paths) < 2:
                raise InvalidArgumentError("give BASE, the adapter(s) and OUT (or --out-dir DIR)")
            *adapters, out = paths
            if weights is not None:
                if not rest and len(weights) == len(args.paths) + 1:
                    raise InvalidArgumentError(
                        f"{len(weights)} weights for {len(args.paths)} adapters and no OUT: "
                        f"{args.weights[-1]!r} after --weights is read as a weight; if it is "
                        f"OUT, write it as ./{args.weights[-1]} or put it before --weights"
                    )
                if len(weights) != len(adapters):
                    raise InvalidArgumentError(
                        f"{len(weights)} weights for {len(adapters)} adapters; give one "
                        "weight per adapter, then OUT"
                    )
                result = merge_weighted(args.base, adapters, weights, out, **common)  # type: ignore[arg-type]
            elif len(adapters) != 1:
                raise InvalidArgumentError(
                    f"{len(adapters)} adapters and one OUT: use --out-dir DIR for one merged "
                    "checkpoint per adapter, or --weights for their weighted sum"
                )
            else:
                result = merge(args.base, adapters[0], out, **common)  # type: ignore[arg-type]
            results, seconds, read = [result], result.seconds, ""
    for message in results[0].warnings:
        print(f"unilora: warning: {' '.join(message.split())}", file=sys.stderr)
    for result in results:
        print(_summary(result) + (f" in {seconds:.2f} s" if len(results) == 1 else ""))
    if len(results) > 1:
        print(f"{len(results)} checkpoints in {seconds:.2f} s{read}")
    return 0
