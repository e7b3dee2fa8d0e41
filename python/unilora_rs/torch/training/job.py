"""The ``unilora train`` job: options, data loading, training, metrics, saving.

:func:`finetune` runs the whole job (load, build the adapter, train, evaluate after each
epoch, save the adapter and ``metrics.json``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...datasets import (
    Example,
    LabelMap,
    classification_examples,
    read_records,
    split_examples,
    text_examples,
)
from ...errors import InvalidArgumentError
from ...train_options import FinetuneArgs
from ..config import UniLoRAConfig
from ..model import UniLoRAModel, get_unilora_model
from .data import Batch, batches, encode
from .loop import train_loop
from .models import (
    TASKS,
    default_model_dir,
    default_vector_length,
    load_task_model,
    lora_parameter_count,
    modules_of,
    pad_was_set,
    task_record,
)

__all__ = [
    "METRICS_NAME",
    "FinetuneArgs",
    "FinetuneResult",
    "args_dict",
    "finetune",
    "resolved",
    "summary",
]

METRICS_NAME = "metrics.json"


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced: the metrics (also in ``metrics.json``), the trained
    model and what is needed to use it further (the demo merges and exports it)."""

    metrics: dict[str, Any]
    model: UniLoRAModel
    tokenizer: Any
    labels: LabelMap | None
    train_examples: list[Example]
    eval_examples: list[Example]
    eval_batches: list[Batch] = field(default_factory=list)


def _load_examples(
    args: FinetuneArgs,
    train_rows: Sequence[dict[str, Any]] | None,
    eval_rows: Sequence[dict[str, Any]] | None,
) -> tuple[list[Example], list[Example], LabelMap | None]:
    if train_rows is None:
        if args.data is None:
            raise InvalidArgumentError("no training data: give --data FILE")
        train_rows = read_records(args.data)
        train_src = str(args.data)
    else:
        train_src = "training data"
    if eval_rows is None and args.eval_data is not None:
        eval_rows = read_records(args.eval_data)
        eval_src = str(args.eval_data)
    else:
        eval_src = "evaluation data"
    labels: LabelMap | None = None
    if args.task == "classification":
        train, labels = classification_examples(
            train_rows,
            text_column=args.text_column,
            label_column=args.label_column,
            source=train_src,
        )
        if eval_rows is not None:
            held, _ = classification_examples(
                eval_rows,
                text_column=args.text_column,
                label_column=args.label_column,
                labels=labels,
                source=eval_src,
            )
        else:
            train, held = split_examples(train, args.eval_fraction, args.seed)
    else:
        train = text_examples(train_rows, text_column=args.text_column, source=train_src)
        if eval_rows is not None:
            held = text_examples(eval_rows, text_column=args.text_column, source=eval_src)
        else:
            train, held = split_examples(train, args.eval_fraction, args.seed, stratify=False)
    if args.max_train_examples is not None:
        train = train[: args.max_train_examples]
    if not held:
        raise InvalidArgumentError(f"{eval_src}: no evaluation examples")
    if labels is not None and len({ex.label for ex in train}) < 2:
        raise InvalidArgumentError(
            "the training split holds a single class; give more data or another split"
        )
    return train, held, labels


