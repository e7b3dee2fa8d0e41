"""``unilora train``: fine-tune a local Hugging Face model with Uni-LoRA on your own data."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError

_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


def parse_targets(value: str | None) -> list[str] | str | None:
    """``--target-modules``: ``all-linear``, a comma-separated list of module names or
    suffixes (``query,value``), or a regular expression (full match of the qualified
    module name) when the value holds regex characters."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise InvalidArgumentError("--target-modules is empty")
    if value == "all-linear" or _REGEX_CHARS.search(value):
        return value
    names = [v.strip() for v in value.split(",")]
    if not all(names):
        raise InvalidArgumentError(f"--target-modules {value!r} holds an empty name")
    return names


def add_training_options(p: argparse.ArgumentParser) -> None:
    """The options shared by ``train`` and ``demo``."""
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (default 4)")
    p.add_argument(
        "--vector-length",
        type=int,
        default=None,
        metavar="D",
        help="length d of the trained vector (default: the paper's ratio d/D, "
        "5/32 of D for classification, about 1/19 for causal LM; see docs/TRAINING.md)",
    )
    p.add_argument(
        "--target-modules",
        default=None,
        help="layers to adapt: all-linear, names or suffixes (query,value) or a regex "
        "(default: the model type's query and value projections)",
    )
    p.add_argument(
        "--projection",
        choices=["sparse", "fastfood"],
        default="sparse",
        help="how theta_d is spread over the LoRA matrices (default sparse; fastfood is the "
        "paper's dense Walsh-Hadamard variant, see docs/SPEC.md)",
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate of theta_d (default 2e-2)")
    p.add_argument(
        "--head-lr", type=float, default=None, help="learning rate of the head (default 2e-3)"
    )
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (truncated)")
    p.add_argument("--seed", type=int, default=0, help="data split, initialisation, order")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "train",
        help="fine-tune a local Hugging Face model with Uni-LoRA on a CSV/TSV/JSONL file",
        description=(
            "Trains one vector theta_d (plus the classification head) on --data, evaluates "
            "after every epoch on --eval-data or a seeded held-out split, and writes the "
            "adapter (adapter_config.json, adapter_model.safetensors with the head) and "
            "metrics.json into --out."
        ),
    )
    p.add_argument("--data", required=True, type=Path, help="training data (.csv, .tsv, .jsonl)")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="local Hugging Face model folder (default: the packaged all-MiniLM-L6-v2)",
    )
    p.add_argument("--eval-data", type=Path, default=None, help="evaluation data (same columns)")
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.1,
        help="held-out share of --data when --eval-data is not given (default 0.1)",
    )
    p.add_argument("--task", choices=["classification", "causal-lm"], default="classification")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--out", type=Path, default=None, help="output folder (default DATA-unilora)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    add_training_options(p)
    p.set_defaults(run=run)


def default_model() -> Path:
    """The packaged all-MiniLM-L6-v2, with a hint when the package is missing."""
    from ..datasets import packaged_model_dir

    try:
        return packaged_model_dir()
    except ImportError as err:
        raise InvalidArgumentError(
            f"no --model given and the default model is not installed ({err})"
        ) from None


def run(args: argparse.Namespace) -> int:
    from ..torch.training import FinetuneArgs, finetune

    out = args.out or args.data.with_name(f"{args.data.stem}-unilora")
    options: dict[str, Any] = {
        k: getattr(args, k) for k in ("lr", "head_lr", "epochs") if getattr(args, k) is not None
    }
    fargs = FinetuneArgs(
        model=args.model or default_model(),
        out=out,
        data=args.data,
        eval_data=args.eval_data,
        eval_fraction=args.eval_fraction,
        task=args.task,
        text_column=args.text_column,
        label_column=args.label_column,
        rank=args.rank,
        vector_length=args.vector_length,
        target_modules=parse_targets(args.target_modules),
        projection=args.projection,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        max_steps=args.max_steps,
        threads=args.threads,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        **options,
    )
    m = finetune(fargs).metrics
    print(summary(m, out))
    return 0


def summary(m: dict[str, Any], out: Path) -> str:
    """The lines printed after training."""
    tp = m["trainable_parameters"]
    lines = [
        f"trained {m['steps']} steps in {m['train_seconds']:.1f} s on {m['train_examples']:,} "
        f"examples ({m['seconds_per_step']:.3f} s/step)"
    ]
    if "eval_accuracy" in m:
        lines.append(
            f"eval accuracy {m['eval_accuracy']:.4f}, eval loss {m['eval_loss']:.4f} "
            f"({m['eval_examples']:,} examples)"
        )
    else:
        lines.append(
            f"eval loss {m['eval_loss']:.4f}, perplexity {m['eval_perplexity']:.2f} "
            f"({m['eval_examples']:,} examples)"
        )
    lines.append(
        f"trainable: theta_d {tp['theta_d']:,} + head {tp['head']:,}; a LoRA of the same "
        f"rank trains {m['lora_parameters_same_rank']:,} ({m['adapted_modules']} modules)"
    )
    lines.append(f"adapter ({m['adapter_bytes']:,} bytes) and metrics.json in {out}")
    return "\n".join(lines)
