"""``unilora train``: fine-tune a local Hugging Face model with Uni-LoRA on your own data."""

from __future__ import annotations

import argparse

from ..extras import require
from ..flags import add_flags, given_flags
from ..train_options import FinetuneArgs


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
    add_flags(p, FinetuneArgs, "train")
    p.set_defaults(run=run)


def needs(fargs: FinetuneArgs) -> str:
    """The feature of :data:`~unilora_rs.extras.FEATURES` this run is: with or without
    ``--model`` (the packaged default model of the task)."""
    if fargs.model is not None:
        return "unilora train"
    return f"unilora train{' --task sft' * (fargs.task == 'sft')} without --model"


def run(args: argparse.Namespace) -> int:
    fargs = FinetuneArgs(**given_flags(args, FinetuneArgs, "train"))
    require(needs(fargs))
    from ..torch.training import finetune, resolved, summary

    fargs = resolved(fargs)
    m = finetune(fargs).metrics
    print(summary(m, fargs.out))  # type: ignore[arg-type]
    return 0