def _check_args(args: FinetuneArgs) -> None:
    if args.task not in TASKS:
        raise InvalidArgumentError(f"task {args.task!r} is not one of {', '.join(TASKS)}")
    for name in ("epochs", "batch_size", "rank"):
        v = getattr(args, name)
        if v < 1:
            raise InvalidArgumentError(f"{name.replace('_', '-')} must be at least 1, got {v}")
    for name in ("lr", "head_lr"):
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            raise InvalidArgumentError(
                f"{name.replace('_', '-')} must be a positive number, got {v}"
            )
    if not 0.0 <= args.warmup_ratio < 1.0:
        raise InvalidArgumentError(f"warmup ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.max_steps is not None and args.max_steps < 1:
        raise InvalidArgumentError(f"max-steps must be at least 1, got {args.max_steps}")
    _check_out(args.out, args.overwrite)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(17, "output path exists and is not a folder", str(out))
    if out.is_dir() and any(out.iterdir()):
        ours = (out / METRICS_NAME).is_file() and (out / "adapter_config.json").is_file()
        if not overwrite:
            raise FileExistsError(
                17,
                "output folder is not empty (use --overwrite to replace an earlier run)",
                str(out),
            )
        if not ours:
            raise FileExistsError(
                17,
                "output folder is not empty and holds no earlier `unilora train` run; "
                "refusing to write into it",
                str(out),
            )


def resolved(args: FinetuneArgs) -> FinetuneArgs:
    """``args`` with the defaults that depend on others filled in: the model (the
    packaged all-MiniLM-L6-v2) and the output folder (``DATA-unilora`` beside the data)."""
    model = args.model if args.model is not None else default_model_dir()
    out = args.out
    if out is None:
        if args.data is None:
            raise InvalidArgumentError("no output folder: give --out DIR")
        out = args.data.with_name(f"{args.data.stem}-unilora")
    return replace(args, model=Path(model), out=Path(out))


def finetune(
    args: FinetuneArgs,
    *,
    train_rows: Sequence[dict[str, Any]] | None = None,
    eval_rows: Sequence[dict[str, Any]] | None = None,
) -> FinetuneResult:
    """Trains a Uni-LoRA adapter on ``args.data`` (or ``train_rows``), evaluates after each
    epoch and writes the adapter and ``metrics.json`` into ``args.out``."""
    args = resolved(args)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, held, labels = _load_examples(args, train_rows, eval_rows)
    torch.manual_seed(args.seed)
    model, tokenizer, new_tensors = load_task_model(args.model, args.task, labels)  # type: ignore[arg-type]
    pad_set = pad_was_set(args.model, model)  # type: ignore[arg-type]
    wrapped = _build_adapter(args, model, new_tensors)
    train_enc = encode(tokenizer, train, args.max_length)
    held_enc = encode(tokenizer, held, args.max_length)
    eval_batches = batches(
        held_enc, held, tokenizer, max(args.batch_size, 64), args.task, shuffle=False
    )
    t0 = time.perf_counter()
    history = train_loop(
        wrapped,
        _param_groups(args, wrapped),
        lambda epoch: batches(
            train_enc,
            train,
            tokenizer,
            args.batch_size,
            args.task,
            shuffle=True,
            seed=args.seed * 1000 + epoch,
        ),
        task=args.task,
        epochs=args.epochs,
        eval_data=eval_batches,
        warmup_ratio=args.warmup_ratio,
        max_steps=args.max_steps,
        progress=args.progress,
    )
    seconds = time.perf_counter() - t0
    wrapped.eval()
    metrics = _metrics(args, wrapped, labels, train, held, history, seconds, new_tensors)
    task = task_record(args.task, model, labels, new_tensors, pad_set)
    _save(args.out, wrapped, metrics, task)  # type: ignore[arg-type]
    return FinetuneResult(metrics, wrapped, tokenizer, labels, train, held, eval_batches)


def _build_adapter(args: FinetuneArgs, model: nn.Module, new_tensors: list[str]) -> UniLoRAModel:
    """Wraps ``model`` with the adapter ``args`` describe: ``d`` from the paper's ratio
    unless given, the new head (classification) saved in full."""
    head = modules_of(new_tensors, model) if args.task == "classification" else []
    probe = UniLoRAConfig(
        rank=args.rank,
        vector_length=1,
        seed=args.seed,
        target_modules=args.target_modules,
        modules_to_save=head or None,
    )
    total = lora_parameter_count(model, probe)
    d = args.vector_length or default_vector_length(total, args.task)
    config = UniLoRAConfig(
        rank=args.rank,
        vector_length=d,
        seed=args.seed,
        target_modules=args.target_modules,
        modules_to_save=head or None,
        projection=args.projection,
        base_model_name_or_path=str(Path(args.model).resolve()),  # type: ignore[arg-type]
    )
    return get_unilora_model(model, config)


def _param_groups(args: FinetuneArgs, model: UniLoRAModel) -> list[dict[str, Any]]:
    """``theta_d`` at ``lr``; the saved head (if any) at ``head_lr``."""
    head = [p for n, p in model.named_parameters() if p.requires_grad and n != "theta_d"]
    groups: list[dict[str, Any]] = [{"params": [model.theta_d], "lr": args.lr}]
    if head:
        groups.append({"params": head, "lr": args.head_lr})
    return groups


def _metrics(
    args: FinetuneArgs,
    model: UniLoRAModel,
    labels: LabelMap | None,
    train: Sequence[Example],
    held: Sequence[Example],
    history: list[dict[str, Any]],
    seconds: float,
    new_tensors: Sequence[str],
) -> dict[str, Any]:
    steps = history[-1]["steps"] if history else 0
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n != "theta_d")
    final = history[-1] if history else {}
    out: dict[str, Any] = {
        "task": args.task,
        "model": str(args.model),
        "data": str(args.data) if args.data else None,
        "eval_data": str(args.eval_data) if args.eval_data else None,
        "train_examples": len(train),
        "eval_examples": len(held),
    }
    for key in ("eval_accuracy", "eval_loss", "eval_perplexity"):
        if key in final:
            out[key] = final[key]
    out.update(
        {
            "labels": labels.id2label if labels is not None else None,
            "rank": args.rank,
            "projection": model.adapter_config.projection,
            "vector_length": model.theta_d.numel(),
            "total_size": model.total_size,
            "adapted_modules": len(model.adapter_config.modules),
            "target_modules": model.adapter_config.target_modules,
            "trainable_parameters": {
                "theta_d": model.theta_d.numel(),
                "head": head,
                "total": model.theta_d.numel() + head,
            },
            "lora_parameters_same_rank": model.total_size,
            "new_tensors": list(new_tensors),
            "epochs": args.epochs,
            "steps": steps,
            "train_seconds": seconds,
            "seconds_per_step": seconds / max(steps, 1),
            "lr": args.lr,
            "head_lr": args.head_lr,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "seed": args.seed,
            "warmup_ratio": args.warmup_ratio,
            "threads": torch.get_num_threads(),
            "history": history,
        }
    )
    return out


def _save(out: Path, model: UniLoRAModel, metrics: dict[str, Any], task: dict[str, Any]) -> None:
    """Writes the adapter, then ``metrics.json`` (once, with the adapter's size)."""
    out.mkdir(parents=True, exist_ok=True)
    model.adapter_config.task = task
    model.save_pretrained(out)
    metrics["adapter_bytes"] = sum(
        (out / n).stat().st_size for n in ("adapter_config.json", "adapter_model.safetensors")
    )
    (out / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def args_dict(args: FinetuneArgs) -> dict[str, Any]:
    """``args`` as JSON-ready values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()}


def summary(m: dict[str, Any], out: Path) -> str:
    """The lines ``unilora train`` prints after training."""
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
